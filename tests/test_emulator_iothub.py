"""The IoT Hub registry emulator, driven by the real ``IoTHubRegistryManager``."""

from __future__ import annotations

import base64
import secrets

import pytest
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification
from msrest.exceptions import HttpOperationError

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(stack, monkeypatch) -> IoTHubRegistryManager:
    # IoTHubRegistryManager takes no CA option: its msrest client sends with requests, which trusts
    # REQUESTS_CA_BUNDLE when the caller passes verify=True (msrest's default). The environment variable is
    # requests' documented switch and reaches the client without touching the SDK's generated internals.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stack.ca_path))
    return IoTHubRegistryManager.from_connection_string(stack.iothub_connection_string)


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


def test_wrong_key_is_unauthorized(stack, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stack.ca_path))
    wrong_key = base64.b64encode(secrets.token_bytes(32)).decode()
    intruder = IoTHubRegistryManager.from_connection_string(
        f"HostName={stack.iothub.hostname};SharedAccessKeyName=iothubowner;SharedAccessKey={wrong_key}")
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
