"""ACCEPTANCE for operator commands, on Azurite + the emulators: commands are sent with ``pkictl send command``
and run by the queue-triggered function under devhost; devices register over mutual TLS with the device
client, and the hub emulator is read with the real ``IoTHubRegistryManager``."""

from __future__ import annotations

import io
import json
import secrets
import time

import pytest
from cryptography import x509

from handlers.records import customer_document, device_document
from pkictl.cli import main as pkictl

from .batch_helpers import onboarded, wired_env, with_host_json
from .worlds import Devhost, Fleet

pytestmark = pytest.mark.integration
QUEUE = "pki-commands"


@pytest.fixture(scope="module")
def storage(own_azurite):
    return own_azurite


@pytest.fixture
def env(storage, stack, tmp_path):
    values = wired_env(storage, stack, IOT_HUB_REGISTRY_OPS_PER_MIN="6000")
    return with_host_json(values, tmp_path, QUEUE, max_dequeue_count=3)


def test_disable_enable_device_and_customer_and_renew_on_the_local_stack(env, stack, tmp_path):
    fleet = Fleet(env, stack, tmp_path)
    acme, globex = fleet.acme, fleet.globex
    fleet.issue(acme, ["a-1", "a-2"], "first.jsonl")
    fleet.issue(globex, ["g-1"], "first.jsonl")
    for customer, device in ((acme, "a-1"), (acme, "a-2"), (globex, "g-1")):
        assert fleet.register(customer, device) == stack.iothub.hostname
    host = Devhost(env)
    try:
        # disable-device, delivered twice (same requestId): hub disabled, re-registration refused
        fleet.send("disable-device", "--customer", acme, "--device", "a-1", "--reason", "stolen",
                   "--request-id", "op-1")
        fleet.send("disable-device", "--customer", acme, "--device", "a-1", "--reason", "stolen",
                   "--request-id", "op-1")
        events = fleet.wait(acme, "disable-device", 2)
        assert sorted(e["effect"] for e in events) == ["changed", "no-op"]
        assert stack.iothub.device_status("a-1") == "disabled"
        assert "disabled" in fleet.refused(acme, "a-1")
        assert fleet.register(acme, "a-2") == stack.iothub.hostname  # its neighbours are unaffected
        fleet.send("enable-device", "--customer", acme, "--device", "a-1", "--reason", "found")
        fleet.wait(acme, "enable-device", 1)
        assert stack.iothub.device_status("a-1") == "enabled"
        assert fleet.register(acme, "a-1") == stack.iothub.hostname

        # disable-customer: no new registration for any of its devices; the other customer is unaffected
        fleet.send("disable-customer", "--customer", acme, "--reason", "unpaid", "--disable-devices",
                   "--request-id", "op-2")
        fleet.send("disable-customer", "--customer", acme, "--reason", "unpaid", "--disable-devices",
                   "--request-id", "op-2")
        events = fleet.wait(acme, "disable-customer", 2)
        assert sorted(e["effect"] for e in events) == ["changed", "no-op"]
        for device in ("a-1", "a-2"):
            assert "disabled" in fleet.refused(acme, device)
            assert stack.iothub.device_status(device) == "disabled"
        assert fleet.register(globex, "g-1") == stack.iothub.hostname
        assert stack.iothub.device_status("g-1") == "enabled"
        fleet.send("enable-customer", "--customer", acme, "--reason", "paid")
        fleet.wait(acme, "enable-customer", 1)
        assert fleet.register(acme, "a-2") == stack.iothub.hostname
        assert stack.iothub.device_status("a-2") == "enabled"

        # renew-intermediate, delivered twice: devices of the old and the new intermediate both register
        old = fleet.services.store.get(customer_document(acme)).data["intermediate"]
        fleet.send("renew-intermediate", "--customer", acme, "--reason", "yearly", "--request-id", "op-3")
        fleet.send("renew-intermediate", "--customer", acme, "--reason", "yearly", "--request-id", "op-3")
        events = fleet.wait(acme, "renew-intermediate", 2)
        assert sorted(e["effect"] for e in events) == ["changed", "no-op"]
    finally:
        log = host.stop()
    record = fleet.services.store.get(customer_document(acme)).data
    assert record["intermediate"]["serial"] != old["serial"]
    assert record["previousIntermediates"][0]["serial"] == old["serial"]
    assert len(stack.keyvault.key_versions(f"customer-{acme}")) == 2, log[-2000:]
    fleet.issue(acme, ["a-3"], "after-renewal.jsonl")
    new_device = x509.load_pem_x509_certificates(fleet.services.files.get(
        fleet.services.store.get(device_document("a-3")).data["outputs"]["pem"]))
    assert format(new_device[1].serial_number, "X") == record["intermediate"]["serial"]
    assert fleet.register(acme, "a-3") == stack.iothub.hostname  # issued by the new intermediate
    assert fleet.register(acme, "a-2") == stack.iothub.hostname  # issued by the old one (group secondary)
    out = io.StringIO()
    assert pkictl(["customer", "show", acme], env=fleet.operator_env, out=out) == 0
    shown = json.loads(out.getvalue())
    assert [shown["intermediate"]["serial"], shown["previousIntermediates"][0]["serial"]] == [
        record["intermediate"]["serial"], old["serial"]]
    out = io.StringIO()
    assert pkictl(["audit", "--customer", acme, "--device", "a-1"], env=fleet.operator_env, out=out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["batch.issue", "disable-device", "disable-device", "enable-device"]


MALFORMED = [
    "", "not json", "[1]", json.dumps({"command": "explode", "customerId": "x", "reason": "r"}),
    json.dumps({"customerId": "x", "reason": "r"}),
    json.dumps({"command": "disable-device", "customerId": "x", "reason": "r"}),
    json.dumps({"command": "disable-device", "customerId": "x", "deviceId": "A B", "reason": "r"}),
    json.dumps({"command": "enable-customer", "customerId": "x"}),
    json.dumps({"command": "enable-customer", "customerId": "X!", "reason": "r"}),
    json.dumps({"command": "renew-intermediate", "customerId": "x", "reason": "r", "extra": 1}),
    json.dumps({"command": "disable-customer", "customerId": "nobody-here", "reason": "r"}),  # unknown customer
]


def test_malformed_commands_are_rejected_with_recorded_reasons(env, storage):
    settings_env = {k: v for k, v in env.items() if not k.startswith("_")}
    services = onboarded(settings_env, f"x-{secrets.token_hex(3)}")
    queue = storage.queue_client(QUEUE)
    for text in MALFORMED:
        queue.send_message(text or " ")
    host = Devhost(env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = list(services.store.find(f"\"kind\" = 'rejection' AND \"queue\" = '{QUEUE}'"))
            if len(found) >= len(MALFORMED):
                break
            time.sleep(0.3)
    finally:
        host.stop()
    records = [services.store.get(n).data for n in found]
    assert len(records) == len(MALFORMED)
    assert all(r["reason"] and r["payload"] is not None for r in records), records
    fields = sorted(str(r.get("field")) for r in records)
    assert fields.count("message") == 3 and "deviceId" in fields and "reason" in fields and "extra" in fields


def test_a_device_id_one_customer_holds_is_neither_issued_to_nor_commanded_by_another(env, stack, tmp_path):
    """Penetration test finding 1, as it was run: two customers of one DPS instance each get a batch containing the
    same device id. Before device ids were held across customers, the second was issued too, its registration took
    over the first's hub device, and the first's disable-device then cut off the second's device."""
    fleet = Fleet(env, stack, tmp_path)
    acme, globex = fleet.acme, fleet.globex
    shared = f"shared-{secrets.token_hex(3)}"
    fleet.issue(acme, [shared], "takeover-a.jsonl")
    assert fleet.register(acme, shared) == stack.iothub.hostname
    acme_key = fleet.keys[shared]
    fleet.issue(globex, [shared], "takeover-b.jsonl")  # globex's own key for the id
    fleet.keys[shared] = acme_key
    report = json.loads(fleet.services.files.get(f"device-batches-results/{globex}/takeover-b.jsonl.json"))
    assert report["rows"][0]["status"] == "failed"
    assert "already provisioned for another customer" in report["rows"][0]["error"]
    assert acme not in report["rows"][0]["error"]  # who holds it is the other customer's business
    assert fleet.services.store.get(device_document(shared)).data["customerId"] == acme
    host = Devhost(env)
    try:
        fleet.send("disable-device", "--customer", globex, "--device", shared, "--reason", "takeover")
        deadline = time.monotonic() + 60
        while not (found := list(fleet.services.store.find(f"\"kind\" = 'rejection' AND \"queue\" = '{QUEUE}'"))):
            assert time.monotonic() < deadline, "the command was neither rejected nor recorded"
            time.sleep(0.3)
    finally:
        host.stop()
    rejection = fleet.services.store.get(found[0]).data
    assert rejection["field"] == "deviceId" and "has no certificate from this service" in rejection["reason"]
    assert stack.iothub.device_status(shared) == "enabled"
    assert fleet.register(acme, shared) == stack.iothub.hostname  # acme's device still provisions
