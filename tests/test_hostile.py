"""The hostile corpus (``tests/hostile/corpus.json``): every input ends as a recorded rejection or a failed row
naming its reason, and none is poisoned.

Each input goes through the app's own edge (``edge.queue`` with the handlers ``function_app`` wires), with
in-memory fakes at the ports: a handler that raises anything but ``Rejected`` is what the Functions host
retries and finally poisons, so a raise fails the test. Two customers share the service: ``acme`` (the
sender of most inputs) and ``beta``, which holds device ``shared-001`` and renewed its intermediate today.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .worlds import FakeApp

CORPUS = json.loads((Path(__file__).parent / "hostile" / "corpus.json").read_text())


class Csrs:
    """CSRs made at test time: ``ec`` (one key per name), ``rsa-e3`` (public exponent 3), ``sha1`` (signed with SHA-1,
    which cryptography no longer produces: made by the openssl command line)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path, self.keys = tmp_path, {}

    def __call__(self, kind: str, common_name: str, key_name: str | None = None) -> str:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        if kind == "sha1":
            key_path = self.tmp_path / f"sha1-{common_name}.key"
            key_path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            key_path.chmod(0o600)
            made = subprocess.run(["openssl", "req", "-new", "-sha1", "-key", str(key_path), "-subj",
                                   f"/CN={common_name}"], capture_output=True, check=True, text=True)
            return made.stdout.strip()
        if kind == "rsa-e3":
            key = rsa.generate_private_key(public_exponent=3, key_size=2048)
        else:
            key = self.keys.setdefault(key_name or common_name, ec.generate_private_key(ec.SECP256R1()))
        request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        return request.public_bytes(serialization.Encoding.PEM).decode().strip()


def body_of(spec, csrs: Csrs) -> bytes:
    if isinstance(spec, dict) and "generate" in spec:
        g = spec["generate"]
        return (g["prefix"] + g["repeat"] * g["times"] + g["suffix"]).encode()
    if isinstance(spec, dict) and "hex" in spec:
        return bytes.fromhex(spec["hex"])

    def csr(match: re.Match) -> str:
        pem = csrs(*match.group(2).split())
        return json.dumps(pem)[1:-1] if match.group(1) == "CSRJSON" else pem

    return re.sub(r"\{\{(CSR|CSRJSON) ([^}]+)\}\}", csr, spec).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> FakeApp:
    """acme and beta onboarded; beta issued ``shared-001`` and renewed its intermediate once, today."""
    service = FakeApp(tmp_path_factory.mktemp("hostile"))
    for customer in ("acme", "beta"):
        service.deliver("customer-onboarding", json.dumps({"customerId": customer}).encode())
    service.upload("beta/setup.csv", b"deviceId\nshared-001\nbeta-002\n", {})
    service.deliver("pki-commands", json.dumps({"command": "renew-intermediate", "customerId": "beta",
                                                "reason": "scheduled", "requestId": "storm-1"}).encode())
    assert {c["customerId"]: c["status"] for c in service.documents("customer")} == {"acme": "active", "beta": "active"}
    assert service.wired.store.get("devices/shared-001.json").data["customerId"] == "beta"
    return service


def _failures(service: FakeApp) -> set[str]:
    return set(service.wired.store.find("\"kind\" = 'failure'"))


def _check_nothing_poisoned(service: FakeApp, before: set[str]) -> None:
    failed = [service.wired.store.get(n).data["attempts"][-1]["reason"] for n in _failures(service) - before]
    assert not failed, f"an attempt failed, which the host retries and then poisons: {failed}"


def _rejections(service: FakeApp) -> set[str]:
    return set(service.wired.store.find("\"kind\" = 'rejection'"))


def _check_rejection(service: FakeApp, before: set[str], expected: dict, payload: str) -> None:
    """Exactly one new rejection, with the reason and field expected, and the input kept as its payload."""
    new = _rejections(service) - before
    assert len(new) == 1, f"{len(new)} rejections recorded, expected 1"
    recorded = service.wired.store.get(new.pop()).data
    assert expected["reason"] in recorded["reason"] and recorded["field"] == expected["field"], \
        f"recorded {recorded['field']}: {recorded['reason']}; expected {expected}"
    assert recorded["payload"].startswith(payload[:1000])


@pytest.mark.parametrize("case", CORPUS["messages"], ids=lambda c: c["id"])
def test_a_hostile_message_is_rejected_with_its_reason_and_never_poisoned(service, case, tmp_path):
    body = body_of(case["body"], Csrs(tmp_path))
    before, failures = _rejections(service), _failures(service)
    service.deliver(case["queue"], body)  # raising here = retried, then poisoned
    _check_nothing_poisoned(service, failures)
    _check_rejection(service, before, case["expect"]["rejected"], body.decode("utf-8", "replace"))


@pytest.mark.parametrize("case", CORPUS["batches"], ids=lambda c: c["id"])
def test_a_hostile_batch_is_rejected_or_fails_by_row_with_its_reason_and_never_poisoned(service, case, tmp_path):
    content = body_of(case["content"], Csrs(tmp_path))
    before, failures = _rejections(service), _failures(service)
    service.upload(case["path"], content, case["metadata"])
    _check_nothing_poisoned(service, failures)
    expect = case["expect"]
    if "rejected" in expect:  # refused by its path, before any other storage call: nothing of it is stored
        _check_rejection(service, before, expect["rejected"], f"device-batches/{case['path']} ")
        assert not [p for p in service.files.blobs if p.startswith("device-batches-results/")
                    and case["path"] in p], "a report was written for a path that was refused"
        return
    customer, _, name = case["path"].partition("/")
    report = json.loads(service.files.get(f"device-batches-results/{customer}/{name}.json"))
    csv_report = service.files.get(f"device-batches-results/{customer}/{name}.csv")
    assert csv_report.startswith((b"status,reason", b"row,"))  # written whatever the rows hold
    if "batchRejected" in expect:
        wanted = expect["batchRejected"]
        assert report["status"] == "rejected" and wanted["reason"] in report["reason"], report["reason"]
        assert report["field"] == wanted["field"] and report["totals"]["issued"] == 0
        return
    assert report["status"] == "complete"
    by_row = {str(r["row"]): r for r in report["rows"]}
    for row, reason in expect["rows"].items():
        assert by_row[row]["status"] == "failed" and reason in by_row[row]["error"], by_row[row]
    assert all(r["status"] == "issued" for n, r in by_row.items() if n not in expect["rows"])


def test_the_corpus_holds_at_least_60_inputs_and_each_once():
    ids = [c["id"] for c in CORPUS["messages"] + CORPUS["batches"]]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
