"""The IoT Hub registry emulator, driven by the real ``IoTHubRegistryManager``: with the owner policy's SAS
(everything allowed) for the registry's behaviour, with the local principals' tokens for authorization."""

from __future__ import annotations

import base64
import secrets

import pytest
import requests
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import ExportImportDevice, QuerySpecification
from msrest.exceptions import HttpOperationError

from clients.iothub import IotHubRegistries
from emulators.identity import IOT_HUB, VAULT
from emulators.stack import APP, OPERATOR
from handlers.errors import TransientError
from handlers.ports import BulkOutcome

pytestmark = pytest.mark.integration


def _trusting(manager: IoTHubRegistryManager, stack) -> IoTHubRegistryManager:
    # msrest's connection configuration (what clients.iothub sets from EMULATOR_CA_PATH)
    manager.protocol.config.connection.verify = str(stack.ca_path)
    return manager


@pytest.fixture
def registry(stack) -> IoTHubRegistryManager:
    return _trusting(IoTHubRegistryManager.from_connection_string(stack.iothub_connection_string), stack)


def _device_id() -> str:
    return f"hub-test-{secrets.token_hex(4)}"


def test_create_get_disable_with_etag_and_query(registry):
    device_id, other_id = _device_id(), _device_id()
    created = registry.create_device_with_certificate_authority(device_id, "enabled")
    registry.create_device_with_certificate_authority(other_id, "enabled")
    assert created.authentication.type == "certificateAuthority"

    fetched = registry.get_device(device_id)
    assert (fetched.device_id, fetched.status, fetched.etag) == (device_id, "enabled", created.etag)
    assert fetched.authentication.type == "certificateAuthority"

    disabled = registry.update_device_with_certificate_authority(device_id, fetched.etag, "disabled")
    assert disabled.status == "disabled"
    assert disabled.etag != fetched.etag

    with pytest.raises(HttpOperationError) as stale:
        registry.update_device_with_certificate_authority(device_id, fetched.etag, "enabled")
    assert stale.value.response.status_code == 412
    assert stale.value.response.headers["iothub-errorcode"] == "PreconditionFailed"
    assert registry.get_device(device_id).status == "disabled"

    result = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE status = 'disabled'"))
    found = {twin.device_id: twin for twin in result.items}
    assert device_id in found and other_id not in found
    assert found[device_id].authentication_type == "certificateAuthority"
    assert result.type == "twin"


def test_query_pages_with_continuation(registry):
    tag = secrets.token_hex(4)
    ids = {_device_id() for _ in range(3)}
    for device_id in ids:
        registry.create_device_with_certificate_authority(device_id, "disabled", status_reason=tag)
    query = QuerySpecification(query=f"SELECT * FROM devices WHERE statusReason = '{tag}' AND status = 'disabled'")
    first = registry.query_iot_hub(query, max_item_count=2)
    assert len(first.items) == 2 and first.continuation_token
    second = registry.query_iot_hub(query, continuation_token=first.continuation_token, max_item_count=2)
    assert {t.device_id for t in first.items + second.items} == ids
    assert second.continuation_token is None


def test_create_twice_conflicts_and_delete_removes(registry):
    device_id = _device_id()
    registry.create_device_with_certificate_authority(device_id, "enabled")
    with pytest.raises(HttpOperationError) as exists:
        registry.create_device_with_certificate_authority(device_id, "enabled")
    assert exists.value.response.status_code == 409

    registry.delete_device(device_id)
    with pytest.raises(HttpOperationError) as missing:
        registry.get_device(device_id)
    assert missing.value.response.status_code == 404
    assert missing.value.response.headers["iothub-errorcode"] == "DeviceNotFound"


def test_wrong_key_is_unauthorized(stack):
    wrong_key = base64.b64encode(secrets.token_bytes(32)).decode()
    intruder = _trusting(IoTHubRegistryManager.from_connection_string(
        f"HostName={stack.iothub.hostname};SharedAccessKeyName=iothubowner;SharedAccessKey={wrong_key}"), stack)
    with pytest.raises(HttpOperationError) as refused:
        intruder.get_device(_device_id())
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"


def test_dps_provisioning_creates_ca_device_with_initial_twin(stack, registry):
    device_id = _device_id()
    stack.iothub.provision_device(device_id, initial_twin={"tags": {"customer": "contoso"},
                                                           "properties": {"desired": {"interval": 30}}})
    device = registry.get_device(device_id)
    assert (device.status, device.authentication.type) == ("enabled", "certificateAuthority")
    twin = registry.get_twin(device_id)
    assert twin.tags == {"customer": "contoso"}
    assert twin.properties.desired["interval"] == 30


def _raw(stack, token: str, path: str = "/devices/anything") -> requests.Response:
    return requests.get(f"https://{stack.iothub.hostname}{path}?api-version=2021-04-12",
                        headers={"Authorization": f"Bearer {token}"}, verify=str(stack.ca_path), timeout=10)


@pytest.mark.parametrize("case", ["garbage", "wrong resource (vault)", "expired"])
def test_a_bearer_token_that_is_not_a_hub_token_of_the_tenant_gets_401_unauthorized_access(stack, case):
    app = stack.principals[APP]
    token = {"garbage": "not-a-jwt", "wrong resource (vault)": stack.issuer.mint(app, VAULT),
             "expired": stack.issuer.mint(app, IOT_HUB, issued_at=1_700_000_000)}[case]
    response = _raw(stack, token)
    assert response.status_code == 401
    assert response.headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"
    assert response.json()["Message"].startswith("ErrorCode:IotHubUnauthorizedAccess;Unauthorized")


