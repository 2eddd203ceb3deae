"""ACCEPTANCE: a device registers with its certificate over mutual TLS and lands in the hub.

Everything goes through real clients: the DPS SDK sets up enrollments, ``clients.device_registration``
registers as a device would, ``IoTHubRegistryManager`` reads the hub.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from azure.iot.hub import IoTHubRegistryManager

from clients.device_registration import RegistrationRefused, register
from emulators.dps import (
    ASSIGNMENT_FAILED,
    CHAIN_MISMATCH,
    ENROLLMENT_DISABLED,
    UNAUTHORIZED,
)
from pki.export import cert_pem, chain_pem, key_pem
from tests.x509_helpers import Chain, make_chain

pytestmark = pytest.mark.integration


@pytest.fixture
def dps(stack, credential_of) -> DeviceProvisioningClient:
    return DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(), connection_verify=str(stack.ca_path))


@pytest.fixture
def registry(stack) -> IoTHubRegistryManager:
    # the owner policy's SAS: the test reads twins as an operator of the hub would, not as the app
    manager = IoTHubRegistryManager.from_connection_string(stack.iothub_connection_string)
    manager.protocol.config.connection.verify = str(stack.ca_path)
    return manager


@pytest.fixture(autouse=True)
def _forget_trusted_roots(stack):
    """The session's DPS instance holds at most 25 CA certificates: drop the test roots each test trusted."""
    before = set(stack.dps[0].ca_certificates)
    yield
    for name in set(stack.dps[0].ca_certificates) - before:
        del stack.dps[0].ca_certificates[name]


def _device_chain(device_id: str, stack=None) -> Chain:
    """A chain valid now (it goes over TLS) whose root is verified in the first DPS instance (with ``stack``)."""
    chain = make_chain(device_id=device_id, now=datetime.now(UTC))
    if stack is not None:
        stack.dps[0].trust(chain.root)
    return chain


def _enroll_group(dps: DeviceProvisioningClient, chain: Chain, **extra) -> str:
    group_id = f"group-{secrets.token_hex(4)}"
    dps.enrollment_group.create_or_update(id=group_id, enrollment_group={
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {
            "primary": {"certificate": cert_pem(chain.intermediate).decode()}}}},
        **extra})
    return group_id


def _files(directory: Path, chain: Chain, *, with_intermediate: bool = True, with_root: bool = True
           ) -> tuple[Path, Path]:
    """The device's TLS chain: device, intermediate and root, as the service ships it (``chain.pem``)."""
    certs = [chain.device, *([chain.intermediate] if with_intermediate else []), *([chain.root] if with_root else [])]
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
    chain = _device_chain(device_id, stack)
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
    old = _device_chain(device_id, stack)
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
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain)

    refused = _refusal(stack, device_id, _files(tmp_path, chain, with_intermediate=False))

    assert refused.error_code == UNAUTHORIZED == 401002
    assert CHAIN_MISMATCH in str(refused)
    assert refused.tracking_id


def test_a_root_not_verified_in_the_instance_is_refused_with_401002(stack, dps, tmp_path):
    # learn.microsoft.com/azure/iot-dps/concepts-x509-attestation: the chain must reach a verified CA certificate
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id)  # its root is not uploaded at all
    _enroll_group(dps, chain)
    assert _refusal(stack, device_id, _files(tmp_path, chain)).error_code == UNAUTHORIZED
    # uploaded but not verified (no proof of possession) counts for nothing either
    from emulators.dps import CaCertificate

    now = datetime.now(UTC)
    stack.dps[0].ca_certificates["unverified"] = CaCertificate("unverified", chain.root, cert_pem(chain.root), False,
                                                               "e", now, now)
    try:
        assert _refusal(stack, device_id, _files(tmp_path, chain)).error_code == UNAUTHORIZED
    finally:
        del stack.dps[0].ca_certificates["unverified"]


def test_a_rogue_intermediate_with_the_customers_subject_but_another_key_is_refused(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    real = _device_chain(device_id, stack)
    _enroll_group(dps, real)
    rogue = make_chain(device_id=device_id, now=datetime.now(UTC))  # same subject names, other keys
    assert rogue.intermediate.subject == real.intermediate.subject
    forged = Chain(real.root, real.root_key, rogue.intermediate, rogue.intermediate_key, rogue.device,
                   rogue.device_key)
    assert _refusal(stack, device_id, _files(tmp_path, forged)).error_code == UNAUTHORIZED


def test_a_chain_that_stops_below_the_verified_certificate_is_refused(stack, dps, tmp_path):
    # The stricter reading of "up to and including the verified certificate": it must be presented, not only
    # found in the instance. The service ships chains with the root, which pass under either reading.
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain)
    assert _refusal(stack, device_id, _files(tmp_path, chain, with_root=False)).error_code == UNAUTHORIZED


