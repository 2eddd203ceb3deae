"""The whole local stack in one object: Azurite + the emulators + devhost running ``function_app``.

It is the production configuration with local endpoints. ``LocalStack.settings()`` are the app's settings in
the Functions ``Values`` format, shaped as docs/deploy.md sets them on Azure: storage by service URI with
``__credential=managedidentity`` and ``__clientId``, the two vaults by URL (``KEY_VAULT_URL``: the
intermediates' keys and the batch secrets; ``ROOT_CA_KEY_VAULT_URL``: the root key alone), DPS and IoT Hub by host
name, the user-assigned identity in ``AZURE_CLIENT_ID``, and no key, SAS or connection string. The stack plays the
platform as well: its token issuer is the managed identity endpoint, named in ``IDENTITY_ENDPOINT`` /
``IDENTITY_HEADER`` as on Azure Functions, and ``EMULATOR_CA_PATH`` makes the clients trust its TLS CA.
``write_local_settings`` puts the settings in the git-ignored ``local.settings.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from .azurite import REPO, Azurite, free_port

# Settings a person's shell has where the app has its identity's: on Azure an operator signs in with `az login`
# (DefaultAzureCredential), so the Functions-host identity settings do not apply to them.
_APP_ONLY = ("AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId")


def app_settings(azurite: Azurite, emulators, **extra: str) -> dict[str, str]:
    """The app's settings for ``azurite`` and ``emulators`` (an ``emulators.stack.EmulatorStack``), identity-based."""
    from emulators.stack import APP

    app = emulators.client_id(APP)
    return {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsStorage__blobServiceUri": azurite.blob_service_uri,
        "AzureWebJobsStorage__queueServiceUri": azurite.queue_service_uri,
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": app,
        "AZURE_CLIENT_ID": app,
        "KEY_VAULT_URL": emulators.keyvault_url,
        "ROOT_CA_KEY_VAULT_URL": emulators.rootvault_url,
        "DPS_INSTANCES": json.dumps([{"name": d.name, "endpoint": d.endpoint, "idScope": d.id_scope,
                                      "iotHubs": [emulators.iothub.hostname], "resourceId": d.resource_id}
                                     for d in emulators.dps_info()]),
        "DPS_DEVICE_ENDPOINT": emulators.device_endpoint_url,
        "ARM_ENDPOINT": emulators.arm_url,
        "EXPIRY_SWEEP_SCHEDULE": "0 0 2 * * *",
        # the platform's, locally: the managed identity endpoint and the local stack's TLS CA
        **emulators.issuer.environment(),
        "EMULATOR_CA_PATH": str(emulators.ca_path),
        **extra,
    }


def person_settings(settings: Mapping[str, str], client_id: str) -> dict[str, str]:
    """``settings`` as a person (operator, PKI administrator) uses them: their own identity for every client."""
    return {**{k: v for k, v in settings.items() if k not in _APP_ONLY}, "AZURE_CLIENT_ID": client_id}


def sas_settings(azurite: Azurite, emulators, **extra: str) -> dict[str, str]:
    """The same app with keys where services take them: a storage connection string and the emulators' SAS
    connection strings (``DPS_CONNECTION_STRINGS``, ``IOT_HUB_CONNECTION_STRINGS``). Supported, not the default.
    Key Vault takes no key: it keeps the identity (``AZURE_CLIENT_ID``)."""
    settings = {k: v for k, v in app_settings(azurite, emulators).items() if not k.startswith("AzureWebJobsStorage__")}
    return {**settings, "AzureWebJobsStorage": azurite.connection_string,
            "DPS_CONNECTION_STRINGS": json.dumps({d.name: d.connection_string for d in emulators.dps_info()}),
            "IOT_HUB_CONNECTION_STRINGS": json.dumps({emulators.iothub.hostname: emulators.iothub_connection_string}),
            **extra}


def launch_devhost(args: list[str], env: Mapping[str, str], *, cwd: Path = REPO, stdout=None,
                   ready_timeout_s: float = 90) -> subprocess.Popen:
    """Start ``python -m devhost ARGS`` and return once it is ready: its Event Grid subscriptions exist (blobs
    uploaded from now on fire, as after an Azure deployment) and its webhook, if any, listens."""
    import tempfile
    import time

    ready = Path(tempfile.mkdtemp(prefix="devhost-")) / "ready"
    process = subprocess.Popen([sys.executable, "-m", "devhost", *args, "--ready-file", str(ready)], cwd=cwd,
                               env={**env, "PYTHONPATH": str(REPO)}, stdout=stdout,
                               stderr=subprocess.STDOUT if stdout is not None else None, start_new_session=True,
                               text=stdout is subprocess.PIPE)
    deadline = time.monotonic() + ready_timeout_s
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"devhost exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"devhost was not ready within {ready_timeout_s:.0f} s")
        time.sleep(0.1)
    ready.unlink()
    ready.parent.rmdir()
    return process


