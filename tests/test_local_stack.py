"""ACCEPTANCE: `pkictl local up --detach` / `down` as a person runs them. The stack runs the app the way
docs/deploy.md runs it on Azure (its managed identity; no key, SAS or connection string in any setting), people
act as their own identities, and the whole flow works on it; nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .core_tools import core_tools_problems
from .worlds import wait_for

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
# What a key or SAS looks like in a setting: an account key, a shared access key, a SAS token or a SAS query.
KEY_MARKERS = ("AccountKey=", "SharedAccessKey=", "SharedAccessSignature", "sig=")


def pkictl(args, cwd, env):
    return subprocess.run([sys.executable, "-m", "pkictl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    rows = [tuple(int(x) for x in line.split()) for line in out if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp, _ in rows if pp in frontier} - found
        found |= frontier
    return sorted(found)


def _as(principal: str, cwd: Path, env: dict) -> dict:
    """``env`` after `eval "$(pkictl local env PRINCIPAL)"`, as a person's shell would have it."""
    result = pkictl(["local", "env", principal], cwd, env)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = {}
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export"
        exported.update(word.split("=", 1) for word in words[1:])
    return {**env, **exported}


def _record(args: list[str], cwd: Path, env: dict) -> dict:
    shown = pkictl(args, cwd, env)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def test_local_up_runs_the_production_configuration_end_to_end_then_down_leaves_nothing_running(tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "PKI_LOCAL_DIR": str(tmp_path / "state")}
    up = pkictl(["local", "up", "--detach", "--dps-instances", "1"], tmp_path, env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "local stack is up" in up.stdout and "pki-operator" in up.stdout
    info = json.loads((tmp_path / "state" / "stack.json").read_text())
    processes = [info["pid"], *_children_of(info["pid"])]
    assert len(processes) >= 3  # the stack process, Azurite (node), devhost
    values = json.loads((tmp_path / "local.settings.json").read_text())["Values"]
    # The settings shape of docs/deploy.md: identity-based storage, the user-assigned identity, no key anywhere.
    assert not [(k, m) for k, v in values.items() for m in KEY_MARKERS if m in v]
    assert "AzureWebJobsStorage" not in values and "DPS_CONNECTION_STRINGS" not in values
    assert "IOT_HUB_CONNECTION_STRINGS" not in values
    assert values["AzureWebJobsStorage__credential"] == "managedidentity"
    assert (values["AzureWebJobsStorage__clientId"] == values["AZURE_CLIENT_ID"]
            == info["principals"]["pki-app"]["clientId"])
    assert values["AzureWebJobsStorage__blobServiceUri"].startswith("https://127.0.0.1:")
    assert all("127.0.0.1" in u for u in (values["KEY_VAULT_URL"], values["ROOT_CA_KEY_VAULT_URL"],
                                         values["DPS_DEVICE_ENDPOINT"], values["IDENTITY_ENDPOINT"]))
    assert values["KEY_VAULT_URL"] != values["ROOT_CA_KEY_VAULT_URL"]  # the root key's vault is another vault
    # owner-only: the settings (identity endpoint and header), the stack's description, the emulators' SAS keys
    for written in ("local.settings.json", "state/stack.json", "state/emulators/emulators.json"):
        assert oct((tmp_path / written).stat().st_mode)[-3:] == "600", written
    # and `func start` can take the same file (the README's Core Tools steps)
    assert core_tools_problems(json.loads((tmp_path / "local.settings.json").read_text())) == []
    try:
        status = pkictl(["local", "status"], tmp_path, env)
        assert status.returncode == 0 and "Key Vault emulator" in status.stdout and "root Key Vault" in status.stdout
        again = pkictl(["local", "up", "--detach"], tmp_path, env)
        assert again.returncode == 1 and "running already" in again.stdout
        admin, operator = _as("pki-admin", tmp_path, env), _as("pki-operator", tmp_path, env)

        created = pkictl(["root", "create"], tmp_path, admin)  # the PKI administrator's root ceremony
        assert created.returncode == 0, created.stderr
        assert not (tmp_path / "state" / "keystore").exists()  # the key went to the Key Vault emulator
        registered = pkictl(["root", "register", "--all"], tmp_path, admin)  # upload + proof of possession, via ARM
        assert registered.returncode == 0 and "DPS dps1: verified (pki-root-" in registered.stdout, registered.stderr
        shown = json.loads(pkictl(["root", "show", "--json"], tmp_path, operator).stdout)
        assert shown["keyType"] == "ec-p384" and shown["dps"]["dps1"].startswith("verified")
        signing = pkictl(["verification-cert", "--code", "ABC123"], tmp_path, operator)
        assert signing.returncode == 1 and "ForbiddenByRbac" in signing.stderr  # the operator cannot sign

        sent = pkictl(["send", "onboarding", "--customer", "fabrikam", "--country", "NL", "--base64"], tmp_path,
                      operator)
        assert sent.returncode == 0, sent.stderr
        customer = ["customer", "show", "fabrikam"]
        wait_for(lambda: _record(customer, tmp_path, operator).get("status") == "active", 120,
                 "fabrikam active")  # devhost runs function_app as pki-app
        listed = pkictl(["customer", "list"], tmp_path, operator).stdout
        assert listed.startswith("fabrikam") and "active" in listed
        refused = pkictl(["send", "onboarding", "--customer", "Fabrikam"], tmp_path, operator)
        assert refused.returncode == 2 and "customerId: 'Fabrikam' is not a customer id" in refused.stderr
        assert "it must be lowercase" in refused.stderr

        batch = pkictl(["send", "batch", str(REPO / "samples" / "generated-keys.csv"), "--customer", "fabrikam",
                        "--register", "all", "--timeout", "180"], tmp_path, operator)
        assert batch.returncode == 0, batch.stdout + batch.stderr
        exported = pkictl(["device", "export", "fabrikam", "sensor-0001", "--out", "sensor", "--include-key"],
                          tmp_path, operator)
        assert exported.returncode == 0, exported.stderr
        device = ["device", "register", "--cert", "sensor/cert.pem", "--chain", "sensor/chain.pem",
                  "--key", "sensor/device.key"]
        assert pkictl(device, tmp_path, operator).returncode == 0

        disable = pkictl(["send", "command", "disable-device", "--customer", "fabrikam", "--device", "sensor-0001",
                          "--reason", "acceptance: stolen"], tmp_path, operator)
        assert disable.returncode == 0, disable.stderr
        shown = ["device", "show", "fabrikam", "sensor-0001", "--json"]
        wait_for(lambda: (_record(shown, tmp_path, operator).get("lastCommand") or {}).get("applied"), 120,
                 "sensor-0001 disabled")
        record = _record(shown, tmp_path, operator)
        assert record["status"] == "disabled", record
        again = pkictl(device, tmp_path, operator)  # DPS: the disabled individual enrollment refuses it
        assert again.returncode == 1 and "401005" in again.stdout + again.stderr
        audit = pkictl(["audit", "--customer", "fabrikam", "--device", "sensor-0001"], tmp_path, operator).stdout
        assert "disable-device" in audit and "changed" in audit
        assert _hub_status(tmp_path / "state", "sensor-0001") == "disabled"  # the app reached the hub by token

        renew = pkictl(["send", "command", "renew-intermediate", "--customer", "fabrikam", "--reason", "yearly"],
                       tmp_path, operator)
        assert renew.returncode == 0, renew.stderr
        wait_for(lambda: len(_record(customer, tmp_path, operator).get("renewals", [])) == 1, 120, "the renewal")
        assert len(_record(customer, tmp_path, operator)["previousIntermediates"]) == 1
    finally:
        down = pkictl(["local", "down"], tmp_path, env)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.2)
    assert not [p for p in processes if _alive(p)]
    assert pkictl(["local", "status"], tmp_path, env).returncode == 1


def _hub_status(state: Path, device_id: str) -> str:
    """Read the hub emulator with its owner policy's SAS (kept in the stack's private state folder)."""
    from azure.iot.hub import IoTHubRegistryManager

    described = json.loads((state / "emulators" / "emulators.json").read_text())
    manager = IoTHubRegistryManager.from_connection_string(described["iotHub"]["connectionString"])
    manager.protocol.config.connection.verify = described["caPath"]
    return manager.get_device(device_id).status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")