def test_path_validation_enforces_the_ca_flag_and_path_length(stack, dps, tmp_path):
    from pki import profiles
    from pki.keys import KeyType, generate_key
    from tests.x509_helpers import remote

    now = datetime.now(UTC)
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    # a device certificate (CA:false) used as the issuer of another "device"
    impostor_key = generate_key(KeyType.EC_P256)
    impostor = profiles.issue_device(issuer=chain.device, issuer_key=remote(chain.device_key),
                                     public_key=impostor_key.public_key(), device_id=device_id, now=now,
                                     validity_days=30).certificate
    dps.enrollment_group.create_or_update(id=f"g-{device_id}", enrollment_group={
        "enrollmentGroupId": f"g-{device_id}", "attestation": {"type": "x509", "x509": {"signingCertificates": {
            "primary": {"certificate": cert_pem(chain.device).decode()}}}}})
    via_device = Chain(chain.root, chain.root_key, chain.intermediate, chain.intermediate_key, impostor, impostor_key)
    (tmp_path / "chain.pem").write_bytes(chain_pem([impostor, chain.device, chain.intermediate, chain.root]))
    (tmp_path / "key.pem").write_bytes(key_pem(via_device.device_key))
    assert _refusal(stack, device_id, (tmp_path / "chain.pem", tmp_path / "key.pem")).error_code == UNAUTHORIZED
    # pathLen 0: the customer intermediate may not sign another CA
    sub_key = generate_key(KeyType.EC_P256)
    sub = profiles.issue_intermediate(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                                      public_key=sub_key.public_key(), customer_id="sub", now=now,
                                      validity_days=30).certificate
    leaf_key = generate_key(KeyType.EC_P256)
    leaf = profiles.issue_device(issuer=sub, issuer_key=remote(sub_key), public_key=leaf_key.public_key(),
                                 device_id=device_id, now=now, validity_days=30).certificate
    _enroll_group(dps, chain)
    (tmp_path / "chain.pem").write_bytes(chain_pem([leaf, sub, chain.intermediate, chain.root]))
    (tmp_path / "key.pem").write_bytes(key_pem(leaf_key))
    assert _refusal(stack, device_id, (tmp_path / "chain.pem", tmp_path / "key.pem")).error_code == UNAUTHORIZED


def _outcome(stack, registration_id: str, files: tuple[Path, Path]) -> RegistrationRefused:
    """A registration that passed attestation and still did not end assigned: DPS reports it through the operation
    (202, then a poll), not as an HTTP error."""
    with pytest.raises(RegistrationRefused) as refused:
        _register(stack, registration_id, files)
    assert refused.value.status_code is None and refused.value.result is not None
    return refused.value


def _recorded_state(dps: DeviceProvisioningClient, registration_id: str) -> dict:
    state = dps.device_registration_state.get(registration_id)
    assert "assignedHub" not in state  # a refused attempt names no hub: callers must not take one from it
    return state


def test_disabled_individual_enrollment_blocks_one_device_of_a_group(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain)
    assert _register(stack, device_id, _files(tmp_path, chain)).status == "assigned"
    dps.enrollment.create_or_update(id=device_id, enrollment={
        "registrationId": device_id, "provisioningStatus": "disabled",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {
            "primary": {"certificate": cert_pem(chain.device).decode()}}}}})

    refused = _outcome(stack, device_id, _files(tmp_path, chain))

    assert (refused.result.status, refused.error_code) == ("disabled", ENROLLMENT_DISABLED)
    assert "disabled" in str(refused)
    state = _recorded_state(dps, device_id)
    assert (state["status"], state["errorCode"]) == ("disabled", ENROLLMENT_DISABLED)


def test_common_name_must_be_the_registration_id(stack, dps, tmp_path):
    chain = _device_chain(f"dev-{secrets.token_hex(4)}", stack)
    _enroll_group(dps, chain)

    refused = _refusal(stack, f"other-{secrets.token_hex(4)}", _files(tmp_path, chain))

    assert refused.error_code == UNAUTHORIZED
    assert "CN" in str(refused)


def test_disabled_group_refuses_through_the_operation_and_records_it(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain, provisioningStatus="disabled")

    refused = _outcome(stack, device_id, _files(tmp_path, chain))

    assert (refused.result.status, refused.error_code) == ("disabled", ENROLLMENT_DISABLED)
    assert _recorded_state(dps, device_id)["status"] == "disabled"


def test_an_attempt_the_hub_does_not_take_fails_through_the_operation_and_is_recorded(stack, dps, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain)
    stack.iothub.reachable = False
    try:
        refused = _outcome(stack, device_id, _files(tmp_path, chain))
    finally:
        stack.iothub.reachable = True
    assert (refused.result.status, refused.error_code) == ("failed", ASSIGNMENT_FAILED)
    state = _recorded_state(dps, device_id)
    assert (state["status"], state["errorCode"]) == ("failed", ASSIGNMENT_FAILED) and state["errorMessage"]
    assert _register(stack, device_id, _files(tmp_path, chain)).status == "assigned"  # the next attempt succeeds
    assert dps.device_registration_state.get(device_id)["assignedHub"] == stack.iothub.hostname


def test_unknown_id_scope_is_refused(stack, tmp_path):
    device_id = f"dev-{secrets.token_hex(4)}"
    with pytest.raises(RegistrationRefused) as refused:
        register(stack.device_endpoint_url, "0neNOSUCHSCOPE", device_id,
                 *_files(tmp_path, _device_chain(device_id, stack)),
                 ca_path=stack.ca_path)
    assert refused.value.status_code == 404


def test_pkictl_device_register_succeeds_then_names_a_missing_intermediate(stack, dps, tmp_path):
    import io

    from pkictl.cli import main

    device_id = f"device-{secrets.token_hex(4)}"
    chain = _device_chain(device_id, stack)
    _enroll_group(dps, chain)
    (tmp_path / "device.pem").write_bytes(cert_pem(chain.device))
    (tmp_path / "chain.pem").write_bytes(chain_pem([chain.intermediate, chain.root]))
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
