"""The DPS service-API emulator, driven by the real ``DeviceProvisioningClient`` with the app's token credential
(as in production), with SAS connection strings (still supported), and with tokens it must refuse."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

import pytest
import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from cryptography.hazmat.primitives import serialization

from clients.device_registration import register
from clients.dps import DpsEnrollmentGroups
from emulators.core import EmulatorServer
from emulators.dps import GROUP_QUOTA_EXCEEDED, UNAUTHORIZED, DpsInstance
from emulators.identity import DPS, IOT_HUB
from emulators.stack import APP, OPERATOR
from handlers.errors import CapacityExhausted, Rejected
from pki.export import cert_pem, chain_pem, key_pem, thumbprints
from tests.x509_helpers import make_chain

pytestmark = pytest.mark.integration


def _client(connection_string: str, ca_path) -> DeviceProvisioningClient:
    # from_connection_string builds an AzureNamedKeyCredential (SAS tokens signed with the key); the rest of
    # the keywords reach the SDK's RequestsTransport, so connection_verify makes it trust the emulators' CA.
    return DeviceProvisioningClient.from_connection_string(connection_string, connection_verify=str(ca_path))


@pytest.fixture
def dps(stack, credential_of) -> DeviceProvisioningClient:
    return DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(APP), connection_verify=str(stack.ca_path))


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _group(group_id: str, signing_pem: str, **extra) -> dict:
    return {"enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": signing_pem}}}},
            **extra}


def test_enrollment_group_lifecycle_with_etags(dps):
    chain = make_chain()
    group_id = _unique("group")
    created = dps.enrollment_group.create_or_update(
        id=group_id, enrollment_group=_group(group_id, cert_pem(chain.intermediate).decode(),
                                             initialTwin={"tags": {"customer": "contoso"}}))
    info = created["attestation"]["x509"]["signingCertificates"]["primary"]["info"]
    assert "certificate" not in created["attestation"]["x509"]["signingCertificates"]["primary"]
    assert info["sha1Thumbprint"] == thumbprints(chain.intermediate)["sha1"]
    assert info["sha256Thumbprint"] == thumbprints(chain.intermediate)["sha256"]
    assert info["subjectName"].startswith("CN=")
    assert created["provisioningStatus"] == "enabled" and created["etag"]

    fetched = dps.enrollment_group.get(group_id)
    assert fetched["etag"] == created["etag"]
    assert fetched["initialTwin"] == {"tags": {"customer": "contoso"}}

    # Get-modify-put: the body carries the certificate as info only, which DPS accepts when it is unchanged.
    fetched["initialTwin"] = {"tags": {"customer": "fabrikam"}}
    updated = dps.enrollment_group.create_or_update(id=group_id, enrollment_group=fetched, if_match=fetched["etag"])
    assert updated["etag"] != fetched["etag"]
    assert updated["createdDateTimeUtc"] == created["createdDateTimeUtc"]

    with pytest.raises(HttpResponseError) as stale:
        dps.enrollment_group.create_or_update(id=group_id, enrollment_group=fetched, if_match=fetched["etag"])
    assert stale.value.status_code == 412
    with pytest.raises(ResourceExistsError):  # no If-Match on an existing group: DPS answers 409
        dps.enrollment_group.create_or_update(id=group_id, enrollment_group=fetched)

    updated["provisioningStatus"] = "disabled"
    disabled = dps.enrollment_group.create_or_update(id=group_id, enrollment_group=updated, if_match=updated["etag"])
    assert dps.enrollment_group.get(group_id)["provisioningStatus"] == "disabled"
    assert group_id in {g["enrollmentGroupId"] for g in dps.enrollment_group.query({"query": "*"})}

    dps.enrollment_group.delete(group_id, if_match=disabled["etag"])
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment_group.get(group_id)


def test_certificate_must_be_a_certificate(dps):
    group_id = _unique("group")
    not_a_cert = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    with pytest.raises(HttpResponseError) as refused:
        dps.enrollment_group.create_or_update(id=group_id, enrollment_group=_group(group_id, not_a_cert))
    assert refused.value.status_code == 400
    body = refused.value.response.json()
    assert body["errorCode"] == 400004
    assert "attestation.x509.signingCertificates.primary.certificate" in body["message"]


def test_individual_enrollment_create_get_delete(dps):
    registration_id = _unique("device")
    device = make_chain(device_id=registration_id).device
    enrollment = {"registrationId": registration_id, "provisioningStatus": "disabled",
                  "attestation": {"type": "x509", "x509": {"clientCertificates": {
                      "primary": {"certificate": cert_pem(device).decode()}}}}}
    created = dps.enrollment.create_or_update(id=registration_id, enrollment=enrollment)
    assert created["provisioningStatus"] == "disabled"
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["sha256Thumbprint"] == thumbprints(device)["sha256"]
    assert dps.enrollment.get(registration_id)["etag"] == created["etag"]
    assert registration_id in {e["registrationId"] for e in dps.enrollment.query({"query": "*"})}

    dps.enrollment.delete(registration_id, if_match=created["etag"])
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment.get(registration_id)


def test_group_limit_per_instance(stack):
    """A small separate instance (max_groups=3) so the limit is reached in three calls."""
    small = DpsInstance(name="small", id_scope="0neSMALL", shared_access_key=base64.b64encode(
        secrets.token_bytes(32)).decode(), hub=stack.iothub, guard=stack.dps[0].guard, max_groups=3)
    server = EmulatorServer("dps-small", small.routes(), stack.tls).start()
    try:
        small.endpoint = server.url
        client = _client(f"HostName=127.0.0.1:{server.port};SharedAccessKeyName=provisioningserviceowner;"
                         f"SharedAccessKey={small.shared_access_key}", stack.ca_path)
        for n in range(3):
            pem = cert_pem(make_chain().intermediate).decode()  # a certificate belongs to one entry only
            client.enrollment_group.create_or_update(id=f"g{n}", enrollment_group=_group(f"g{n}", pem))
        pem = cert_pem(make_chain().intermediate).decode()
        with pytest.raises(HttpResponseError) as full:
            client.enrollment_group.create_or_update(id="g3", enrollment_group=_group("g3", pem))
        assert full.value.status_code == 400
        assert full.value.response.json()["errorCode"] == GROUP_QUOTA_EXCEEDED
        # The service's client knows a full instance by counting (DPS documents no code for it; the limit may be
        # raised), and tells it from another refusal of the same status.
        groups = DpsEnrollmentGroups({"small": client}, max_groups=3)
        with pytest.raises(CapacityExhausted, match="small is full"):
            groups.create_group("small", _group("g3", pem))
        roomy = DpsEnrollmentGroups({"small": client}, max_groups=10)
        with pytest.raises(Rejected, match="refused enrollment group g3"):
            roomy.create_group("small", _group("g3", pem))
        # Updating one of the three is not a new group.
        g0 = client.enrollment_group.get("g0")
        client.enrollment_group.create_or_update(id="g0", enrollment_group=g0, if_match=g0["etag"])
    finally:
        server.stop()


def test_a_certificate_belongs_to_one_enrollment_entry_and_hubs_must_be_linked(dps, stack):
    pem = cert_pem(make_chain().intermediate).decode()
    first, second = _unique("group"), _unique("group")
    dps.enrollment_group.create_or_update(id=first, enrollment_group=_group(first, pem))
    with pytest.raises(HttpResponseError) as twice:  # concepts-x509-attestation: "only one enrollment entry"
        dps.enrollment_group.create_or_update(id=second, enrollment_group=_group(second, pem))
    assert twice.value.status_code == 400 and "only one enrollment entry" in twice.value.message
    other = cert_pem(make_chain().intermediate).decode()
    for extra, words in (({"allocationPolicy": "hashed", "iotHubs": ["elsewhere.azure-devices.net"]}, "not linked"),
                         ({"allocationPolicy": "static", "iotHubs": []}, "exactly one")):
        with pytest.raises(HttpResponseError) as refused:
            dps.enrollment_group.create_or_update(id=second, enrollment_group=_group(second, other, **extra))
        assert refused.value.status_code == 400 and words in refused.value.message
    static = _group(second, other, allocationPolicy="static", iotHubs=[stack.iothub.hostname])
    assert dps.enrollment_group.create_or_update(id=second, enrollment_group=static)["allocationPolicy"] == "static"


def test_registration_ids_follow_one_rule_in_the_enrollment_api_and_at_registration(dps):
    # concepts-service#registration-id: the last character may be a dash
    chain = make_chain(device_id="ends-with-dash-")
    enrollment = {"registrationId": "ends-with-dash-", "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": cert_pem(chain.device).decode()}}}}}
    assert dps.enrollment.create_or_update(id="ends-with-dash-", enrollment=enrollment)["registrationId"] == \
        "ends-with-dash-"
    with pytest.raises(HttpResponseError) as refused:
        dps.enrollment.create_or_update(id="ends-with-dot.",
                                        enrollment={**enrollment, "registrationId": "ends-with-dot."})
    assert refused.value.status_code == 400
    dps.enrollment.delete("ends-with-dash-")


def test_the_owner_policys_sas_connection_string_still_works(stack):
    client = _client(stack.dps_info()[0].connection_string, stack.ca_path)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment_group.get(_unique("absent"))


@pytest.mark.parametrize("case", ["garbage", "wrong resource (iot hub)", "expired"])
def test_a_bearer_token_that_is_not_a_dps_token_of_the_tenant_gets_401(stack, case):
    app = stack.principals[APP]
    token = {"garbage": "not-a-jwt", "wrong resource (iot hub)": stack.issuer.mint(app, IOT_HUB),
             "expired": stack.issuer.mint(app, DPS, issued_at=1_700_000_000)}[case]
    response = requests.get(f"{stack.dps[0].endpoint}/enrollmentGroups/anything?api-version=2021-10-01",
                            headers={"Authorization": f"Bearer {token}"}, verify=str(stack.ca_path), timeout=10)
    assert response.status_code == 401 and response.json()["errorCode"] == UNAUTHORIZED


def test_a_principal_without_a_dps_data_role_granting_the_operation_is_refused(stack, credential_of):
    # DPS documents 401 for a refused authorization and no 403 (how-to-troubleshoot-dps): the emulator answers 401.
    # The operator holds Device Provisioning Service Data Reader: reads pass, writes do not.
    operator = DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(OPERATOR),
                                        connection_verify=str(stack.ca_path))
    with pytest.raises(ResourceNotFoundError):
        operator.enrollment_group.get("anything")
    with pytest.raises(ClientAuthenticationError) as refused:
        operator.enrollment_group.create_or_update(id="anything", enrollment_group=_group("anything", "x"))
    assert refused.value.status_code == 401
    assert (f"Principal {stack.principals[OPERATOR].object_id} is not authorized for PUT on "
            "/enrollmentGroups/anything") in refused.value.message


def test_wrong_key_is_unauthorized(stack):
    info = stack.dps_info()[0]
    wrong_key = base64.b64encode(secrets.token_bytes(32)).decode()
    intruder = _client(info.connection_string.rsplit("SharedAccessKey=", 1)[0] + f"SharedAccessKey={wrong_key}",
                       stack.ca_path)
    with pytest.raises(ClientAuthenticationError):
        intruder.enrollment_group.get("anything")


def test_registration_state_after_a_device_registered(stack, dps, tmp_path):
    registration_id, group_id = _unique("device"), _unique("group")
    chain = make_chain(device_id=registration_id, now=datetime.now(UTC))
    dps.enrollment_group.create_or_update(id=group_id,
                                          enrollment_group=_group(group_id, cert_pem(chain.intermediate).decode()))
    stack.dps[0].trust(chain.root, f"test-{registration_id}")
    (tmp_path / "chain.pem").write_bytes(chain_pem([chain.device, chain.intermediate, chain.root]))
    (tmp_path / "key.pem").write_bytes(key_pem(chain.device_key))
    register(stack.device_endpoint_url, stack.dps[0].id_scope, registration_id, tmp_path / "chain.pem",
             tmp_path / "key.pem", ca_path=stack.ca_path)

    state = dps.device_registration_state.get(registration_id)
    assert (state["status"], state["deviceId"], state["assignedHub"]) == ("assigned", registration_id,
                                                                          stack.iothub.hostname)
    assert state["substatus"] == "initialAssignment"
    assert [s["registrationId"] for s in dps.device_registration_state.query(id=group_id)] == [registration_id]

    dps.device_registration_state.delete(registration_id, if_match=state["etag"])
    with pytest.raises(ResourceNotFoundError):
        dps.device_registration_state.get(registration_id)


def test_throttling_and_server_faults_come_in_dps_shape(stack, credential_of):
    # how-to-troubleshoot-dps: 429 with errorCode 429001 and Retry-After
    stack.faults(stack.dps[0].name, rate_per_s=1)
    url = f"{stack.dps[0].endpoint}/enrollmentGroups/anything?api-version=2021-10-01"
    token = credential_of(APP).get_token(f"{DPS}/.default").token
    answers = [requests.get(url, headers={"Authorization": f"Bearer {token}"}, verify=str(stack.ca_path), timeout=10)
               for _ in range(4)]
    throttled = [a for a in answers if a.status_code == 429]
    assert throttled and throttled[0].json()["errorCode"] == 429001 and throttled[0].headers["Retry-After"]
    stack.faults(stack.dps[0].name, error_503_fraction=1.0)
    failed = requests.get(url, headers={"Authorization": f"Bearer {token}"}, verify=str(stack.ca_path), timeout=10)
    assert failed.status_code == 503 and failed.json()["errorCode"] == 503000 and failed.json()["trackingId"]


def test_azure_quotas_cap_each_service_at_its_documented_default(fresh_stack, credential_of):
    with fresh_stack("quotas", dps_instances=1) as quotas:
        quotas.azure_quotas()
        assert quotas.servers["iothub"].gate.faults.rate_per_s == pytest.approx(100 / 60)  # S1: 100/min per unit
        assert quotas.servers["dps-device"].gate.faults.rate_per_s == pytest.approx(1000 / 60)
        assert quotas.servers["keyvault"].gate.faults.rate_per_s == 400  # 4,000 EC signs per 10 s
        url = f"https://{quotas.iothub.hostname}/devices/x?api-version=2021-04-12"
        token = quotas.issuer.mint(quotas.principals[APP], IOT_HUB)
        codes = [requests.get(url, headers={"Authorization": f"Bearer {token}"}, verify=str(quotas.ca_path),
                              timeout=10) for _ in range(5)]
        refused = [c for c in codes if c.status_code == 429]
        assert refused and refused[0].headers["iothub-errorcode"] == "ThrottlingException"


def test_a_custom_allocation_group_needs_its_webhook_and_shows_its_key_masked(dps):
    """CustomAllocationDefinition requires webhookUrl and apiVersion (service.json 2021-10-01); DPS shows the
    webhook's query as "?****" (concepts-custom-allocation's AllocationRequest example)."""
    group_id = _unique("group")
    pem = cert_pem(make_chain().intermediate).decode()
    for definition in (None, {"webhookUrl": "https://app.example/api/dps-allocation?code=k"}):
        extra = {"customAllocationDefinition": definition} if definition else {}
        with pytest.raises(HttpResponseError) as refused:
            dps.enrollment_group.create_or_update(id=group_id, enrollment_group=_group(
                group_id, pem, allocationPolicy="custom", **extra))
        assert refused.value.status_code == 400 and "customAllocationDefinition" in refused.value.message
    created = dps.enrollment_group.create_or_update(id=group_id, enrollment_group=_group(
        group_id, pem, allocationPolicy="custom", customAllocationDefinition={
            "webhookUrl": "https://app.example/api/dps-allocation?code=the-function-key", "apiVersion": "2021-10-01"}))
    shown = dps.enrollment_group.get(group_id)["customAllocationDefinition"]
    assert created["allocationPolicy"] == "custom"
    assert shown == {"webhookUrl": "https://app.example/api/dps-allocation?****", "apiVersion": "2021-10-01"}


def test_a_custom_allocation_group_asks_its_webhook_and_a_failing_webhook_fails_the_registration(stack, dps,
                                                                                                 tmp_path):
    """concepts-custom-allocation: DPS POSTs the AllocationRequest (the device's certificate and payload) and
    assigns as the AllocationResponse says, returning its payload to the device; a webhook that fails, or names a
    hub that is not linked, fails the registration."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from clients.device_registration import RegistrationRefused

    seen, answers = [], []

    class Webhook(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = answers.pop(0)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registration_id, group_id = _unique("device"), _unique("group")
    chain = make_chain(device_id=registration_id, now=datetime.now(UTC))
    dps.enrollment_group.create_or_update(id=group_id, enrollment_group=_group(
        group_id, cert_pem(chain.intermediate).decode(), allocationPolicy="custom", iotHubs=[stack.iothub.hostname],
        customAllocationDefinition={"webhookUrl": f"http://127.0.0.1:{server.server_address[1]}/api/x?code=k",
                                    "apiVersion": "2021-10-01"}))
    stack.dps[0].trust(chain.root, f"test-{registration_id}")
    (tmp_path / "chain.pem").write_bytes(chain_pem([chain.device, chain.intermediate, chain.root]))
    (tmp_path / "key.pem").write_bytes(key_pem(chain.device_key))

    def device(payload=None):
        return register(stack.device_endpoint_url, stack.dps[0].id_scope, registration_id, tmp_path / "chain.pem",
                        tmp_path / "key.pem", ca_path=stack.ca_path, payload=payload)

    try:
        answers.append((200, {"iotHubHostName": stack.iothub.hostname, "payload": {"hello": registration_id}}))
        result = device({"ask": 1})
        assert result.status == "assigned" and result.payload == {"hello": registration_id}
        request = seen[-1]
        assert request["deviceRuntimeContext"]["payload"] == {"ask": 1}
        assert request["deviceRuntimeContext"]["registrationId"] == registration_id
        presented = base64.b64decode(request["deviceRuntimeContext"]["x509"]["clientCertificate"])
        assert presented == chain.device.public_bytes(serialization.Encoding.DER)
        assert request["linkedHubs"] == [stack.iothub.hostname]
        assert request["enrollmentGroup"]["customAllocationDefinition"]["webhookUrl"].endswith("?****")
        with pytest.raises(RegistrationRefused) as not_an_object:  # how-to-send-additional-data: a JSON object
            device(["not", "an", "object"])
        assert not_an_object.value.error_code == 400004 and len(seen) == 1
        for answer in ((500, {}), (200, {"iotHubHostName": "elsewhere.azure-devices.net"})):
            answers.append(answer)
            with pytest.raises(RegistrationRefused) as refused:
                device()
            assert refused.value.error_code == 400209
        # the first re-registration named the hub the device was in; the failed one left it with none
        assert seen[1]["deviceRuntimeContext"]["currentIotHubHostName"] == stack.iothub.hostname
        assert "currentIotHubHostName" not in seen[2]["deviceRuntimeContext"]
    finally:
        server.shutdown()
