"""Device self-renewal through DPS's custom allocation webhook (handlers/renewal.py), on in-memory fakes: the
AllocationRequest as learn.microsoft.com/azure/iot-dps/concepts-custom-allocation shows it, with the device's
payload ``{"pkiRenewal": {"csr": ...}}``."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from handlers.records import BatchSettings, device_document
from handlers.renewal import AllocationRequest, RenewalSettings, allocated_hub, handle_allocation
from pki.keys import KeyType, generate_key

from .worlds import FakeApp
from .x509_helpers import make_csr

HUBS = ["hub-a.azure-devices.net", "hub-b.azure-devices.net"]


@pytest.fixture
def app(tmp_path) -> FakeApp:
    app = FakeApp(tmp_path, BatchSettings(chunk_rows=4))
    app.onboard("acme")
    app.onboard("globex")
    for customer in ("acme", "globex"):
        app.intake(app.put(f"{customer}/line.csv", ("deviceId\n" + "".join(
            f"{customer}-{i}\n" for i in range(3))).encode()))
    app.run_chunks()
    return app


def _certificate(app: FakeApp, device_id: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(app.store.get(device_document(device_id)).data["certificatePem"].encode())


def _body(device_id: str, presented: x509.Certificate | None, csr: bytes | str | None = None, *,
          group: str = "acme") -> dict:
    context: dict = {"registrationId": device_id}
    if presented is not None:
        context["x509"] = {"clientCertificate": base64.b64encode(
            presented.public_bytes(serialization.Encoding.DER)).decode()}
    if csr is not None:
        der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER) if isinstance(csr, bytes) else None
        context["payload"] = {"pkiRenewal": {"csr": base64.b64encode(der).decode() if der else csr}}
    return {"enrollmentGroup": {"enrollmentGroupId": group, "allocationPolicy": "custom", "iotHubs": HUBS,
                                "attestation": {"type": "x509"}},
            "deviceRuntimeContext": context, "linkedHubs": HUBS}


def _allocate(app: FakeApp, body: dict, *, now: dt.datetime | None = None, per_day: int = 3) -> dict:
    return handle_allocation(AllocationRequest.from_json(body), store=app.store, keys=app.wired.keys,
                             audit=app.wired.audit, settings=RenewalSettings(per_day=per_day), now=now or app.now)


def _renewal(response: dict) -> dict:
    return response["payload"]["pkiRenewal"]


def test_a_device_renews_with_a_new_key_from_its_customers_intermediate_and_keeps_its_history(app):
    old = _certificate(app, "acme-0")
    key = generate_key(KeyType.EC_P256)
    response = _allocate(app, _body("acme-0", old, make_csr("acme-0", key)))
    assert response["iotHubHostName"] in HUBS
    answer = _renewal(response)
    assert answer["status"] == "issued", answer
    new = x509.load_pem_x509_certificate(answer["certificate"].encode())
    intermediate = x509.load_pem_x509_certificate(answer["chain"][0].encode())
    assert new.serial_number != old.serial_number and new.subject == old.subject
    assert new.issuer == old.issuer == intermediate.subject
    new.verify_directly_issued_by(intermediate)
    root = x509.load_pem_x509_certificate(answer["chain"][1].encode())  # the chain reaches the root
    intermediate.verify_directly_issued_by(root)
    assert root.subject == root.issuer and len(answer["chain"]) == 2
    assert new.public_key().public_numbers() == key.public_key().public_numbers()
    record = app.store.get(device_document("acme-0")).data
    assert record["serial"] == answer["serial"] and record["issuedBy"] == "renewal" and record["keySource"] == "csr"
    assert [c["serial"] for c in record["previousCertificates"]] == [format(old.serial_number, "X")]
    assert [e["effect"] for e in app.wired.audit.events if e["action"] == "renew-device"] == ["changed"]
    # the renewed device can renew again, presenting its new certificate
    again = _renewal(_allocate(app, _body("acme-0", new, make_csr("acme-0"))))
    assert again["status"] == "issued" and again["serial"] != answer["serial"]


def test_the_same_request_twice_gets_the_same_certificate_issued_once(app):
    body = _body("acme-1", _certificate(app, "acme-1"), make_csr("acme-1"))
    first, second = _renewal(_allocate(app, body)), _renewal(_allocate(app, body))
    assert first == second and first["status"] == "issued"
    assert [e["effect"] for e in app.wired.audit.events if e["action"] == "renew-device"] == ["changed", "no-op"]


def _padded(body: dict) -> dict:
    body["deviceRuntimeContext"]["payload"]["pkiRenewal"]["note"] = "x" * 8192
    return body


@pytest.mark.parametrize("case, reason", [
    ("csr for another device", "does not match deviceId"),
    ("garbled csr", "pkiRenewal.csr: unreadable"),
    ("not base64", "is not base64"),
    ("no csr", "pkiRenewal.csr: is required"),
    ("weak key", "is not allowed"),
    ("current key reused", "a renewal needs a new key"),
    ("another device's certificate presented", "not one this service issued to it"),
    ("no certificate presented", "no client certificate"),
    ("another customer's device", "was not issued by this service in this group"),
    ("oversized payload", "a renewal request is at most 8192"),
])
def test_bad_renewals_are_refused_with_a_reason_and_nothing_is_issued(app, tmp_path, case, reason):
    current = _certificate(app, "acme-2")
    body = {
        "csr for another device": lambda: _body("acme-2", current, make_csr("acme-1")),
        "garbled csr": lambda: _body("acme-2", current, base64.b64encode(b"\x30\x03garbage").decode()),
        "not base64": lambda: _body("acme-2", current, "%%% not base64 %%%"),
        "no csr": lambda: {**_body("acme-2", current), "deviceRuntimeContext": {
            "registrationId": "acme-2", "x509": _body("acme-2", current)["deviceRuntimeContext"]["x509"],
            "payload": {"pkiRenewal": {}}}},
        "weak key": lambda: _body("acme-2", current, make_csr("acme-2", ec.generate_private_key(ec.SECP192R1()))
                                  if _secp192_allowed() else make_csr("acme-2", _small_rsa())),
        "current key reused": lambda: _body("acme-2", current, make_csr("acme-2", _key_of(app, tmp_path, "acme-2"))),
        "another device's certificate presented": lambda: _body("acme-2", _certificate(app, "acme-1"),
                                                                make_csr("acme-2")),
        "no certificate presented": lambda: _body("acme-2", None, make_csr("acme-2")),
        "another customer's device": lambda: _body("globex-0", _certificate(app, "globex-0"), make_csr("globex-0")),
        # a good CSR, padded past the service's own limit (DPS documents none): refused before it is read
        "oversized payload": lambda: _padded(_body("acme-2", current, make_csr("acme-2"))),
    }[case]()
    before = {d: app.store.get(device_document(d)).data["serial"] for d in ("acme-2", "globex-0")}
    response = _allocate(app, body)
    answer = _renewal(response)
    assert answer["status"] == "refused" and reason in answer["reason"], answer
    assert response["iotHubHostName"] in HUBS  # the registration itself goes ahead
    assert {d: app.store.get(device_document(d)).data["serial"] for d in before} == before
    assert [e["effect"] for e in app.wired.audit.events if e["action"] == "renew-device"] == ["rejected"]


def test_a_disabled_device_or_customer_and_a_device_over_the_rate_limit_are_refused(app):
    doc = app.store.get(device_document("acme-0"))
    app.store.replace(doc, {**doc.data, "status": "disabled"})
    answer = _renewal(_allocate(app, _body("acme-0", _certificate(app, "acme-0"), make_csr("acme-0"))))
    assert answer == {"status": "refused", "reason": "device 'acme-0' is disabled"}
    customer = app.store.get("customers/acme.json")
    app.store.replace(customer, {**customer.data, "status": "disabled"})
    answer = _renewal(_allocate(app, _body("acme-1", _certificate(app, "acme-1"), make_csr("acme-1"))))
    assert answer == {"status": "refused", "reason": "customer 'acme' is disabled"}
    app.store.replace(app.store.get("customers/acme.json"), customer.data)
    for _ in range(2):
        assert _renewal(_allocate(app, _body("acme-1", _certificate(app, "acme-1"), make_csr("acme-1")),
                                  per_day=2))["status"] == "issued"
    answer = _renewal(_allocate(app, _body("acme-1", _certificate(app, "acme-1"), make_csr("acme-1")), per_day=2))
    assert answer["status"] == "refused" and "over the rate limit: 2 renewals" in answer["reason"]
    tomorrow = app.now + dt.timedelta(days=1, minutes=1)
    assert _renewal(_allocate(app, _body("acme-1", _certificate(app, "acme-1"), make_csr("acme-1")), now=tomorrow,
                              per_day=2))["status"] == "issued"


def test_hashed_allocation_is_stable_over_the_groups_hubs_and_static_is_its_one_hub():
    def request(device_id: str, hubs: list[str]) -> AllocationRequest:
        return AllocationRequest.from_json({"enrollmentGroup": {"enrollmentGroupId": "acme", "iotHubs": hubs},
                                            "deviceRuntimeContext": {"registrationId": device_id},
                                            "linkedHubs": [*HUBS, "other.azure-devices.net"]})
    spread = {allocated_hub(request(f"d-{i}", HUBS), "hashed") for i in range(40)}
    assert spread == set(HUBS)  # only the group's hubs, and both of them
    assert allocated_hub(request("d-7", HUBS), "hashed") == allocated_hub(request("d-7", HUBS[::-1]), "hashed")
    assert allocated_hub(request("d-7", HUBS), "geoLatency") == allocated_hub(request("d-7", HUBS), "hashed")
    assert allocated_hub(request("d-7", [HUBS[1]]), "static") == HUBS[1]


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"deviceRuntimeContext": {"registrationId": "d"}, "linkedHubs": HUBS}, "enrollmentGroup.enrollmentGroupId"),
    ({"enrollmentGroup": {"enrollmentGroupId": "acme"}, "linkedHubs": HUBS}, "deviceRuntimeContext.registrationId"),
    ({"enrollmentGroup": {"enrollmentGroupId": "acme"}, "deviceRuntimeContext": {"registrationId": "d"}},
     "linkedHubs"),
])
def test_a_request_that_is_not_dps_allocation_request_names_the_field(body, field):
    from handlers.errors import InvalidMessage

    with pytest.raises(InvalidMessage) as raised:
        AllocationRequest.from_json(body)
    assert raised.value.field == field


def _secp192_allowed() -> bool:
    try:
        ec.generate_private_key(ec.SECP192R1())
        return True
    except Exception:  # noqa: BLE001 - an OpenSSL without P-192
        return False


def _small_rsa():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _key_of(app: FakeApp, tmp_path, device_id: str):
    """The device's current key, from its PFX (the factory's files)."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    record = app.store.get(device_document(device_id)).data
    password = app.wired.secrets.get_secret(record["pfxSecret"]["name"], record["pfxSecret"]["version"])
    return pkcs12.load_key_and_certificates(app.files.get(record["outputs"]["pfx"]), password.encode())[0]