@pytest.mark.parametrize("access", ["identity", "connection string"])
def test_the_app_reaches_a_hub_by_host_name_with_its_identity_or_a_connection_string(stack, credential_of, access):
    # The production code path: host name only (the SDK adds https://), the app's token credential. A hub with a
    # connection string (IOT_HUB_CONNECTION_STRINGS) still works, for those who run that way.
    strings = {stack.iothub.hostname: stack.iothub_connection_string} if access == "connection string" else {}
    hubs = IotHubRegistries(connection_strings=strings, credential=credential_of(APP), ops_per_min=6000,
                            connection_verify=str(stack.ca_path))
    device_id = _device_id()
    stack.iothub.provision_device(device_id, initial_twin=None)
    device = hubs.device(stack.iothub.hostname, device_id)
    assert device["status"] == "enabled"
    hubs.set_status(stack.iothub.hostname, device, "disabled", "stolen")
    assert stack.iothub.device_status(device_id) == "disabled"
    assert hubs.set_statuses(stack.iothub.hostname, [device_id], "enabled", "found") == BulkOutcome()
    assert stack.iothub.device_status(device_id) == "enabled"
    assert hubs.device(stack.iothub.hostname, _device_id()) is None
    # a bulk update never creates: a device the hub no longer has is reported absent, and nothing is made
    gone = _device_id()
    outcome = hubs.set_statuses(stack.iothub.hostname, [device_id, gone], "disabled", "lost")
    assert outcome == BulkOutcome(absent=(gone,)) and stack.iothub.device_status(gone) is None
    assert stack.iothub.device_status(device_id) == "disabled"
    # a 400 for the whole request (no per-device errors, isSuccessful absent) is a failure, not a success
    with pytest.raises(TransientError, match="refused the request: HTTP 400"):
        hubs.set_statuses(stack.iothub.hostname, [f"bad id {gone}"] * 2, "enabled", "x")


def test_a_principal_without_the_role_is_refused_with_iothubs_401_iothubunauthorized(stack, credential_of):
    # IoT Hub answers a missing role with 401 IotHubUnauthorized, not 403 (learn.microsoft.com/azure/iot-hub/
    # troubleshoot-error-codes, 401003; quoted in Azure/azure-iot-sdk-csharp#3344).
    device_id = _device_id()
    stack.iothub.provision_device(device_id, initial_twin=None)
    operator = _trusting(IoTHubRegistryManager.from_token_credential(stack.iothub.hostname, credential_of(OPERATOR)),
                         stack)
    with pytest.raises(HttpOperationError) as refused:
        operator.get_device(device_id)
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["iothub-errorcode"] == "IotHubUnauthorized"
    assert (f"Principal {stack.principals[OPERATOR].object_id} is not authorized for GET on /devices/{device_id} "
            "due to no assigned permissions") in refused.value.response.json()["Message"]
    # IoT Hub Registry Contributor is devices/*, IoT Hub Twin Contributor twins/*: the app has both.
    app = _trusting(IoTHubRegistryManager.from_token_credential(stack.iothub.hostname, credential_of(APP)), stack)
    assert app.get_device(device_id).status == "enabled"
    assert app.get_twin(device_id).device_id == device_id
    # A bulk update needs devices/write and devices/delete (Bulk Update Registry): the registry role has both.
    result = app.bulk_create_or_update_devices([ExportImportDevice(id=device_id, import_mode="update",
                                                                    status="disabled")])
    assert result.is_successful and stack.iothub.device_status(device_id) == "disabled"


def test_twin_updates_merge_desired_properties_and_tags_at_the_twins_etag(stack, credential_of):
    """UpdateTwin (PATCH /twins/{id}): a JSON merge patch of tags and desired properties (null removes), If-Match
    against the twin's etag; reported properties are the device's."""
    from azure.iot.hub.models import Twin, TwinProperties

    device_id = f"twin-{secrets.token_hex(3)}"
    stack.iothub.provision_device(device_id, initial_twin={"tags": {"line": "7"}, "properties": {"desired": {"a": 1}}})
    app = _trusting(IoTHubRegistryManager.from_token_credential(stack.iothub.hostname, credential_of(APP)), stack)
    before = app.get_twin(device_id)
    after = app.update_twin(device_id, Twin(tags={"line": None, "site": "x"}, properties=TwinProperties(
        desired={"pkiRenewal": {"requested": "2026-12-01"}})), before.etag)
    assert after.tags == {"site": "x"}
    assert after.properties.desired["pkiRenewal"] == {"requested": "2026-12-01"} and after.properties.desired["a"] == 1
    assert after.properties.desired["$version"] == before.properties.desired["$version"] + 1
    with pytest.raises(HttpOperationError) as stale:
        app.update_twin(device_id, Twin(properties=TwinProperties(desired={"b": 2})), before.etag)
    assert stale.value.response.status_code == 412
    with pytest.raises(HttpOperationError) as reported:
        app.update_twin(device_id, Twin(properties=TwinProperties(reported={"b": 2})), "*")
    assert reported.value.response.status_code == 400
    for key in ("$version", "a.b", "with space"):  # twin keys exclude '.', '$' and space, at any depth
        with pytest.raises(HttpOperationError) as bad:
            app.update_twin(device_id, Twin(properties=TwinProperties(desired={"ok": {key: 1}})), "*")
        assert bad.value.response.status_code == 400 and key in bad.value.response.json()["Message"]
