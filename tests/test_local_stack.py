"""`pkictl local up --detach` / `down` as a person runs them: ready, usable by other commands, gone after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


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


def test_local_up_detach_then_down_leaves_nothing_running(tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "PKI_LOCAL_DIR": str(tmp_path / "state")}
    up = pkictl(["local", "up", "--detach", "--dps-instances", "1"], tmp_path, env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "local stack is up" in up.stdout
    info = json.loads((tmp_path / "state" / "stack.json").read_text())
    processes = [info["pid"], *_children_of(info["pid"])]
    assert len(processes) >= 3  # the stack process, Azurite (node), devhost
    values = json.loads((tmp_path / "local.settings.json").read_text())["Values"]
    for key in ("AzureWebJobsStorage", "KEY_VAULT_URL", "DPS_INSTANCES", "IOT_HUB_CONNECTION_STRINGS"):
        assert key in values
    assert all("127.0.0.1" in u for u in (values["KEY_VAULT_URL"], values["DPS_DEVICE_ENDPOINT"]))
    assert oct((tmp_path / "local.settings.json").stat().st_mode)[-3:] == "600"
    try:
        status = pkictl(["local", "status"], tmp_path, env)
        assert status.returncode == 0 and "Key Vault emulator" in status.stdout
        again = pkictl(["local", "up", "--detach"], tmp_path, env)
        assert again.returncode == 1 and "running already" in again.stdout
        created = pkictl(["root", "create"], tmp_path, env)  # reads local.settings.json: the stack's storage
        assert created.returncode == 0, created.stderr
        assert not (tmp_path / "state" / "keystore").exists()  # the key went to the Key Vault emulator
        shown = pkictl(["root", "show", "--json"], tmp_path, env)
        assert json.loads(shown.stdout)["keyType"] == "ec-p384"
        sent = pkictl(["send", "onboarding", "--customer", "fabrikam", "--country", "NL", "--base64"], tmp_path, env)
        assert sent.returncode == 0, sent.stderr
        deadline, record = time.monotonic() + 60, {}
        while time.monotonic() < deadline and record.get("status") != "active":  # devhost runs function_app
            time.sleep(0.5)
            shown = pkictl(["customer", "show", "fabrikam"], tmp_path, env)
            record = json.loads(shown.stdout) if shown.returncode == 0 else {}
        assert record.get("status") == "active", (tmp_path / "state" / "devhost.log").read_text()[-3000:]
        listed = pkictl(["customer", "list"], tmp_path, env).stdout
        assert listed.startswith("fabrikam") and "active" in listed
        refused = pkictl(["send", "onboarding", "--customer", "Fabrikam"], tmp_path, env)
        assert refused.returncode == 2 and "customerId: 'Fabrikam' must be lowercase" in refused.stderr
    finally:
        down = pkictl(["local", "down"], tmp_path, env)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.2)
    assert not [p for p in processes if _alive(p)]
    assert pkictl(["local", "status"], tmp_path, env).returncode == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")
