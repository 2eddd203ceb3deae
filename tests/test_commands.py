"""Operator commands with fakes at their ports: contract, ordering, idempotency, renewal."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509

from handlers.batch_chunk import device_document, device_tags
from handlers.commands import Command, Ports, run_command
from handlers.errors import InvalidMessage, Rejected, TransientError
from handlers.messages import Delivery
from handlers.onboarding import customer_document
from pki.export import thumbprints

from .fakes import FakeDps, FakeHubs, run_concurrently
from .test_onboarding import World
from .x509_helpers import NOW

HUB = "hub1.azure-devices.net"


class Files:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, path: str) -> bytes:
        return self.data[path]


class CommandWorld(World):
    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.groups = FakeDps()
        self.hubs = FakeHubs()
        self.files = Files()
        self.onboard({"customerId": "contoso"})
        self.onboard({"customerId": "fabrikam"})
        self.ports = Ports(store=self.store, keys=self.keys, dps=self.groups, hubs=self.hubs, files=self.files,
                           audit=self.audit, settings=self.settings)
        self.sequence = 0

    def device(self, device_id: str, customer: str = "contoso", registered: bool = True) -> None:
        record = {"customerId": customer, "deviceId": device_id, "status": "issued", "serial": "01",
                  "notAfter": "2027-11-29T00:00:00Z", "outputs": {"certificate": f"out/{device_id}/cert.pem"}}
        self.files.data[record["outputs"]["certificate"]] = self.customer(customer)["intermediate"][
            "certificatePem"].encode()
        self.store.create(device_document(customer, device_id), record, tags=device_tags(record))
        if registered:
            self.groups.registered[device_id] = {"registrationId": device_id, "deviceId": device_id,
                                                 "assignedHub": HUB, "group": customer}
            self.hubs.add(HUB, device_id)

    def customer(self, customer: str = "contoso") -> dict:
        return self.store.get(customer_document(customer)).data

    def send(self, message: dict, *, message_id: str | None = None, at: dt.datetime | None = None) -> str:
        self.sequence += 1
        delivery = Delivery(message_id or f"m{self.sequence}", at or NOW + dt.timedelta(seconds=self.sequence))
        return run_command(Command.parse(json.dumps(message)), delivery, ports=self.ports, now=NOW)

    def effects(self, action: str) -> list[str]:
        return [e["effect"] for e in self.audit.events if e["action"] == action]


@pytest.fixture
def world(tmp_path):
    return CommandWorld(tmp_path)


def disable(device="d1", **extra):
    return {"command": "disable-device", "customerId": "contoso", "deviceId": device, "reason": "stolen", **extra}


MALFORMED = [
    ("", "message"),
    ("[]", "message"),
    ({"customerId": "contoso", "reason": "x"}, "command"),
    ({"command": "explode", "customerId": "contoso", "reason": "x"}, "command"),
    ({"command": "disable-device", "reason": "x", "deviceId": "d1"}, "customerId"),
    ({"command": "disable-device", "customerId": "Contoso!", "reason": "x", "deviceId": "d1"}, "customerId"),
    ({"command": "disable-device", "customerId": "contoso", "reason": "x"}, "deviceId"),
    ({"command": "disable-device", "customerId": "contoso", "reason": "x", "deviceId": "Bad Id"}, "deviceId"),
    ({"command": "disable-customer", "customerId": "contoso", "reason": "x", "deviceId": "d1"}, "deviceId"),
    ({"command": "disable-device", "customerId": "contoso", "deviceId": "d1"}, "reason"),
    ({"command": "disable-device", "customerId": "contoso", "deviceId": "d1", "reason": "a\nb"}, "reason"),
    ({"command": "enable-customer", "customerId": "contoso", "reason": "x", "disableDevices": True}, "disableDevices"),
    ({"command": "disable-customer", "customerId": "contoso", "reason": "x", "disableDevices": "yes"},
     "disableDevices"),
    ({"command": "renew-intermediate", "customerId": "contoso", "reason": "x", "requestId": "has space"},
     "requestId"),
    ({"command": "renew-intermediate", "customerId": "contoso", "reason": "x", "force": True}, "force"),
]


@pytest.mark.parametrize("message,field", MALFORMED)
def test_malformed_commands_name_the_field(message, field):
    with pytest.raises(InvalidMessage) as caught:
        Command.parse(message if isinstance(message, str) else json.dumps(message))
    assert caught.value.field == field


def test_unknown_customer_or_device_is_rejected(world):
    with pytest.raises(Rejected, match="unknown"):
        world.send({**disable(), "customerId": "nobody"})
    with pytest.raises(Rejected, match="no certificate from this service"):
        world.send(disable("ghost"))


def test_disable_then_enable_a_device(world):
    world.device("d1")
    world.send(disable())
    record = world.store.get(device_document("contoso", "d1")).data
    assert record["status"] == "disabled" and record["disabledReason"] == "stolen"
    assert record["lastCommand"]["applied"] is True
    assert world.hubs.devices[(HUB, "d1")]["status"] == "disabled"
    assert world.groups.enrollments["d1"]["provisioningStatus"] == "disabled"
    assert "d1" in list(world.store.find("\"kind\" = 'device' AND \"status\" = 'disabled'"))[0]
    world.send({**disable(), "command": "enable-device", "reason": "found"})
    assert world.store.get(device_document("contoso", "d1")).data["status"] == "issued"
    assert world.hubs.devices[(HUB, "d1")]["status"] == "enabled"
    assert "d1" not in world.groups.enrollments
    assert world.effects("disable-device") == ["changed"] and world.effects("enable-device") == ["changed"]


def test_a_device_that_never_registered_is_blocked_in_dps_only(world):
    world.device("d2", registered=False)
    assert "disabled" in world.send(disable("d2"))
    assert world.groups.enrollments["d2"]["provisioningStatus"] == "disabled" and world.hubs.calls == 0


def test_a_command_delivered_twice_is_one_effect_and_one_no_op(world):
    world.device("d1")
    world.send(disable(requestId="op-1"), message_id="m-1")
    assert "no-op" in world.send(disable(requestId="op-1"), message_id="m-1")
    assert world.effects("disable-device") == ["changed", "no-op"]


def test_an_older_command_arriving_late_is_superseded(world):
    world.device("d1")
    world.send({**disable(), "command": "enable-device"}, at=NOW + dt.timedelta(minutes=5))
    outcome = world.send(disable(), at=NOW + dt.timedelta(minutes=1))  # enqueued earlier, delivered later
    assert "superseded" in outcome
    assert world.store.get(device_document("contoso", "d1")).data["status"] == "issued"
    assert world.hubs.devices[(HUB, "d1")]["status"] == "enabled"


def test_concurrent_disable_and_enable_end_in_the_later_state(world):
    world.device("d1")
    for round_ in range(5):
        later_disables = round_ % 2 == 0
        base = NOW + dt.timedelta(hours=round_)
        messages = [(disable(), base + dt.timedelta(seconds=2 if later_disables else 1)),
                    ({**disable(), "command": "enable-device"}, base + dt.timedelta(seconds=1 if later_disables else 2))]
        calls = iter(messages)

        def one():
            message, at = next(calls)
            return run_command(Command.parse(json.dumps(message)), Delivery(f"m-{round_}-{at}", at),
                               ports=world.ports, now=NOW)

        run_concurrently(one, 2, expected=(TransientError,))
        wanted = "disabled" if later_disables else "issued"
        assert world.store.get(device_document("contoso", "d1")).data["status"] == wanted
        assert world.hubs.devices[(HUB, "d1")]["status"] == ("disabled" if later_disables else "enabled")
        assert ("d1" in world.groups.enrollments) == later_disables


def test_disable_customer_stops_its_group_and_optionally_its_hub_devices(world):
    for i in range(150):
        world.device(f"c{i}")
    world.device("f1", customer="fabrikam")
    world.send(disable("c0"))  # individually disabled: stays disabled when the customer is enabled again
    calls = world.hubs.calls
    world.send({"command": "disable-customer", "customerId": "contoso", "reason": "unpaid", "disableDevices": True})
    assert world.customer()["status"] == "disabled"
    assert world.groups.groups["dps1"]["contoso"]["provisioningStatus"] == "disabled"
    assert world.groups.groups[world.customer("fabrikam")["dps"]["name"]]["fabrikam"]["provisioningStatus"] == "enabled"
    assert all(world.hubs.devices[(HUB, f"c{i}")]["status"] == "disabled" for i in range(150))
    assert world.hubs.devices[(HUB, "f1")]["status"] == "enabled"
    assert world.hubs.calls - calls == 2  # 150 devices in bulk calls of at most 100
    world.send({"command": "enable-customer", "customerId": "contoso", "reason": "paid"})
    assert world.customer()["status"] == "active"
    assert world.groups.groups["dps1"]["contoso"]["provisioningStatus"] == "enabled"
    assert world.hubs.devices[(HUB, "c0")]["status"] == "disabled"
    assert all(world.hubs.devices[(HUB, f"c{i}")]["status"] == "enabled" for i in range(1, 150))
    assert world.effects("disable-customer") == ["changed"] and world.effects("enable-customer") == ["changed"]


def test_renewal_rolls_the_group_and_happens_once_per_command(world):
    old = world.customer()
    world.keys.created = 0
    outcome = world.send({"command": "renew-intermediate", "customerId": "contoso", "reason": "yearly",
                          "requestId": "renew-1"})
    assert "renewed" in outcome
    renewed = world.customer()
    assert world.keys.created == 1 and renewed["key"]["version"] != old["key"]["version"]
    assert renewed["intermediate"]["serial"] != old["intermediate"]["serial"]
    assert renewed["previousIntermediates"][0]["serial"] == old["intermediate"]["serial"]
    slots = world.groups.get_group("dps1", "contoso").data["attestation"]["x509"]["signingCertificates"]
    new_cert = x509.load_pem_x509_certificate(renewed["intermediate"]["certificatePem"].encode())
    assert slots["primary"]["info"]["sha1Thumbprint"] == thumbprints(new_cert)["sha1"]
    assert slots["secondary"]["info"]["sha1Thumbprint"] == old["intermediate"]["thumbprintSha1"]
    assert "no-op" in world.send({"command": "renew-intermediate", "customerId": "contoso", "reason": "yearly",
                                  "requestId": "renew-1"})
    assert world.keys.created == 1 and world.effects("renew-intermediate") == ["changed", "no-op"]


def test_concurrent_deliveries_of_one_renewal_create_one_key_version(world):
    world.keys.created = 0
    message = {"command": "renew-intermediate", "customerId": "contoso", "reason": "r", "requestId": "renew-2"}
    results, errors = run_concurrently(lambda: world.send(message, message_id="same"), 4,
                                       expected=(TransientError,))
    for _ in errors:  # the host retries those that found the renewal in progress
        world.send(message, message_id="same")
    assert world.keys.created == 1
    assert world.effects("renew-intermediate").count("changed") == 1


def test_a_refused_latest_attempt_does_not_lose_the_hub_the_record_learned(world):
    # DPS's registration state names a hub only while the latest attempt was assigned; a disabled device that
    # tries again gets a "disabled" state with no hub, and enable-device must still reach its hub device.
    world.device("d1")
    world.send(disable())
    assert world.hubs.devices[(HUB, "d1")]["status"] == "disabled"
    assert world.store.get(device_document("contoso", "d1")).data["hub"] == {
        "name": HUB, "deviceId": "d1", "status": "disabled"}
    world.groups.registered["d1"] = {"registrationId": "d1", "status": "disabled", "errorCode": 401005,
                                     "group": "contoso"}
    world.send({**disable(), "command": "enable-device"})
    assert world.hubs.devices[(HUB, "d1")]["status"] == "enabled"


def test_a_device_its_hub_no_longer_has_counts_as_done_and_the_audit_says_so(world):
    world.device("d1")
    del world.hubs.devices[(HUB, "d1")]  # deleted from the hub by hand
    assert "issued -> disabled" in world.send(disable())
    event = [e for e in world.audit.events if e["action"] == "disable-device"][-1]
    assert event["effect"] == "changed" and event["hub"]["status"] == "absent"
    world.device("d2", registered=False)
    world.send(disable("d2"))
    event = [e for e in world.audit.events if e["action"] == "disable-device"][-1]
    assert event["hub"] == "never assigned to a hub: nothing to change there"
    # in bulk (disable-customer with its devices): a device the hub no longer has is reported, not an error
    world.device("d3")
    world.device("d4")
    del world.hubs.devices[(HUB, "d4")]
    world.send({"command": "disable-customer", "customerId": "contoso", "reason": "r", "disableDevices": True})
    event = [e for e in world.audit.events if e["action"] == "disable-customer"][-1]
    assert f"{HUB}/d4" in event["absentFromHub"] and world.hubs.devices[(HUB, "d3")]["status"] == "disabled"


def test_enable_customer_reaches_devices_whose_refused_attempts_made_dps_forget_their_hub(world):
    world.device("d1")
    world.device("d2")
    world.send({"command": "disable-customer", "customerId": "contoso", "reason": "unpaid", "disableDevices": True})
    for device in ("d1", "d2"):  # both try again while the group is disabled: DPS records "disabled", no hub
        world.groups.registered[device] = {"registrationId": device, "status": "disabled", "group": "contoso"}
    world.send({"command": "enable-customer", "customerId": "contoso", "reason": "paid"})
    assert [world.hubs.devices[(HUB, d)]["status"] for d in ("d1", "d2")] == ["enabled", "enabled"]
