"""The batch use cases (intake, chunks, report) on in-memory fakes, with chunks of 2 rows: what a batch of
thousands shows on Azurite (several chunks, concurrency, crashes, re-sends), in milliseconds. The Azurite
acceptance tests (``test_batches.py``, ``test_batches_e2e.py``) keep one real run per trigger."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from handlers.errors import TransientError
from handlers.leases import lease_for
from handlers.records import BatchSettings, device_document
from pki.keys import KeyType, generate_key

from .batch_helpers import csr_pem
from .fakes import run_concurrently
from .worlds import FakeApp
from .x509_helpers import break_signature, make_csr

ROWS_PER_CHUNK = 2


@pytest.fixture
def app(tmp_path) -> FakeApp:
    app = FakeApp(tmp_path, BatchSettings(chunk_rows=ROWS_PER_CHUNK, inflight=2, chunk_lease_s=5))
    app.onboard("acme")
    return app


def _csv(prefix: str, rows: int) -> bytes:
    return ("deviceId\n" + "".join(f"{prefix}-{i}\n" for i in range(rows))).encode()


def _one_recorded_certificate_each(app: FakeApp, report: dict) -> None:
    for row in report["rows"]:
        record = app.store.get(device_document(row["deviceId"])).data
        password = app.wired.secrets.get_secret(record["pfxSecret"]["name"], record["pfxSecret"]["version"])
        on_file = pkcs12.load_key_and_certificates(app.files.get(record["outputs"]["pfx"]), password.encode())[1]
        assert on_file == x509.load_pem_x509_certificate(record["certificatePem"].encode())
        assert format(on_file.serial_number, "X") == record["serial"] == row["serial"]


def test_generated_keys_and_csrs_give_one_output_each_with_the_full_chain_and_a_password_only_secrets_hold(app):
    customer = app.store.get("customers/acme.json").data
    intermediate = x509.load_pem_x509_certificate(customer["intermediate"]["certificatePem"].encode())
    root = x509.load_pem_x509_certificate(app.store.get("root-ca.json").data["certificatePem"].encode())
    path = app.put("acme/generated.csv", _csv("gen", 5))
    assert "5 rows in 3 chunks" in app.intake(path)
    assert len(app.run_chunks()) == 3
    report = app.report("acme/generated.csv")
    assert report["totals"] == {"rows": 5, "issued": 5, "already_issued": 0, "failed": 0}
    secret = report["pfxPasswordSecret"]
    password = app.wired.secrets.get_secret(secret["name"], secret["version"]).encode()
    assert password.decode() not in json.dumps(report)
    chains = {serial: [x509.load_pem_x509_certificate(p.encode()) for p in pems]
              for serial, pems in report["issuers"].items()}
    outputs = [p for p in app.files.blobs if p.startswith("device-certificates/")]
    assert sorted(outputs) == [f"device-certificates/acme/generated.csv/gen-{i}.pfx" for i in range(5)]
    for row in report["rows"]:
        assert row["output"] == f"device-certificates/acme/generated.csv/{row['deviceId']}.pfx"
        key, cert, extra = pkcs12.load_key_and_certificates(app.files.get(row["output"]), password)
        assert extra == [intermediate, root] == chains[row["issuerSerial"]]  # the full chain, root included
        assert cert == x509.load_pem_x509_certificate(row["certificatePem"].encode())
        assert cert.serial_number == int(row["serial"], 16)
        cert.verify_directly_issued_by(intermediate)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    keys = {f"csr-{i}": generate_key(KeyType.EC_P256) for i in range(3)}
    lines = "".join(json.dumps({"deviceId": d, "csr": csr_pem(d, k)}) + "\n" for d, k in keys.items())
    app.intake(app.put("acme/with-csrs.jsonl", lines.encode()))
    app.run_chunks()
    report = app.report("acme/with-csrs.jsonl")
    assert report["totals"] == {"rows": 3, "issued": 3, "already_issued": 0, "failed": 0}
    assert report["pfxPasswordSecret"] is None  # no key was generated: no password exists
    for row in report["rows"]:
        assert row["output"].endswith(f"/{row['deviceId']}.pem")
        chain = x509.load_pem_x509_certificates(app.files.get(row["output"]))  # the full chain, no key
        assert b"PRIVATE KEY" not in app.files.get(row["output"]) and chain[1:] == [intermediate, root]
        chain[0].verify_directly_issued_by(intermediate)
        assert chain[0].public_key().public_numbers() == keys[row["deviceId"]].public_key().public_numbers()


def test_an_issued_device_costs_two_storage_writes_its_output_and_its_record(tmp_path):
    app = FakeApp(tmp_path, BatchSettings(chunk_rows=50))
    app.onboard("acme")
    app.intake(app.put("acme/count.csv", _csv("w", 40)))
    files, store = app.files.writes, app.store.writes
    app.run_chunks()
    outputs = [p for p in app.files.blobs if p.startswith("device-certificates/")]
    assert len(outputs) == 40
    # besides: the two reports, and per chunk its record (claim, done) and the batch record's count and status
    assert app.files.writes - files == 40 + 2 and app.store.writes - store - 40 <= 5
    # the run counted its own requests at the ports, into the batch record: all but the report and the final status
    counted = app.store.get("batches/acme/count.csv.json").data["storage"]
    assert counted["writes"] == (app.files.writes - files - 2) + (app.store.writes - store - 1)
    assert 0 < counted["reads"] < 10  # per chunk, not per device: a first attempt reads no device record


@pytest.mark.parametrize("output", ["pfx", "pem"])
def test_export_splits_the_one_output_into_the_factory_files(app, output):
    from handlers.device_files import factory_files

    app.intake(app.put("acme/line.csv", _csv("f", 2), {"output": output}))
    app.run_chunks()
    w = app.wired
    record, files = factory_files("acme", "f-1", store=w.store, files=w.files, secrets=w.secrets, with_key=True)
    assert sorted(files) == sorted(["cert.pem", "chain.pem", "device.key", "root.pem",
                                    *(["device.pfx"] if output == "pfx" else [])])
    chain = x509.load_pem_x509_certificates(files["chain.pem"])
    assert chain[0] == x509.load_pem_x509_certificate(files["cert.pem"]) and len(chain) == 3
    assert chain[2] == x509.load_pem_x509_certificate(files["root.pem"])
    key = serialization.load_pem_private_key(files["device.key"], None)  # unencrypted, for the factory line
    assert key.public_key().public_numbers() == chain[0].public_key().public_numbers()
    assert format(chain[0].serial_number, "X") == record.serial
    _, without = factory_files("acme", "f-1", store=w.store, files=w.files, secrets=w.secrets, with_key=False)
    assert sorted(without) == ["cert.pem", "chain.pem", "root.pem"]


def test_the_same_batch_twice_concurrently_issues_each_device_once(app):
    path = app.put("acme/twice.csv", _csv("d", 6))
    # "in progress elsewhere, retry" is a fine answer for the second
    done, refused = run_concurrently(lambda: app.intake(path), 2, expected=(TransientError,))
    outcomes = done + [str(e) for e in refused]
    assert sum("6 rows in 3 chunks" in o for o in outcomes) == 1, outcomes
    assert any("no-op" in o or "in progress elsewhere" in o for o in outcomes), outcomes
    run_concurrently(app.run_chunks, 2)
    assert "no-op" in app.intake(path)  # the trigger fired again, later
    report = app.report("acme/twice.csv")
    assert report["totals"]["issued"] == 6 and report["totals"]["already_issued"] == 0
    _one_recorded_certificate_each(app, report)


class CrashingOutputs:
    """Outputs that die after ``limit`` writes, as a worker killed mid-chunk would."""

    def __init__(self, real, limit: int):
        self.real, self.limit, self.lock = real, limit, threading.Lock()

    def put(self, *args, **kwargs):
        with self.lock:
            self.limit -= 1
            if self.limit < 0:
                raise SystemExit("worker killed")
        return self.real.put(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_crash_mid_chunk_then_the_retry_leaves_one_certificate_per_device(tmp_path):
    app = FakeApp(tmp_path, BatchSettings(chunk_rows=ROWS_PER_CHUNK, inflight=1))
    app.onboard("acme")
    app.intake(app.put("acme/crash.csv", _csv("c", 2)))
    # one output per device: the first device is written and recorded, the second dies writing its output
    with pytest.raises(SystemExit, match="worker killed"):
        app.chunk("acme", "crash.csv", 0, outputs=CrashingOutputs(app.files, 1))
    assert [d["deviceId"] for d in app.documents("device")] == ["c-0"]
    app.chunk("acme", "crash.csv", 0)  # the host's retry: the released lease is not in its way
    report = app.report("acme/crash.csv")
    assert report["totals"]["issued"] + report["totals"]["already_issued"] == 2
    _one_recorded_certificate_each(app, report)


def test_a_dead_workers_chunk_is_taken_over_once_its_lease_runs_out_and_not_before(app):
    app.intake(app.put("acme/dead.csv", _csv("x", 2)))
    chunk = "batches/acme/dead.csv/chunks/000000.json"
    app.store.create(chunk, {"status": "issuing", "attempts": 1,
                             "lease": lease_for("dead-worker", app.now + dt.timedelta(seconds=3))})
    waited: list[float] = []
    assert "complete" in app.chunk("acme", "dead.csv", 0, sleep=waited.append)
    # slept until the dead worker's lease ran out (stamps are whole seconds), then took the chunk over
    assert 2 <= sum(waited) <= 3.5
    assert app.store.get(chunk).data["attempts"] == 2
    app.store.replace(app.store.get(chunk), {**app.store.get(chunk).data, "status": "issuing",
                                             "lease": lease_for("live-worker", app.now + dt.timedelta(hours=1))})
    with pytest.raises(TransientError, match="being issued elsewhere"):
        app.chunk("acme", "dead.csv", 0, sleep=lambda s: None)


BAD_BATCHES = [
    ("empty.csv", b"", {}, "file", "is empty"),
    ("no-header.csv", b"dev-1\ndev-2\n", {}, "header", "a header row is required"),
    ("wrong-columns.csv", b"id,certificate\nd1,x\n", {}, "header", "must name a deviceId column"),
    ("extra-column.csv", b"deviceId,csr,colour\nd1,,red\n", {}, "header",
     "columns must be deviceId and optionally csr"),
    ("header-only.csv", b"deviceId\n", {}, "file", "no device rows"),
    ("too-many.csv", _csv("d", 6), {}, "file", "more than 5 rows"),
    ("bad-option.csv", b"deviceId\nd1\n", {"keytype": "rsa-1024"}, "metadata.keytype", "not a key type"),
    ("typo-option.csv", b"deviceId\nd1\n", {"keytyp": "ec-p256"}, "metadata.keytyp", "unknown batch option"),
    ("bad-days.csv", b"deviceId\nd1\n", {"validitydays": "forever"}, "metadata.validitydays", "whole number"),
]


@pytest.mark.parametrize("name, data, metadata, field, reason", BAD_BATCHES)
def test_a_bad_batch_is_rejected_with_a_report_and_nothing_is_issued(tmp_path, name, data, metadata, field, reason):
    app = FakeApp(tmp_path, BatchSettings(chunk_rows=ROWS_PER_CHUNK, max_rows=5))
    app.onboard("acme")
    assert "rejected" in app.intake(app.put(f"acme/{name}", data, metadata))
    report = app.report(f"acme/{name}")
    assert report["status"] == "rejected" and report["field"] == field and reason in report["reason"]
    csv_report = app.report(f"acme/{name}", "csv")
    assert csv_report.startswith("status,reason") and "rejected" in csv_report
    assert app.documents("device") == [] and app.queue.sent == []


def test_an_unknown_or_inactive_customer_rejects_the_batch(app):
    assert "rejected" in app.intake(app.put("ghost/b.csv", b"deviceId\nd1\n"))
    assert "no customer 'ghost'" in app.report("ghost/b.csv")["reason"]
    record = app.store.get("customers/acme.json")
    app.store.replace(record, {**record.data, "status": "disabled"})
    app.intake(app.put("acme/while-disabled.csv", b"deviceId\nd1\n"))
    assert "is disabled, not active" in app.report("acme/while-disabled.csv")["reason"]
    assert app.documents("device") == []


def test_bad_rows_fail_by_row_and_the_rest_are_issued(app):
    weak = make_csr("weak-rsa", key=rsa.generate_private_key(65537, 1024)).decode()
    broken = base64.b64encode(break_signature(make_csr("broken-csr"))).decode()
    broken_pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + broken + "\n-----END CERTIFICATE REQUEST-----\n"
    rows = [
        "ok-1,", "ok-1,", "Upper-Case,", "a" * 65 + ",", "ends-with-dot.,", "space id,",
        f'cn-mismatch,"{csr_pem("someone-else")}"', f'weak-rsa,"{weak}"', f'broken-csr,"{broken_pem}"',
        'not-pem,"hello"', "too,many,cells", "=cmd|' /C calc'!A0,", "ok-2,",
    ]
    app.intake(app.put("acme/rows.csv", ("\ufeffdeviceId,csr\r\n" + "\r\n".join(rows) + "\r\n").encode()))
    app.run_chunks()
    report = app.report("acme/rows.csv")
    errors = {r["row"]: r.get("error") or "" for r in report["rows"]}
    expected = {2: "duplicate of row 1", 3: "must be lowercase", 4: "at most 64 characters", 5: "must end in",
                6: "not allowed", 7: "does not match deviceId 'cn-mismatch'", 8: "RSA-1024 is not allowed",
                9: "signature does not verify", 10: "csr", 11: "has 3 cells, the header has 2", 12: "not allowed"}
    for row, text in expected.items():
        assert f"row {row}: " in errors[row] and text in errors[row], (row, errors[row])
    assert report["totals"] == {"rows": 13, "issued": 2, "already_issued": 0, "failed": 11}
    csv_report = app.report("acme/rows.csv", "csv")
    assert "\n=cmd" not in csv_report and ",=cmd" not in csv_report and "'=cmd" in csv_report
    app.intake(app.put("acme/again.csv", b"deviceId\nok-1\nfresh-1\n"))
    app.run_chunks()
    again = {r["deviceId"]: r for r in app.report("acme/again.csv")["rows"]}
    assert "already provisioned by batch 'rows.csv' (serial" in again["ok-1"]["error"]
    assert again["fresh-1"]["status"] == "issued"


class FlakyQueue:
    """Fails once after the first message, as a storage hiccup would."""

    def __init__(self, real):
        self.real, self.sent, self.failed = real, 0, False

    def send(self, queue, message):
        if self.sent == 1 and not self.failed:
            self.failed = True
            raise TransientError("queue: HTTP 503")
        self.sent += 1
        self.real.send(queue, message)


def test_an_intake_that_fails_midway_is_finished_by_the_retry_which_resends_without_rescanning(app):
    path = app.put("acme/flaky.csv", _csv("f", 6))
    flaky = FlakyQueue(app.queue)
    with pytest.raises(TransientError):
        app.intake(path, queue=flaky)
    assert len(app.queue.sent) == 1
    assert "sent again" in app.intake(path, queue=flaky)  # not locked out by the failed run's lease
    assert len(app.queue.sent) == 4  # the first chunk twice: a chunk that ran already answers "done"
    app.run_chunks()
    assert app.report("acme/flaky.csv")["totals"] == {"rows": 6, "issued": 6, "already_issued": 0, "failed": 0}


def test_a_customer_disabled_mid_batch_fails_the_remaining_rows_and_the_batch_completes(app):
    app.intake(app.put("acme/mid.csv", _csv("m", 4)))
    _, first = app.queue.sent.pop(0)
    app.chunk("acme", "mid.csv", first["chunk"])
    record = app.store.get("customers/acme.json")
    app.store.replace(record, {**record.data, "status": "disabled"})
    app.run_chunks()
    report = app.report("acme/mid.csv")
    assert report["totals"] == {"rows": 4, "issued": 2, "already_issued": 0, "failed": 2}
    assert "customer acme is disabled, not active" in report["rows"][3]["error"]


def test_metadata_changed_after_the_upload_neither_breaks_the_batch_nor_redefines_it(app):
    """Options are what the upload carried when the intake ran (Event Grid raises BlobCreated on the upload only,
    learn.microsoft.com/azure/event-grid/event-schema-blob-storage). Only an overwrite is another upload."""
    path = app.put("acme/late.csv", b"deviceId\nlate-1\nlate-2\n", {"output": "pem"})
    assert "2 rows in 1 chunks" in app.intake(path)
    app.files.set_metadata(path, {"output": "pfx", "validitydays": "30"})
    assert "no-op" in app.intake(path)  # e.g. Event Grid delivering the event twice
    app.run_chunks()
    report = app.report("acme/late.csv")
    assert report["totals"]["issued"] == 2 and report["options"]["output"] == "pem"
    app.put("acme/late.csv", b"deviceId\nother\n")
    with pytest.raises(Exception, match="was used already"):
        app.intake(path)


def test_a_reissue_keeps_the_certificates_it_replaces_and_device_show_lists_them(app):
    """The device record's certificate history (#18): serial, notAfter, issuedAt, thumbprint and how each came."""
    import io

    from pkictl.cli import main as pkictl

    app.intake(app.put("acme/first.csv", _csv("hist", 1)))
    app.run_chunks()
    first = app.store.get(device_document("hist-0")).data
    assert first["issuedBy"] == "batch" and "previousCertificates" not in first
    app.intake(app.put("acme/again.csv", _csv("hist", 1), {"reissue": "true"}))
    app.run_chunks()
    second = app.store.get(device_document("hist-0")).data
    assert second["serial"] != first["serial"] and second["batch"] == "again.csv"
    assert second["previousCertificates"] == [{
        "serial": first["serial"], "notAfter": first["notAfter"], "issuedAt": first["issuedAt"],
        "thumbprintSha256": first["thumbprintSha256"], "issuedBy": "batch", "batch": "first.csv"}]
    out = io.StringIO()
    assert pkictl(["device", "show", "acme", "hist-0", "--json"], env={}, out=out, err=out,
                  connect=lambda _env: app.wired) == 0
    shown = json.loads(out.getvalue())
    assert [(c["serial"], c.get("current", False)) for c in shown["certificates"]] == [
        (second["serial"], True), (first["serial"], False)]
    out = io.StringIO()  # without --json: a summary for people, the current certificate starred, newest first
    assert pkictl(["device", "show", "acme", "hist-0"], env={}, out=out, err=out, connect=lambda _env: app.wired) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "device hist-0 of acme: issued"
    assert lines[-2].split()[:3] == ["*", second["serial"], "batch"] and lines[-1].split()[:2] == [first["serial"],
                                                                                               "batch"]
    out = io.StringIO()
    assert pkictl(["customer", "list", "--json"], env={}, out=out, err=out, connect=lambda _env: app.wired) == 0
    listed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {c["customerId"]: c["status"] for c in listed}["acme"] == "active"
