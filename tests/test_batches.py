"""ACCEPTANCE for device batches, with the real clients on Azurite + the emulators; intake and chunks run
in-process here (tests/test_batches_e2e.py runs them under devhost). The batch logic itself (bad batches and rows,
crashes, re-sends, customers disabled midway) is tested on fakes in tests/test_batch_logic.py; what stays here is
what only the real services show: Key Vault signing, PFXs and chains openssl reads, registration through DPS,
blob ETags under concurrency, and Azurite's upload identity (creation time) under metadata changes."""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from clients.factory import DpsRegistrar
from handlers.device_files import certificate_on_file
from handlers.errors import TransientError
from handlers.records import DeviceRecord, device_document
from pki.keys import KeyType, generate_key

from .batch_helpers import csr_pem, drain_chunks, intake, onboarded, report, upload, wired_env
from .fakes import run_concurrently
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
    return wired_env(storage, stack, BATCH_CHUNK_ROWS="20", BATCH_CHUNK_LEASE_SECONDS="5")


def _certificate(services, path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(services.files.get(path))


def test_generated_keys_and_csrs_verify_open_and_register(env, stack):
    services = onboarded(env, "acme", stack)
    customer = services.store.get("customers/acme.json").data
    intermediate = x509.load_pem_x509_certificate(customer["intermediate"]["certificatePem"].encode())
    root = x509.load_pem_x509_certificate(services.store.get("root-ca.json").data["certificatePem"].encode())
    csv = "deviceId\r\n" + "".join(f"gen-{i:04d}\r\n" for i in range(40))
    path = upload(services, "acme", "generated.csv", csv.encode(), {"register": "4"})
    assert "40 rows in 2 chunks" in intake(services, path)
    drain_chunks(services, env, registrar=DpsRegistrar(stack.device_endpoint_url, str(stack.ca_path)))
    result = report(services, "acme", "generated.csv")
    assert result["totals"] == {"rows": 40, "issued": 40, "already_issued": 0, "failed": 0}
    secret = result["pfxPasswordSecret"]
    password = services.secrets.get_secret(secret["name"], secret["version"]).encode()  # from Key Vault only
    assert password.decode() not in json.dumps(result)
    for row in result["rows"]:
        key, cert, extra = pkcs12.load_key_and_certificates(services.files.get(row["output"]), password)
        assert extra == [intermediate, root]  # the full chain, root included
        assert cert == x509.load_pem_x509_certificate(row["certificatePem"].encode())
        assert cert.serial_number == int(row["serial"], 16)
        cert.verify_directly_issued_by(intermediate)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    first = x509.load_pem_x509_certificate(result["rows"][0]["certificatePem"].encode())
    verified = openssl_verify(root, first, intermediate, at=first.not_valid_before_utc.replace(microsecond=0))
    assert verified.returncode == 0, verified.stderr
    registered = [r for r in result["rows"] if r.get("assignedHub")]
    assert len(registered) == 4 and all(r["assignedHub"] == stack.iothub.hostname for r in registered)
    assert services.hubs.device(stack.iothub.hostname, "gen-0003")["status"] == "enabled"

    keys = {f"csr-{i:03d}": generate_key(KeyType.EC_P256) for i in range(10)}
    lines = "".join(json.dumps({"deviceId": d, "csr": csr_pem(d, k)}) + "\n" for d, k in keys.items())
    path = upload(services, "acme", "with-csrs.jsonl", lines.encode())
    intake(services, path)
    drain_chunks(services, env)
    result = report(services, "acme", "with-csrs.jsonl")
    assert result["totals"] == {"rows": 10, "issued": 10, "already_issued": 0, "failed": 0}
    assert result["pfxPasswordSecret"] is None  # no key was generated: no password exists
    for row in result["rows"]:
        chain = _certificate(services, row["output"])  # the full chain, and no key
        assert chain[1:] == [intermediate, root] and b"PRIVATE KEY" not in services.files.get(row["output"])
        chain[0].verify_directly_issued_by(intermediate)
        assert chain[0].public_key().public_numbers() == keys[row["deviceId"]].public_key().public_numbers()


def _assert_one_recorded_certificate_each(services, result: dict) -> None:
    for row in result["rows"]:
        record = DeviceRecord.from_json(services.store.get(device_document(row["deviceId"])).data)
        on_file = certificate_on_file(record, files=services.files, secrets=services.secrets)
        assert format(on_file.serial_number, "X") == record.serial == row["serial"]
        assert on_file == x509.load_pem_x509_certificate(record.certificate_pem.encode())


def test_the_same_batch_twice_concurrently_issues_each_device_once(env):
    services = onboarded(env, "acme")
    path = upload(services, "acme", "twice.csv", ("deviceId\n" + "".join(f"d-{i}\n" for i in range(60))).encode())
    # "in progress elsewhere, retry" is a fine answer for the second
    done, refused = run_concurrently(lambda: intake(services, path), 2, expected=(TransientError,))
    outcomes = done + [str(e) for e in refused]
    assert sum("60 rows in 3 chunks" in o for o in outcomes) == 1, outcomes
    assert any("no-op" in o or "in progress elsewhere" in o for o in outcomes), outcomes
    run_concurrently(lambda: drain_chunks(services, env), 2)
    assert "no-op" in intake(services, path)  # the trigger fired again, later
    result = report(services, "acme", "twice.csv")
    assert result["totals"]["issued"] + result["totals"]["already_issued"] == 60
    _assert_one_recorded_certificate_each(services, result)


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
    time.sleep(1.1)  # an upload is known by its creation time, in whole seconds (clients/blob_files.upload_of)
    upload(services, "acme", "late.csv", b"deviceId\nother\n")  # overwritten: another upload, another name needed
    with pytest.raises(Exception, match="was used already"):
        intake(services, path)
