"""The custom allocation webhook as DPS calls it, on the local stack: devhost serves the app's HTTP trigger with
its function key, the app runs with its managed identity against Azurite (TLS, tokens) and the Key Vault
emulator, and a device recorded by a real batch renews through it."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devhost.azurite import free_port
from devhost.stack import person_settings
from handlers.records import customer_document, device_document
from handlers.renewal import ROUTE
from pkictl.cli import main

from .batch_helpers import onboarded
from .test_batches_e2e import devhost, stop
from .test_batches_e2e import env as env
from .test_batches_e2e import stack as stack
from .test_batches_e2e import storage as storage
from .worlds import wait_for
from .x509_helpers import make_csr

pytestmark = pytest.mark.integration


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_device_from_a_batch_renews_through_the_webhook_devhost_serves_with_its_function_key(env, tmp_path,
                                                                                                 stack):
    settings = {k: v for k, v in env.items() if not k.startswith("_")}
    services = onboarded(settings, "acme", stack)
    batch = tmp_path / "renew-webhook.csv"  # batch names are per customer in the module's shared Azurite
    batch.write_text("deviceId\nrenew-001\n")
    port, key = free_port(), "e2e-" + os.urandom(12).hex()
    worker = devhost({**env, "DEVHOST_FUNCTION_KEY": key}, "--event-grid", "webhook", "--webhook-port", str(port))
    try:
        out = io.StringIO()
        assert main(["send", "batch", str(batch), "--customer", "acme", "--timeout", "300", "--functions-host",
                     f"http://127.0.0.1:{port}"], env=person_settings(settings, env["_OPERATOR"]), out=out) == 0, \
            out.getvalue()
        record = services.store.get(device_document("renew-001")).data
        current = x509.load_pem_x509_certificate(record["certificatePem"].encode())
        csr = x509.load_pem_x509_csr(make_csr("renew-001")).public_bytes(serialization.Encoding.DER)
        body = {"enrollmentGroup": {"enrollmentGroupId": "acme", "allocationPolicy": "custom",
                                    "iotHubs": ["hub1.azure-devices.net"]},
                "deviceRuntimeContext": {"registrationId": "renew-001", "x509": {"clientCertificate": base64.b64encode(
                    current.public_bytes(serialization.Encoding.DER)).decode()},
                    "payload": {"pkiRenewal": {"csr": base64.b64encode(csr).decode()}}},
                "linkedHubs": ["hub1.azure-devices.net"]}
        url = f"http://127.0.0.1:{port}/api/{ROUTE}"
        assert _post(url, body)[0] == 401  # no function key
        status, answer = _post(f"{url}?code={key}", body)
        assert status == 200, answer
        assert answer["iotHubHostName"] == "hub1.azure-devices.net"
        renewal = answer["payload"]["pkiRenewal"]
        assert renewal["status"] == "issued", renewal
        renewed = services.store.get(device_document("renew-001")).data
        assert renewed["serial"] == renewal["serial"] != record["serial"]
        assert renewed["previousCertificates"][0]["serial"] == record["serial"]
        status, answer = _post(f"{url}?code={key}", {"deviceRuntimeContext": {}})
        assert status == 400 and answer["field"] == "enrollmentGroup.enrollmentGroupId"
    finally:
        output = stop(worker)
    assert key not in output


@contextlib.contextmanager
def _exported_device(env, tmp_path, stack, device_id: str):
    """A customer onboarded with groups allocating through the webhook (DPS_ALLOCATION_WEBHOOK_URL) that devhost
    serves with its function key, and one device of a real batch exported to ``tmp_path/factory``; yields the
    operator's settings. The function key never reaches devhost's output."""
    port, key = free_port(), "e2e-" + os.urandom(12).hex()
    webhook = f"http://127.0.0.1:{port}/api/{ROUTE}?code={key}"
    settings = {**{k: v for k, v in env.items() if not k.startswith("_")}, "DPS_ALLOCATION_WEBHOOK_URL": webhook}
    services = onboarded(settings, "acme", stack)
    group = services.groups.get_group("dps1", "acme").data
    assert group["allocationPolicy"] == "custom" and group["customAllocationDefinition"]["webhookUrl"].endswith("?****")
    batch = tmp_path / f"{device_id}.csv"
    batch.write_text(f"deviceId\n{device_id}\n")
    operator = person_settings(settings, env["_OPERATOR"])
    worker = devhost({**env, **settings, "DEVHOST_FUNCTION_KEY": key}, "--event-grid", "webhook", "--webhook-port",
                     str(port))
    try:
        out = io.StringIO()
        assert main(["send", "batch", str(batch), "--customer", "acme", "--timeout", "300", "--functions-host",
                     f"http://127.0.0.1:{port}"], env=operator, out=out) == 0, out.getvalue()
        assert main(["device", "export", "acme", device_id, "--out", str(tmp_path / "factory"), "--include-key"],
                    env=operator, out=out) == 0, out.getvalue()
        yield operator, services
    finally:
        output = stop(worker)
    assert key not in output


def _certificates_shown(operator: dict, device_id: str) -> list[tuple[str, str, bool]]:
    out = io.StringIO()
    assert main(["device", "show", "acme", device_id, "--json"], env=operator, out=out) == 0
    return [(c["serial"], c["issuedBy"], c.get("current", False)) for c in json.loads(out.getvalue())["certificates"]]


def _spki(key_or_cert) -> bytes:
    return key_or_cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_device_exported_from_a_batch_renews_through_dps_and_registers_with_its_new_certificate(env, tmp_path,
                                                                                                   stack):
    """#18's acceptance on the local stack: `pkictl device renew` acts as the device (a new key and CSR in the
    registration payload, over mutual TLS with its current certificate), and the new certificate registers;
    `device show` has it as current."""
    with _exported_device(env, tmp_path, stack, "renew-002") as (operator, services):
        factory, renewed = tmp_path / "factory", tmp_path / "renewed"
        old = x509.load_pem_x509_certificate((factory / "cert.pem").read_bytes())
        out = io.StringIO()
        assert main(["device", "renew", "--cert", str(factory / "cert.pem"), "--chain", str(factory / "chain.pem"),
                     "--key", str(factory / "device.key"), "--out", str(renewed)], env=operator, out=out) == 0, \
            out.getvalue()
        new = x509.load_pem_x509_certificate((renewed / "cert.pem").read_bytes())
        assert f"renew-002: renewed, serial {format(new.serial_number, 'X')}" in out.getvalue()
        assert new.serial_number != old.serial_number and new.subject == old.subject and new.issuer == old.issuer
        new_key = serialization.load_pem_private_key((renewed / "device.key").read_bytes(), None)
        assert _spki(new) == _spki(new_key) != _spki(old)
        assert oct((renewed / "device.key").stat().st_mode)[-3:] == "600"
        out = io.StringIO()
        assert main(["device", "register", "--cert", str(renewed / "cert.pem"), "--chain", str(renewed / "chain.pem"),
                     "--key", str(renewed / "device.key")], env=operator, out=out) == 0, out.getvalue()
        assert "renew-002: assigned to hub" in out.getvalue()
        assert _certificates_shown(operator, "renew-002") == [
            (format(new.serial_number, "X"), "renewal", True), (format(old.serial_number, "X"), "batch", False)]

        # the operator switches the customer's group off the webhook (DPS allocates by the recorded policy, and a
        # renewal goes unanswered while the device still registers), then back on
        def policy() -> str:
            return services.groups.get_group("dps1", "acme").data["allocationPolicy"]

        for command, wanted in (("disable-custom-allocation", "hashed"), ("enable-custom-allocation", "custom")):
            assert main(["send", "command", command, "--customer", "acme", "--reason", "e2e"], env=operator,
                        out=io.StringIO()) == 0
            wait_for(lambda wanted=wanted: policy() == wanted, 60, f"{command} in DPS")
            if wanted == "hashed":
                out = io.StringIO()
                assert main(["device", "renew", "--cert", str(renewed / "cert.pem"), "--chain",
                             str(renewed / "chain.pem"), "--key", str(renewed / "device.key"), "--out",
                             str(tmp_path / "unanswered")], env=operator, out=out) == 1
                assert "no pkiRenewal answer in the payload" in out.getvalue()
        assert services.store.get(customer_document("acme")).data["allocation"] == "custom"


def test_the_azure_iot_device_sdk_registers_and_renews_over_mqtt_with_the_readme_sample(env, tmp_path, stack):
    """#18: the real `azure-iot-device` ProvisioningDeviceClient, over MQTT on port 8883 against the local DPS, runs
    samples/device_renewal.py (the README's device sample; no code of ours on the device side): it registers with
    its factory certificate, renews with a CSR in the provisioning payload, and registers with the new one."""
    from samples.device_renewal import register, renew

    with _exported_device(env, tmp_path, stack, "renew-sdk") as (operator, _):
        factory = tmp_path / "factory"
        old = x509.load_pem_x509_certificate((factory / "cert.pem").read_bytes())
        where = {"provisioning_host": stack.device_mqtt_host, "id_scope": stack.dps[0].id_scope,
                 "registration_id": "renew-sdk"}
        trust = stack.ca_path.read_text()
        first = register(**where, chain_file=str(factory / "chain.pem"), key_file=str(factory / "device.key"),
                         server_verification_cert=trust)
        assert first.status == "assigned" and first.registration_state.device_id == "renew-sdk"
        assert json.loads(first.registration_state.response_payload) is None  # none asked for, none answered

        answer, key_pem = renew(**where, chain_file=str(factory / "chain.pem"), key_file=str(factory / "device.key"),
                                server_verification_cert=trust)
        assert answer["status"] == "issued", answer
        new = x509.load_pem_x509_certificate(answer["certificate"].encode())
        assert format(new.serial_number, "X") == answer["serial"] != format(old.serial_number, "X")
        assert new.subject == old.subject and new.issuer == old.issuer
        assert _spki(new) == _spki(serialization.load_pem_private_key(key_pem, None)) != _spki(old)
        (tmp_path / "new-chain.pem").write_text(answer["certificate"] + "".join(answer["chain"]))
        (tmp_path / "new.key").write_bytes(key_pem)
        second = register(**where, chain_file=str(tmp_path / "new-chain.pem"), key_file=str(tmp_path / "new.key"),
                          server_verification_cert=trust)
        assert second.status == "assigned" and second.registration_state.device_id == "renew-sdk"
        assert _certificates_shown(operator, "renew-sdk") == [
            (answer["serial"], "renewal", True), (format(old.serial_number, "X"), "batch", False)]
