"""The whole local stack in one object: Azurite + the emulators + devhost running ``function_app``.

``LocalStack.settings()`` are the app settings that point the app, ``pkictl`` and the SDK clients
at it, in the Functions ``Values`` format; ``write_local_settings`` puts them in the git-ignored
``local.settings.json`` so any later ``pkictl`` command talks to this stack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .azurite import REPO, Azurite

# Where the local stack keeps its CA, key store, logs and pid file (git-ignored).
STATE_DIR = Path(os.environ.get("PKI_LOCAL_DIR") or REPO / ".pki-local")


class LocalStack:
    def __init__(self, state_dir: Path = STATE_DIR, *, dps_instances: int = 2, run_functions: bool = True,
                 concurrency: int = 8, script_root: Path = REPO, extra_settings: dict[str, str] | None = None):
        self.state_dir = Path(state_dir)
        self.dps_instances = dps_instances
        self.run_functions = run_functions
        self.concurrency = concurrency
        self.script_root = script_root
        self.extra_settings = extra_settings or {}
        self.azurite = Azurite()
        self.emulators = None
        self.devhost: subprocess.Popen | None = None

    def start(self) -> LocalStack:
        from emulators.stack import EmulatorStack

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.azurite.start()
            self.emulators = EmulatorStack(self.state_dir / "emulators", dps_instances=self.dps_instances).start()
            if self.run_functions:
                self.start_devhost()
        except BaseException:
            self.stop()
            raise
        return self

    def settings(self) -> dict[str, str]:
        """App settings for this stack. They hold local keys: only for the git-ignored local.settings.json."""
        stack = self.emulators
        return {
            "FUNCTIONS_WORKER_RUNTIME": "python",
            "AzureWebJobsStorage": self.azurite.connection_string,
            "KEY_VAULT_URL": stack.keyvault_url,
            "EMULATOR_CA_PATH": str(stack.ca_path),
            "LOCAL_KEYSTORE_DIR": str(self.state_dir / "keystore"),
            "DPS_INSTANCES": json.dumps([{"name": d.name, "endpoint": d.endpoint, "idScope": d.id_scope,
                                          "iotHubs": [stack.iothub.hostname]} for d in stack.dps_info()]),
            "DPS_CONNECTION_STRINGS": json.dumps({d.name: d.connection_string for d in stack.dps_info()}),
            "DPS_DEVICE_ENDPOINT": stack.device_endpoint_url,
            "IOT_HUB_CONNECTION_STRINGS": json.dumps({stack.iothub.hostname: stack.iothub_connection_string}),
            # azure-iot-hub (msrest over requests) takes no CA option: requests trusts this bundle
            "REQUESTS_CA_BUNDLE": str(stack.ca_path),
            "EXPIRY_SWEEP_SCHEDULE": "0 0 2 * * *",
            **self.extra_settings,
        }

    def start_devhost(self) -> None:
        log = open(self.state_dir / "devhost.log", "ab")  # noqa: SIM115 - handed to the child process
        env = {**os.environ, **self.settings(), "PYTHONPATH": str(REPO)}
        self.devhost = subprocess.Popen(
            [sys.executable, "-m", "devhost", "--script-root", str(self.script_root),
             "--concurrency", str(self.concurrency)],
            cwd=self.script_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop_devhost(self, *, kill: bool = False) -> None:
        process, self.devhost = self.devhost, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        self.stop_devhost()
        if self.emulators is not None:
            self.emulators.stop()
            self.emulators = None
        self.azurite.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_local_settings(values: dict[str, str], path: Path = REPO / "local.settings.json") -> Path:
    """Write ``local.settings.json`` (mode 0600: it holds the local stack's keys)."""
    document = {"IsEncrypted": False, "Values": values}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
    return path
