"""ACCEPTANCE for device batches, with the real clients on Azurite + the emulators; intake and chunks run
in-process here (tests/test_batches_e2e.py runs them under devhost)."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from clients.factory import DpsRegistrar
from handlers.records import device_document
from pki.keys import KeyType, generate_key

from .batch_helpers import csr_pem, drain_chunks, intake, onboarded, report, upload, wired_env
from .x509_helpers import openssl_verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storage(own_azurite):
    return own_azurite


@pytest.fixture
def stack(fresh_stack):
    """Emulators of each test's own: every test onboards "acme", whose DPS group must be new."""
    with fresh_stack(dps_instances=1) as fresh:
        yield fresh


@pytest.fixture
def env(storage, stack):
    storage.queue_client("batch-chunks").clear_messages()  # a test's leftovers belong to another state container
    return wired_env(storage, stack, BATCH_CHUNK_ROWS="250", BATCH_CHUNK_LEASE_SECONDS="5")


def _certificate(services, path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(services.files.get(path))


def test_1000_generated_keys_and_200_csrs_verify_open_and_register(env, stack):
    services = onboarded(env, "acme", stack)
    customer = services.store.get("customers/acme.json").data
    intermediate = x509.load_pem_x509_certificate(customer["intermediate"]["certificatePem"].encode())
    root = x509.load_pem_x509_certificate(services.store.get("root-ca.json").data["certificatePem"].encode())
    csv = "deviceId\r\n" + "".join(f"gen-{i:04d}\r\n" for i in range(1000))
    path = upload(services, "acme", "generated.csv", csv.encode(), {"register": "20"})
    assert "1000 rows in 4 chunks" in intake(services, path)
    drain_chunks(services, env, registrar=DpsRegistrar(stack.device_endpoint_url, str(stack.ca_path)))
    result = report(services, "acme", "generated.csv")
    assert result["totals"] == {"rows": 1000, "issued": 1000, "already_issued": 0, "failed": 0}
    secret = result["pfxPasswordSecret"]
    password = services.secrets.get_secret(secret["name"], secret["version"]).encode()  # from Key Vault only
    assert password.decode() not in json.dumps(result)
    for row in result["rows"]:
        chain = _certificate(services, row["chain"])
        assert chain[1:] == [intermediate, root] and chain[0].serial_number == int(row["serial"], 16)
        chain[0].verify_directly_issued_by(intermediate)
        key, cert, extra = pkcs12.load_key_and_certificates(services.files.get(row["pfx"]), password)
        assert cert == chain[0] and extra == [intermediate, root]  # the full chain, root included
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    first = _certificate(services, result["rows"][0]["chain"])
    verified = openssl_verify(root, first[0], intermediate, at=first[0].not_valid_before_utc.replace(microsecond=0))
    assert verified.returncode == 0, verified.stderr
    registered = [r for r in result["rows"] if r.get("assignedHub")]
    assert len(registered) == 20 and all(r["assignedHub"] == stack.iothub.hostname for r in registered)
    assert services.hubs.device(stack.iothub.hostname, "gen-0019")["status"] == "enabled"

    keys = {f"csr-{i:03d}": generate_key(KeyType.EC_P256) for i in range(200)}
    lines = "".join(json.dumps({"deviceId": d, "csr": csr_pem(d, k)}) + "\n" for d, k in keys.items())
    path = upload(services, "acme", "with-csrs.jsonl", lines.encode())
    intake(services, path)
    drain_chunks(services, env)
    result = report(services, "acme", "with-csrs.jsonl")
    assert result["totals"] == {"rows": 200, "issued": 200, "already_issued": 0, "failed": 0}
    assert result["pfxPasswordSecret"] is None  # no key was generated: no password exists
    for row in result["rows"]:
        cert = _certificate(services, row["certificate"])[0]
        cert.verify_directly_issued_by(intermediate)
        assert cert.public_key().public_numbers() == keys[row["deviceId"]].public_key().public_numbers()
        assert row["pfx"] is None and row["key"] is None


def _assert_one_recorded_certificate_each(services, result: dict) -> None:
    for row in result["rows"]:
        record = services.store.get(device_document(row["deviceId"])).data
        on_file = _certificate(services, record["outputs"]["certificate"])[0]
        assert format(on_file.serial_number, "X") == record["serial"] == row["serial"]


def test_the_same_batch_twice_concurrently_issues_each_device_once(env):
    services = onboarded(env, "acme")
    path = upload(services, "acme", "twice.csv", ("deviceId\n" + "".join(f"d-{i}\n" for i in range(600))).encode())
    outcomes: list = []

    def trigger():
        try:
            outcomes.append(intake(services, path))
        except Exception as exc:  # noqa: BLE001 - "in progress elsewhere, retry" is a fine answer for the second
            outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("600 rows in 3 chunks" in o for o in outcomes) == 1, outcomes
    assert any("no-op" in o or "in progress elsewhere" in o for o in outcomes), outcomes
    drainers = [threading.Thread(target=drain_chunks, args=(services, env)) for _ in range(2)]
    for t in drainers:
        t.start()
    for t in drainers:
        t.join()
    assert "no-op" in intake(services, path)  # the trigger fired again, later
    result = report(services, "acme", "twice.csv")
    assert result["totals"]["issued"] + result["totals"]["already_issued"] == 600
    _assert_one_recorded_certificate_each(services, result)


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


def test_a_crash_mid_chunk_then_resume_leaves_one_certificate_per_device(env):
    import datetime as dt

    from handlers import batch_chunk
    from handlers.records import ChunkMessage

    services = onboarded(env, "acme")
    path = upload(services, "acme", "crash.csv", ("deviceId\n" + "".join(f"c-{i}\n" for i in range(250))).encode())
    intake(services, path)
    message = ChunkMessage("acme", "crash.csv", 0)
    kwargs = {"files": services.files, "store": services.store, "keys": services.keys,
              "secrets_store": services.secrets, "audit": services.audit, "settings": services.batches}
    with pytest.raises(BaseException, match="worker killed"):
        batch_chunk.process_chunk(message, outputs=CrashingOutputs(services.files, 300),
                                  now=dt.datetime.now(dt.UTC), **kwargs)
    partly = sum(1 for _ in services.store.find("\"kind\" = 'device' AND \"customer\" = 'acme'"))
    assert 0 < partly < 250
    # The next delivery waits for the dead worker's lease (5 s here) to run out, then takes the chunk over.
    batch_chunk.process_chunk(message, outputs=services.files, now=dt.datetime.now(dt.UTC), **kwargs)
    result = report(services, "acme", "crash.csv")
    assert result["totals"]["issued"] + result["totals"]["already_issued"] == 250
    _assert_one_recorded_certificate_each(services, result)


BAD_BATCHES = [
    ("empty.csv", b"", {}, "file", "is empty"),
    ("no-header.csv", b"dev-1\ndev-2\n", {}, "header", "a header row is required"),
    ("wrong-columns.csv", b"id,certificate\nd1,x\n", {}, "header", "must name a deviceId column"),
    ("extra-column.csv", b"deviceId,csr,colour\nd1,,red\n", {}, "header",
     "columns must be deviceId and optionally csr"),
    ("header-only.csv", b"deviceId\n", {}, "file", "no device rows"),
    ("too-many.csv", b"deviceId\n" + b"".join(b"d%d\n" % i for i in range(6)), {}, "file", "more than 5 rows"),
    ("bad-option.csv", b"deviceId\nd1\n", {"keytype": "rsa-1024"}, "metadata.keytype", "not a key type"),
    ("typo-option.csv", b"deviceId\nd1\n", {"keytyp": "ec-p256"}, "metadata.keytyp", "unknown batch option"),
    ("bad-days.csv", b"deviceId\nd1\n", {"validitydays": "forever"}, "metadata.validitydays", "whole number"),
    ("binary.csv", b"deviceId\n\xff\xfe\n", {}, None, None),  # row-level: reported per row below
]


@pytest.mark.parametrize("name, data, metadata, field, reason", [b for b in BAD_BATCHES if b[3]])
def test_a_bad_batch_is_rejected_with_a_report_and_nothing_is_issued(env, name, data, metadata, field, reason):
    services = onboarded(env, "acme")
    path = upload(services, "acme", name, data, metadata)
    services_limit = services.batches.__class__(**{**services.batches.__dict__, "max_rows": 5})
    import datetime as dt

    from handlers import batch_intake

    outcome = batch_intake.intake_batch(path, files=services.files, outputs=services.files, store=services.store,
                                        queue=services.queue, secrets_store=services.secrets, audit=services.audit,
                                        settings=services_limit, now=dt.datetime.now(dt.UTC))
    assert "rejected" in outcome
    result = report(services, "acme", name)
    assert result["status"] == "rejected" and result["field"] == field and reason in result["reason"]
    csv_report = services.files.get(f"device-batches-results/acme/{name}.csv").decode()
    assert csv_report.startswith("status,reason") and "rejected" in csv_report
    assert list(services.store.find("\"kind\" = 'device'")) == []


def test_unknown_or_inactive_customer_rejects_the_batch(env):
    services = onboarded(env, "acme")
    path = upload(services, "ghost", "b.csv", b"deviceId\nd1\n")
    assert "rejected" in intake(services, path)
    assert "no customer 'ghost'" in report(services, "ghost", "b.csv")["reason"]
    record = services.store.get("customers/acme.json")
    services.store.replace(record, {**record.data, "status": "disabled"})
    path = upload(services, "acme", "while-disabled.csv", b"deviceId\nd1\n")
    intake(services, path)
    assert "is disabled, not active" in report(services, "acme", "while-disabled.csv")["reason"]
    assert list(services.store.find("\"kind\" = 'device'")) == []


def test_bad_rows_fail_by_row_and_the_rest_are_issued(env):
    services = onboarded(env, "acme")
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import rsa

    from .x509_helpers import break_signature, make_csr

    weak = make_csr("weak-rsa", key=rsa.generate_private_key(65537, 1024)).decode()
    broken = base64.b64encode(break_signature(make_csr("broken-csr"))).decode()
    broken_pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + broken + "\n-----END CERTIFICATE REQUEST-----\n"
    rows = [
        "ok-1,", "ok-1,", "Upper-Case,", "a" * 65 + ",", "ends-with-dot.,", "space id,",
        f'cn-mismatch,"{csr_pem("someone-else")}"', f'weak-rsa,"{weak}"', f'broken-csr,"{broken_pem}"',
        'not-pem,"hello"', "too,many,cells", "=cmd|' /C calc'!A0,", "ok-2,",
    ]
    data = ("\ufeffdeviceId,csr\r\n" + "\r\n".join(rows) + "\r\n").encode()
    path = upload(services, "acme", "rows.csv", data)
    intake(services, path)
    drain_chunks(services, env)
    result = report(services, "acme", "rows.csv")
    errors = {r["row"]: r.get("error") or "" for r in result["rows"]}
    expected = {2: "duplicate of row 1", 3: "must be lowercase", 4: "at most 64 characters", 5: "must end in",
                6: "not allowed", 7: "does not match deviceId 'cn-mismatch'", 8: "RSA-1024 is not allowed",
                9: "signature does not verify", 10: "csr", 11: "has 3 cells, the header has 2", 12: "not allowed"}
    for row, text in expected.items():
        assert f"row {row}: " in errors[row] and text in errors[row], (row, errors[row])
    assert result["totals"] == {"rows": 13, "issued": 2, "already_issued": 0, "failed": 11}
    csv_report = services.files.get("device-batches-results/acme/rows.csv.csv").decode()
    assert "\n=cmd" not in csv_report and ",=cmd" not in csv_report and "'=cmd" in csv_report
    upload(services, "acme", "again.csv", b"deviceId\nok-1\nfresh-1\n")
    intake(services, "device-batches/acme/again.csv")
    drain_chunks(services, env)
    again = {r["deviceId"]: r for r in report(services, "acme", "again.csv")["rows"]}
    assert "already provisioned by batch 'rows.csv' (serial" in again["ok-1"]["error"]
    assert again["fresh-1"]["status"] == "issued"
    assert dt  # keeps the import used for readers following along


class FlakyQueue:
    """Fails once after the first message, as a storage hiccup would."""

    def __init__(self, real):
        self.real, self.sent, self.failed = real, 0, False

    def send(self, queue, message):
        if self.sent == 1 and not self.failed:
            self.failed = True
            from handlers.errors import TransientError

            raise TransientError("queue: HTTP 503")
        self.sent += 1
        self.real.send(queue, message)


def test_an_intake_that_fails_midway_is_finished_by_the_retry(env):
    import datetime as dt

    from handlers import batch_intake
    from handlers.errors import TransientError

    services = onboarded(env, "acme")
    path = upload(services, "acme", "flaky.csv", ("deviceId\n" + "".join(f"f-{i}\n" for i in range(600))).encode())
    flaky = FlakyQueue(services.queue)

    def run():
        return batch_intake.intake_batch(path, files=services.files, outputs=services.files, store=services.store,
                                         queue=flaky, secrets_store=services.secrets, audit=services.audit,
                                         settings=services.batches, now=dt.datetime.now(dt.UTC))

    with pytest.raises(TransientError):
        run()
    assert "sent again" in run()  # the host's retry: not locked out by the failed run's lease, nothing rescanned
    drain_chunks(services, env)
    assert report(services, "acme", "flaky.csv")["totals"]["issued"] == 600


def test_a_customer_disabled_mid_batch_fails_the_remaining_rows_and_the_batch_completes(env):
    services = onboarded(env, "acme")
    path = upload(services, "acme", "mid.csv", ("deviceId\n" + "".join(f"m-{i}\n" for i in range(300))).encode())
    intake(services, path)
    record = services.store.get("customers/acme.json")
    services.store.replace(record, {**record.data, "status": "disabled"})
    drain_chunks(services, env)
    result = report(services, "acme", "mid.csv")
    assert result["totals"] == {"rows": 300, "issued": 0, "already_issued": 0, "failed": 300}
    assert "customer acme is disabled, not active" in result["rows"][0]["error"]


def test_metadata_and_tags_changed_after_the_upload_neither_break_the_batch_nor_redefine_it(env):
    """Event Grid raises BlobCreated on the upload only (learn.microsoft.com/azure/event-grid/
    event-schema-blob-storage): options are what the upload carried when the intake ran. A metadata change
    after it changes the blob's ETag but not the upload: the chunks still read it, a repeated trigger is a
    no-op, and the report states the options used. Only an overwrite is another upload."""
    services = onboarded(env, "acme")
    path = upload(services, "acme", "late.csv", b"deviceId\nlate-1\nlate-2\n", {"output": "pem"})
    assert "2 rows in 1 chunks" in intake(services, path)
    blob = services.files._service.get_blob_client("device-batches", "acme/late.csv")  # noqa: SLF001 - test set-up
    blob.set_blob_metadata({"output": "pfx", "validitydays": "30"})
    blob.set_blob_tags({"stage": "tagged"})
    assert "no-op" in intake(services, path)  # e.g. Event Grid delivering the event twice
    outcomes = drain_chunks(services, env)
    result = report(services, "acme", "late.csv")
    assert result["totals"]["issued"] == 2 and result["options"]["output"] == "pem", outcomes
    upload(services, "acme", "late.csv", b"deviceId\nother\n")  # overwritten: another upload, another name needed
    with pytest.raises(Exception, match="was used already"):
        intake(services, path)
