"""ACCEPTANCE: a device registers with its certificate over mutual TLS and lands in the hub.

Everything goes through real clients: the DPS SDK sets up enrollments, ``clients.device_registration``
registers as a device would, ``IoTHubRegistryManager`` reads the hub.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path

import pytest
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from azure.iot.hub import IoTHubRegistryManager

from clients.device_registration import RegistrationRefused, register
from emulators.dps import CHAIN_MISMATCH, ENROLLMENT_DISABLED, UNAUTHORIZED
from pki.export import cert_pem, chain_pem, key_pem
from tests.x509_helpers import Chain, make_chain

pytestmark = pytest.mark.integration


@pytest.fixture
def dps(stack, credential_of) -> DeviceProvisioningClient:
    return DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(), connection_verify=str(stack.ca_path))


@pytest.fixture
def registry(stack) -> IoTHubRegistryManager:
    # the owner policy's SAS: the test reads twins, which the app's role (IoT Hub Registry Contributor) does not grant
    manager = IoTHubRegistryManager.from_connection_string(stack.iothub_connection_string)
    manager.protocol.config.connection.verify = str(stack.ca_path)
    return manager


def _device_chain(device_id: str) -> Chain:
    return make_chain(device_id=device_id, now=datetime.now(timezone.utc))  # valid now: it goes over TLS


def _enroll_group(dps: DeviceProvisioningClient, chain: Chain, **extra) -> str:
    group_id = f"group-{secrets.token_hex(4)}"
    dps.enrollment_group.create_or_update(id=group_id, enrollment_group={
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {
            "primary": {"certificate": cert_pem(chain.intermediate).decode()}}}},
        **extra})
    return group_id


def _files(directory: Path, chain: Chain, *, with_intermediate: bool = True) -> tuple[Path, Path]:
    certs = [chain.device, chain.intermediate] if with_intermediate else [chain.device]
    (directory / "chain.pem").write_bytes(chain_pem(certs))
    (directory / "key.pem").write_bytes(key_pem(chain.device_key))
    return directory / "chain.pem", directory / "key.pem"


def _register(stack, registration_id: str, files: tuple[Path, Path]):
    return register(stack.device_endpoint_url, stack.dps[0].id_scope, registration_id, *files,
                    ca_path=stack.ca_path, timeout_s=15)


def _refusal(stack, registration_id: str, files: tuple[Path, Path]) -> RegistrationRefused:
    with pytest.raises(RegistrationRefused) as refused:
        _register(stack, registration_id, files)
    assert refused.value.status_code == 401
    return refused.value


def test_device_of_a_group_registers_and_lands_in_the_hub(stack, dps, registry, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)
    _enroll_group(dps, chain, initialTwin={"tags": {"customer": "contoso"}})

    result = _register(stack, device_id, _files(tmp_path, chain))

    assert (result.status, result.device_id, result.assigned_hub) == ("assigned", device_id, stack.iothub.hostname)
    device = registry.get_device(device_id)
    assert device.status == "enabled"
    assert device.authentication.type == "certificateAuthority"
    assert registry.get_twin(device_id).tags == {"customer": "contoso"}


def test_device_of_the_secondary_intermediate_registers_while_rolling(stack, dps, tmp_path):
    """Rolling an intermediate: the new one is primary, the old one secondary; devices of the old keep working."""
    device_id = f"dev-{secrets.token_hex(4)}"
    old = _device_chain(device_id)
    new_intermediate = make_chain().intermediate
    group_id = f"group-{secrets.token_hex(4)}"
    dps.enrollment_group.create_or_update(id=group_id, enrollment_group={
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {
            "primary": {"certificate": cert_pem(new_intermediate).decode()},
            "secondary": {"certificate": cert_pem(old.intermediate).decode()}}}}})

    assert _register(stack, device_id, _files(tmp_path, old)).status == "assigned"


def test_chain_without_the_intermediate_is_refused_with_401002(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)
    _enroll_group(dps, chain)

    refused = _refusal(stack, device_id, _files(tmp_path, chain, with_intermediate=False))

    assert refused.error_code == UNAUTHORIZED == 401002
    assert CHAIN_MISMATCH in str(refused)
    assert refused.tracking_id


def test_disabled_individual_enrollment_blocks_one_device_of_a_group(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)
    _enroll_group(dps, chain)
    dps.enrollment.create_or_update(id=device_id, enrollment={
        "registrationId": device_id, "provisioningStatus": "disabled",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {
            "primary": {"certificate": cert_pem(chain.device).decode()}}}}})

    refused = _refusal(stack, device_id, _files(tmp_path, chain))

    assert refused.error_code == ENROLLMENT_DISABLED
    assert "disabled" in str(refused)


def test_common_name_must_be_the_registration_id(stack, dps, tmp_path):
    chain = _device_chain(f"dev-{secrets.token_hex(4)}")
    _enroll_group(dps, chain)

    refused = _refusal(stack, f"other-{secrets.token_hex(4)}", _files(tmp_path, chain))

    assert refused.error_code == UNAUTHORIZED
    assert "CN" in str(refused)


def test_disabled_group_refuses(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)
    _enroll_group(dps, chain, provisioningStatus="disabled")

    refused = _refusal(stack, device_id, _files(tmp_path, chain))

    assert refused.error_code == ENROLLMENT_DISABLED


def test_unknown_id_scope_is_refused(stack, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    with pytest.raises(RegistrationRefused) as refused:
        register(stack.device_endpoint_url, "0neNOSUCHSCOPE", device_id, *_files(tmp_path, _device_chain(device_id)),
                 ca_path=stack.ca_path)
    assert refused.value.status_code == 404


def test_pkictl_device_register_succeeds_then_names_a_missing_intermediate(stack, dps, tmp_path):
    import io

    from pkictl.cli import main

    device_id = f"device-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)
    _enroll_group(dps, chain)
    (tmp_path / "device.pem").write_bytes(cert_pem(chain.device))
    (tmp_path / "chain.pem").write_bytes(cert_pem(chain.intermediate))
    (tmp_path / "device.key").write_bytes(key_pem(chain.device_key))
    env = {"DPS_DEVICE_ENDPOINT": stack.device_endpoint_url, "EMULATOR_CA_PATH": str(stack.ca_path)}
    base = ["device", "register", "--cert", str(tmp_path / "device.pem"), "--key", str(tmp_path / "device.key"),
            "--id-scope", stack.dps[0].id_scope]
    out = io.StringIO()
    assert main([*base, "--chain", str(tmp_path / "chain.pem")], env=env, out=out) == 0
    assert f"{device_id}: assigned to hub {stack.iothub.hostname} as device {device_id}" in out.getvalue()
    out = io.StringIO()
    assert main(base, env=env, out=out) == 1
    assert "DPS error 401002" in out.getvalue() and "pkictl doctor" in out.getvalue()