def test_the_webhook_edge_answers_200_with_the_allocation_and_400_naming_the_field_recorded(app):
    """``function_app.handle_allocation`` through ``edge.http.run_http``, as the HTTP trigger will run it."""
    import json
    from types import SimpleNamespace

    import azure.functions as func

    import function_app
    from edge.http import run_http

    wired = SimpleNamespace(store=app.store, keys=app.wired.keys, audit=app.wired.audit,
                            renewals=RenewalSettings())

    def post(body: bytes) -> func.HttpResponse:
        request = func.HttpRequest("POST", "http://localhost/api/dps-allocation", body=body,
                                   headers={"x-ms-request-id": "r-1"})
        return run_http(request, route="dps-allocation", services=lambda: wired, handle=function_app.handle_allocation)

    body = _body("acme-0", _certificate(app, "acme-0"), make_csr("acme-0"))
    answered = post(json.dumps(body).encode())
    assert answered.status_code == 200 and answered.mimetype == "application/json"
    assert json.loads(answered.get_body())["payload"]["pkiRenewal"]["status"] == "issued"
    refused = post(b'{"deviceRuntimeContext": {"registrationId": "acme-0"}, "linkedHubs": ["h"]}')
    assert refused.status_code == 400
    assert json.loads(refused.get_body())["field"] == "enrollmentGroup.enrollmentGroupId"
    recorded = app.store.get(f"rejections/dps-allocation/{dt.datetime.now(dt.UTC):%Y-%m-%d}/r-1.json")
    assert recorded.data["field"] == "enrollmentGroup.enrollmentGroupId" and recorded.data["requestId"] == "r-1"
    broken = SimpleNamespace(**{**vars(wired), "keys": None})  # a fault inside: 500, nothing of it sent
    failed = run_http(func.HttpRequest("POST", "http://localhost/api/dps-allocation",
                                       body=json.dumps(_body("acme-1", _certificate(app, "acme-1"),
                                                             make_csr("acme-1"))).encode()),
                      route="dps-allocation", services=lambda: broken, handle=function_app.handle_allocation)
    assert failed.status_code == 500 and "NoneType" not in failed.get_body().decode()
