"""``pkictl local up|down|status``: the local stack (Azurite + emulators + devhost) for a person."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from devhost.stack import STATE_DIR, LocalStack, write_local_settings

STACK_FILE = STATE_DIR / "stack.json"
READY_TIMEOUT_S = 180


def _is_stack(pid: object) -> bool:
    """Whether ``pid`` is a running ``pkictl local up``: stack.json outlives a SIGKILL or a reboot, and its pid
    may since belong to an unrelated process (and pid -1 or 0 would make os.kill signal many processes)."""
    if type(pid) is not int or pid <= 1:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"pkictl" in arg for arg in args) and b"local" in args and b"up" in args


def _running(out: TextIO) -> dict | None:
    """What stack.json says of the running stack; a file left by a stack that is gone is removed."""
    try:
        info = json.loads(STACK_FILE.read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    if _is_stack(pid):
        return info
    STACK_FILE.unlink(missing_ok=True)
    print(f"removed stale {STACK_FILE}: pid {pid} is not a running `pkictl local up`", file=out)
    return None


def _roles(principal: str) -> dict[str, list[str]]:
    from emulators.stack import LOCAL_ROLES

    return {resource: list(roles) for resource, roles in LOCAL_ROLES[principal].items()}


def _describe(stack: LocalStack, settings_path: Path) -> dict:
    emulators = stack.emulators
    return {
        "pid": os.getpid(), "ready": True, "localSettings": str(settings_path),
        "azurite": {"blob": stack.azurite.blob_service_uri, "queue": stack.azurite.queue_service_uri},
        "identityEndpoint": emulators.issuer.endpoint,
        "principals": {name: {"clientId": p.client_id, "roles": _roles(name)}
                       for name, p in emulators.principals.items()},
        "keyVault": emulators.keyvault_url, "rootKeyVault": emulators.rootvault_url,
        "iotHub": emulators.iothub.hostname,
        "dps": [{"name": d.name, "endpoint": d.endpoint, "idScope": d.id_scope} for d in emulators.dps_info()],
        "dpsDeviceEndpoint": emulators.device_endpoint_url, "dpsMqttHost": emulators.device_mqtt_host,
        "emulatorCa": str(emulators.ca_path),
        "devhostLog": str(stack.state_dir / "devhost.log") if stack.run_functions else None,
    }


def _print_summary(info: dict, out: TextIO) -> None:
    print("local stack is up (loopback only):", file=out)
    print(f"  storage (Azurite)   {info['azurite']['blob']}  {info['azurite']['queue']}", file=out)
    print(f"  Key Vault emulator  {info['keyVault']}  (intermediates' keys, batch secrets)", file=out)
    print(f"  root Key Vault      {info['rootKeyVault']}  (the root key alone; the app may only read and sign)",
          file=out)
    for dps in info["dps"]:
        print(f"  DPS {dps['name']:<15} {dps['endpoint']}  idScope {dps['idScope']}", file=out)
    print(f"  DPS device endpoint {info['dpsDeviceEndpoint']}  (HTTPS); MQTT {info['dpsMqttHost']}:8883 (device SDKs' "
          "provisioning_host)", file=out)
    print(f"  IoT Hub emulator    {info['iotHub']}", file=out)
    print(f"  identity endpoint   {info['identityEndpoint']}  (IDENTITY_ENDPOINT, as on Azure Functions)", file=out)
    if info.get("devhostLog"):
        print(f"  functions (devhost) log: {info['devhostLog']}", file=out)
    print("identities of the local tenant (client id; roles as docs/deploy.md assigns them):", file=out)
    for name, principal in info["principals"].items():
        roles = "; ".join(f"{where}: {', '.join(roles)}" for where, roles in principal["roles"].items())
        print(f"  {name:<13} {principal['clientId']}  {roles}", file=out)
    print("pkictl reads local.settings.json and so acts as pki-app; act as a person with "
          '`eval "$(pkictl local env pki-operator)"` (or pki-admin).', file=out)
    print(f"settings written to {info['localSettings']}; `pkictl ...` now talks to this stack. "
          "Stop it with `pkictl local down`.", file=out)


def up(*, detach: bool, dps_instances: int, functions: bool, out: TextIO, azure_quotas: bool = False,
       telemetry: str | None = None) -> int:
    running = _running(out)
    if running:
        print(f"a local stack is running already (pid {running['pid']}); `pkictl local down` stops it", file=out)
        return 1
    if detach:
        return _up_detached(dps_instances, functions, out, azure_quotas, telemetry)
    settings_path = Path.cwd() / "local.settings.json"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if telemetry and telemetry.startswith("file:"):  # the app runs elsewhere (devhost's cwd): an absolute path
        telemetry = "file:" + str(Path(telemetry.removeprefix("file:")).resolve())
    extra = {"PKI_TELEMETRY_EXPORT": telemetry} if telemetry else {}
    with LocalStack(dps_instances=dps_instances, run_functions=functions, azure_quotas=azure_quotas,
                    extra_settings=extra) as stack:
        write_local_settings(stack.settings(), settings_path)
        info = _describe(stack, settings_path)
        from emulators.stack import write_private

        write_private(STACK_FILE, json.dumps(info, indent=2))  # names the identities and the identity endpoint
        _print_summary(info, out)
        out.flush()
        try:
            while not stop.wait(1.0):
                if stack.devhost is not None and stack.devhost.poll() is not None:
                    print(f"devhost exited with code {stack.devhost.returncode}; see {info['devhostLog']}", file=out)
                    break
        finally:
            STACK_FILE.unlink(missing_ok=True)
    print("local stack stopped", file=out)
    return 0


def _up_detached(dps_instances: int, functions: bool, out: TextIO, azure_quotas: bool, telemetry: str | None) -> int:
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = STATE_DIR / "stack.log"
    args = [sys.executable, "-m", "pkictl", "local", "up", "--dps-instances", str(dps_instances)]
    if not functions:
        args.append("--no-functions")
    if azure_quotas:
        args.append("--azure-quotas")
    if telemetry:
        args += ["--telemetry", telemetry]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=Path.cwd())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _running(out)
        if info and info.get("pid") == child.pid and info.get("ready"):
            _print_summary(info, out)
            return 0
        if child.poll() is not None:
            print(f"the local stack failed to start (exit {child.returncode}); last lines of {log_path}:", file=out)
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-20:]), file=out)
            return 1
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGTERM)
    print(f"the local stack was not ready within {READY_TIMEOUT_S}s; see {log_path}", file=out)
    return 1


def down(out: TextIO) -> int:
    info = _running(out)
    if not info:
        STACK_FILE.unlink(missing_ok=True)
        print("no local stack is running", file=out)
        return 0
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _is_stack(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _is_stack(pid):
        os.kill(pid, signal.SIGKILL)
    STACK_FILE.unlink(missing_ok=True)
    print(f"local stack (pid {pid}) stopped", file=out)
    return 0


def env(principal: str, out: TextIO) -> int:
    """Shell lines that make later `pkictl` commands act as ``principal`` (what `az login` is on Azure)."""
    info = _running(out)
    if not info:
        print("no local stack is running; `pkictl local up --detach` starts one", file=out)
        return 1
    if principal not in info["principals"]:
        print(f"no local identity {principal!r}; there are {', '.join(info['principals'])}", file=out)
        return 2
    print(f"export AZURE_CLIENT_ID={info['principals'][principal]['clientId']}", file=out)
    # a person's shell has no Functions-host identity settings: storage then uses AZURE_CLIENT_ID as well
    print("export AzureWebJobsStorage__credential= AzureWebJobsStorage__clientId=", file=out)
    return 0


def status(out: TextIO) -> int:
    info = _running(out)
    if not info:
        print("no local stack is running; `pkictl local up --detach` starts one", file=out)
        return 1
    _print_summary(info, out)
    return 0
