"""The typed records of handlers/records.py: JSON round trips that keep every field, index tags, and the rules
they own."""

from __future__ import annotations

import pytest

from handlers.records import DeviceRecord, DeviceStatus, KeySource

STORED = {  # a device record as a batch writes it, then a command and the sweep add to it
    "customerId": "acme", "deviceId": "d-1", "status": "disabled", "batch": "line-7.csv", "row": 3,
    "keySource": "generated", "subject": "CN=d-1", "issuer": "CN=acme Intermediate CA", "serial": "0A1B",
    "notBefore": "2026-11-29T12:00:00Z", "notAfter": "2027-11-29T12:00:00Z", "thumbprintSha1": "AA",
    "thumbprintSha256": "BB", "intermediateSerial": "77", "issuedAt": "2026-11-29T12:00:00Z",
    "outputs": {"certificate": "c/acme/line-7.csv/d-1/cert.pem", "chain": "c/acme/line-7.csv/d-1/chain.pem",
                "pfx": "c/acme/line-7.csv/d-1/device.pfx"},
    "pfxSecret": {"name": "batch-acme-1", "version": "v1"}, "hub": {"name": "hub1", "deviceId": "d-1"},
    "disabledReason": "stolen", "lastCommand": {"order": "x", "reason": "stolen"},
}


def test_a_stored_device_record_reads_into_its_type_and_writes_back_unchanged():
    record = DeviceRecord.from_json(STORED)
    assert record.status is DeviceStatus.DISABLED and record.key_source is KeySource.GENERATED
    assert record.serial == "0A1B" and record.hub == {"name": "hub1", "deviceId": "d-1"}
    assert record.events == {"disabledReason": "stolen", "lastCommand": {"order": "x", "reason": "stolen"}}
    assert record.to_json() == STORED
    assert DeviceRecord.from_json(record.to_json()) == record


def test_a_csr_device_keeps_its_null_secret_and_the_tags_name_its_issuer():
    data = {**STORED, "keySource": "csr", "pfxSecret": None, "status": "issued"}
    data["outputs"] = {k: v for k, v in STORED["outputs"].items() if k != "pfx"}
    record = DeviceRecord.from_json(data)
    assert record.to_json() == data
    assert record.tags == {"kind": "device", "customer": "acme", "status": "issued", "notAfter": "20271129",
                           "issuer": "77"}
    assert "issuer" not in DeviceRecord.from_json({**data, "intermediateSerial": None}).tags


@pytest.mark.parametrize("now, expired", [("2027-11-29T11:59:59Z", False), ("2027-11-29T12:00:00Z", False),
                                          ("2027-11-29T12:00:01Z", True)])
def test_a_certificate_is_valid_through_its_not_after_inclusive(now, expired):
    assert DeviceRecord.from_json(STORED).expired_by(now) is expired  # RFC 5280 section 4.1.2.5


def test_an_unknown_status_is_refused():
    with pytest.raises(ValueError, match="revoked"):
        DeviceRecord.from_json({**STORED, "status": "revoked"})


def test_an_onboarded_then_renewed_customer_reads_into_its_type_and_writes_back_unchanged(tmp_path):
    from handlers.records import CustomerRecord, CustomerStatus, customer_document

    from .worlds import CommandWorld

    world = CommandWorld(tmp_path)
    world.send({"command": "renew-intermediate", "customerId": "contoso", "reason": "yearly", "requestId": "r-1"})
    world.send({"command": "disable-customer", "customerId": "fabrikam", "reason": "unpaid"})
    for customer_id in ("contoso", "fabrikam"):
        stored = world.store.get(customer_document(customer_id)).data
        record = CustomerRecord.from_json(stored)
        assert record.to_json() == {"lease": None, **stored}
        assert CustomerRecord.from_json(record.to_json()) == record
        assert record.tags == {"kind": "customer", "customer": customer_id, "status": stored["status"],
                               "dps": stored["dps"]["name"]}
    contoso = CustomerRecord.from_json(world.customer("contoso"))
    assert contoso.status is CustomerStatus.ACTIVE and contoso.onboarded and len(contoso.renewals) == 1
    assert contoso.previous_intermediates[0]["serial"] != contoso.intermediate["serial"]
    fabrikam = CustomerRecord.from_json(world.customer("fabrikam"))
    assert fabrikam.status is CustomerStatus.DISABLED and fabrikam.onboarded
    assert fabrikam.other["disabledReason"] == "unpaid"


def test_a_record_replacing_another_keeps_its_certificates_newest_first_up_to_a_bound():
    from handlers.records.devices import HISTORY_KEPT

    older = DeviceRecord.from_json(STORED)  # written before records said how they were issued: a batch
    assert older.issued_by is None and older.certificates == [{
        "serial": "0A1B", "notAfter": "2027-11-29T12:00:00Z", "issuedAt": "2026-11-29T12:00:00Z",
        "thumbprintSha256": "BB", "issuedBy": "batch", "batch": "line-7.csv", "current": True}]
    record = older
    for i in range(HISTORY_KEPT + 5):
        record = DeviceRecord.from_json({**STORED, "serial": f"S{i}", "issuedBy": "batch"}).replacing(record.to_json())
    stored = record.to_json()
    assert len(stored["previousCertificates"]) == HISTORY_KEPT
    assert [c["serial"] for c in record.certificates[:3]] == [f"S{HISTORY_KEPT + 4}", f"S{HISTORY_KEPT + 3}",
                                                              f"S{HISTORY_KEPT + 2}"]
    assert DeviceRecord.from_json(stored) == record and DeviceRecord.from_json(stored).to_json() == stored