@contextlib.contextmanager
def platform_environment(emulators) -> Iterator[None]:
    """This process on the local platform: ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` in ``os.environ`` (where
    azure-identity reads them, when a credential is built and at every token request), restored afterwards."""
    values = emulators.issuer.environment()
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

# Where the local stack keeps its CA, key store, logs and pid file (git-ignored).
STATE_DIR = Path(os.environ.get("PKI_LOCAL_DIR") or REPO / ".pki-local")


class LocalStack:
    def __init__(self, state_dir: Path = STATE_DIR, *, dps_instances: int = 2, run_functions: bool = True,
                 concurrency: int = 8, script_root: Path = REPO, extra_settings: dict[str, str] | None = None,
                 record_exchanges: bool = False, azure_quotas: bool = False):
        self.state_dir = Path(state_dir)
        self.dps_instances = dps_instances
        self.run_functions = run_functions
        self.concurrency = concurrency
        self.script_root = script_root
        self.extra_settings = extra_settings or {}
        self.record_exchanges = record_exchanges
        self.azure_quotas = azure_quotas
        self.azurite: Azurite | None = None
        self.emulators = None
        self.devhost: subprocess.Popen | None = None
        # devhost's HTTP port and function key: the app's custom allocation webhook, which DPS calls
        self.functions_port: int | None = None
        self.function_key = secrets.token_urlsafe(24)
        self._platform: contextlib.ExitStack | None = None

    def start(self) -> LocalStack:
        from emulators.stack import EmulatorStack

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.emulators = EmulatorStack(self.state_dir / "emulators", dps_instances=self.dps_instances,
                                           record=self.record_exchanges).start()
            if self.azure_quotas:
                self.emulators.azure_quotas()
            self.azurite = Azurite(self.emulators.tls, self.emulators.ca_path).start()
            self._platform = contextlib.ExitStack()
            self._platform.enter_context(platform_environment(self.emulators))
            if self.run_functions:
                self.functions_port = free_port()
                self.start_devhost()
        except BaseException:
            self.stop()
            raise
        return self

    def settings(self) -> dict[str, str]:
        """The app's settings for this stack: endpoints and identities, no account key (local.settings.json holds
        them). With devhost running, groups allocate through its webhook (``DPS_ALLOCATION_WEBHOOK_URL``, with the
        function key, as on Azure)."""
        from handlers.renewal import ROUTE

        webhook = {} if self.functions_port is None else {"DPS_ALLOCATION_WEBHOOK_URL": (
            f"http://127.0.0.1:{self.functions_port}/api/{ROUTE}?code={self.function_key}")}
        return app_settings(self.azurite, self.emulators, **webhook, **self.extra_settings)

    def settings_as(self, principal: str) -> dict[str, str]:
        """The settings of a person of the local tenant (``pki-operator``, ``pki-admin``), as their shell has them."""
        return person_settings(self.settings(), self.emulators.client_id(principal))

    def start_devhost(self) -> None:
        with open(self.state_dir / "devhost.log", "ab") as log:  # the child keeps its own handle
            self.devhost = launch_devhost(["--script-root", str(self.script_root), "--concurrency",
                                           str(self.concurrency), "--webhook-port", str(self.functions_port)],
                                          {**os.environ, **self.settings(), "DEVHOST_FUNCTION_KEY": self.function_key},
                                          cwd=self.script_root, stdout=log)

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
        if self._platform is not None:
            self._platform.close()
            self._platform = None
        if self.azurite is not None:
            self.azurite.stop()
        if self.emulators is not None:
            self.emulators.stop()
            self.emulators = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_local_settings(values: dict[str, str], path: Path = REPO / "local.settings.json") -> Path:
    """Write ``local.settings.json`` (mode 0600: it names the local stack's identity endpoint and its header)."""
    from emulators.stack import write_private

    write_private(path, json.dumps({"IsEncrypted": False, "Values": values}, indent=2))
    return path
