"""ACCEPTANCE for device batches under devhost (the deployed function_app): the CLI flow with its
progress and export, and a worker killed mid-chunk then resumed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from devhost.azurite import free_port
from devhost.stack import launch_devhost, person_settings
from emulators.stack import OPERATOR
from handlers.device_files import certificate_on_file
from handlers.records import DeviceRecord, device_document
from pkictl.cli import main

from .batch_helpers import onboarded, report, wired_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storage(own_azurite):
    return own_azurite


@pytest.fixture
def stack(fresh_stack):
    with fresh_stack(dps_instances=1) as stack:
        yield stack


@pytest.fixture
def env(storage, tmp_path, stack):
    values = wired_env(storage, stack, BATCH_CHUNK_ROWS="20", BATCH_CHUNK_LEASE_SECONDS="5", BATCH_INFLIGHT="4")
    host_json = tmp_path / "host.json"
    host_json.write_text(json.dumps({"version": "2.0", "extensions": {"queues": {
        "messageEncoding": "none", "maxDequeueCount": 5, "visibilityTimeout": "00:00:01",
        "maxPollingInterval": "00:00:00.200"}}}))
    return {**values, "_HOST_JSON": str(host_json), "_CA": str(stack.ca_path), "_OPERATOR": stack.client_id(OPERATOR)}


def devhost(env: dict, *extra: str, lease: float = 60) -> subprocess.Popen:
    """devhost on the app, once its Event Grid subscription exists (blobs uploaded from now on fire)."""
    settings = {k: v for k, v in env.items() if not k.startswith("_")}
    return launch_devhost(["--script-root", str(REPO), "--host-json", env["_HOST_JSON"], "--concurrency", "2",
                           "--log-level", "WARNING", "--message-lease", str(lease), *extra],
                          {"PATH": os.environ["PATH"], **settings}, stdout=subprocess.PIPE)


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    return process.communicate(timeout=60)[0]


def test_send_batch_follows_progress_to_the_report_and_export_gives_the_factory_files(env, tmp_path, stack):
    services = onboarded({k: v for k, v in env.items() if not k.startswith("_")}, "acme", stack)
    batch = tmp_path / "line-7.csv"
    batch.write_text("deviceId\n" + "".join(f"line7-{i:03d}\n" for i in range(40)))
    # the operator runs pkictl: send, follow, export with the key (Key Vault Secrets User), no signing role
    cli_env = person_settings({k: v for k, v in env.items() if not k.startswith("_")}, env["_OPERATOR"])
    # The host as Core Tools runs it: no Event Grid in front of Azurite; pkictl delivers the BlobCreated event to
    # the host's blob webhook (devhost serves it where Core Tools does: /runtime/webhooks/blobs).
    port = free_port()
    worker = devhost(env, "--event-grid", "webhook", "--webhook-port", str(port))
    try:
        out = io.StringIO()
        assert main(["send", "batch", str(batch), "--customer", "acme", "--register", "2", "--timeout", "300",
                     "--functions-host", f"http://127.0.0.1:{port}"], env=cli_env, out=out) == 0, out.getvalue()
    finally:
        stop(worker)
    text = out.getvalue()
    assert (f"BlobCreated event delivered to http://127.0.0.1:{port}/runtime/webhooks/blobs?"
            "functionName=Host.Functions.device_batch") in text
    # not a terminal: plain progress lines, no bar redrawn with \r (#19)
    assert "\nbatch line-7.csv: complete 40/40 (issued 40" in text and "\r" not in text and "[###" not in text
    assert "report: device-batches-results/acme/line-7.csv.json" in text and "Key Vault secret batch-acme-" in text
    result = report(services, "acme", "line-7.csv")
    assert sum(1 for r in result["rows"] if r.get("assignedHub")) == 2

    target = tmp_path / "factory"
    out = io.StringIO()
    assert main(["device", "export", "acme", "line7-001", "--out", str(target), "--include-key"], env=cli_env,
                out=out) == 0, out.getvalue()
    assert sorted(p.name for p in target.iterdir()) == ["cert.pem", "chain.pem", "device.key", "device.pfx",
                                                         "root.pem"]
    verified = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "chain.pem", "cert.pem"],
                              cwd=target, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert oct((target / "device.key").stat().st_mode)[-3:] == "600"
    key_check = subprocess.run(["openssl", "pkey", "-in", "device.key", "-pubout"], cwd=target, capture_output=True,
                               text=True)
    cert_key = subprocess.run(["openssl", "x509", "-in", "cert.pem", "-pubkey", "-noout"], cwd=target,
                              capture_output=True, text=True)
    assert key_check.stdout == cert_key.stdout
    assert "PRIVATE KEY" not in out.getvalue()
    # the exported chain (device, intermediate, root) registers, and the doctor finds nothing against DPS itself
    files = ["--cert", str(target / "cert.pem"), "--chain", str(target / "chain.pem")]
    out = io.StringIO()
    assert main(["device", "register", *files, "--key", str(target / "device.key")], env=cli_env, out=out) == 0, \
        out.getvalue()
    assert main(["doctor", *files, "--dps", "dps1"], env=cli_env, out=out) == 0, out.getvalue()
    out = io.StringIO()
    assert main(["doctor", "--cert", str(target / "cert.pem"), "--dps", "dps1"], env=cli_env, out=out) == 1
    assert "[missing-intermediate]" in out.getvalue() and "[root-not-verified]" in out.getvalue()


def test_a_worker_killed_mid_chunk_and_a_fresh_one_leave_one_certificate_per_device(env, tmp_path, storage):
    settings = {k: v for k, v in env.items() if not k.startswith("_")}
    services = onboarded(settings, "acme")
    rows = 200
    container = storage.blob_service().get_container_client("device-batches")
    try:
        container.create_container()
    except Exception:  # noqa: BLE001, S110 - it exists already
        pass
    first = devhost(env, lease=5)
    container.upload_blob("acme/killed.csv", ("deviceId\n" + "".join(f"k-{i:04d}\n" for i in range(rows))).encode())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        issued = sum(1 for _ in services.store.find("\"kind\" = 'device' AND \"customer\" = 'acme'"))
        if issued >= 20:
            break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # mid-chunk: some devices recorded, some outputs written, no record
    first.communicate(timeout=30)
    assert issued < rows
    second = devhost(env, lease=5)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            doc = services.store.get("batches/acme/killed.csv.json")
            if doc and doc.data["status"] == "complete":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"not complete: {doc.data.get('status') if doc else None}")
    finally:
        stop(second)
    result = report(services, "acme", "killed.csv")
    assert result["totals"]["failed"] == 0
    assert result["totals"]["issued"] + result["totals"]["already_issued"] == rows
    for row in result["rows"]:
        record = DeviceRecord.from_json(services.store.get(device_document(row["deviceId"])).data)
        on_file = certificate_on_file(record, files=services.files, secrets=services.secrets)  # the PFX, opened
        assert format(on_file.serial_number, "X") == record.serial == row["serial"]
        assert on_file == x509.load_pem_x509_certificate(record.certificate_pem.encode())
