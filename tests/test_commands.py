"""Operator commands with fakes at their ports: contract, ordering, idempotency, renewal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json

import pytest
from cryptography import x509

from handlers.command_message import Command
from handlers.commands import run_command
from handlers.errors import InvalidMessage, Rejected, TransientError
from handlers.intermediates import RenewalRefused
from handlers.messages import Delivery
from handlers.records import device_document
from pki.export import thumbprints

from .fakes import run_concurrently
from .worlds import HUB, CommandWorld
from .x509_helpers import NOW


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
    ({"command": "renew-intermediate", "customerId": "contoso", "reason": "x", "force": "yes"}, "force"),
    ({"command": "disable-customer", "customerId": "contoso", "reason": "x", "force": True}, "force"),
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


@pytest.mark.parametrize("legacy", [False, True], ids=["record-keeps-certificate", "legacy-cert-file"])
def test_a_disabled_device_is_blocked_in_dps_with_its_own_certificate(world, legacy):
    """The individual enrollment that blocks a device holds its certificate: the record's, or for a record written
    before records kept it, the certificate file of its outputs."""
    world.device("d1", legacy=legacy)
    world.files.data = {p: (b"not this one" if not legacy else v) for p, v in world.files.data.items()}
    world.send(disable())
    enrollment = world.groups.enrollments["d1"]
    certificate = enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"]
    assert certificate == world.customer()["intermediate"]["certificatePem"]


def test_disable_then_enable_a_device(world):
    world.device("d1")
    world.send(disable())
    record = world.store.get(device_document("d1")).data
    assert record["status"] == "disabled" and record["disabledReason"] == "stolen"
    assert record["lastCommand"]["applied"] is True
    assert world.hubs.devices[(HUB, "d1")]["status"] == "disabled"
    assert world.groups.enrollments["d1"]["provisioningStatus"] == "disabled"
    assert "d1" in next(iter(world.store.find("\"kind\" = 'device' AND \"status\" = 'disabled'")))
    world.send({**disable(), "command": "enable-device", "reason": "found"})
    assert world.store.get(device_document("d1")).data["status"] == "issued"
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
    assert world.store.get(device_document("d1")).data["status"] == "issued"
    assert world.hubs.devices[(HUB, "d1")]["status"] == "enabled"


def test_concurrent_disable_and_enable_end_in_the_later_state(world):
    world.device("d1")
    for round_ in range(5):
        later_disables = round_ % 2 == 0
        base = NOW + dt.timedelta(hours=round_)
        messages = [(disable(), base + dt.timedelta(seconds=2 if later_disables else 1)),
                    ({**disable(), "command": "enable-device"},
                     base + dt.timedelta(seconds=1 if later_disables else 2))]
        calls = iter(messages)

        def one(calls=calls, round_=round_):
            message, at = next(calls)
            return run_command(Command.parse(json.dumps(message)), Delivery(f"m-{round_}-{at}", at),
                               ports=world.ports, now=NOW)

        run_concurrently(one, 2, expected=(TransientError,))
        wanted = "disabled" if later_disables else "issued"
        assert world.store.get(device_document("d1")).data["status"] == wanted
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
    _, errors = run_concurrently(lambda: world.send(message, message_id="same"), 4, expected=(TransientError,))
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
    assert world.store.get(device_document("d1")).data["hub"] == {
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


# --- tenant walls (penetration test finding 1) ----------------------------------------------------------------
def test_a_command_for_another_customers_device_is_rejected_without_naming_the_holder(world):
    world.device("shared-001", customer="fabrikam")
    with pytest.raises(Rejected, match="has no certificate from this service") as refused:
        world.send(disable("shared-001"))  # contoso asks
    assert "fabrikam" not in str(refused.value)
    assert world.hubs.devices[(HUB, "shared-001")]["status"] == "enabled"
    assert "shared-001" not in world.groups.enrollments  # nothing of DPS touched either


def test_a_hub_device_registered_through_another_enrollment_is_not_touched(world):
    # contoso's record holds d1, but DPS says the registration that placed d1 in the hub went through fabrikam's group
    # (a device of that id from outside this service): the hub device is not contoso's to disable.
    world.device("d1")
    world.groups.registered["d1"]["group"] = "fabrikam"
    world.send(disable())
    assert world.hubs.devices[(HUB, "d1")]["status"] == "enabled"
    hub = world.store.get(device_document("d1")).data["hub"]
    assert hub["status"] == "not-touched" and "another enrollment" in hub["why"]
    assert world.audit.events[-1]["hub"]["status"] == "not-touched"


# --- renewals cannot strand devices (penetration test finding 2) ----------------------------------------------
def renew(request_id: str, **extra) -> dict:
    return {"command": "renew-intermediate", "customerId": "contoso", "reason": "storm", "requestId": request_id,
            **extra}


def test_a_renewal_storm_renews_once_and_refuses_the_rest_naming_the_limit(world):
    world.keys.created = 0
    world.send(renew("storm-0"))
    for i in range(1, 10):
        with pytest.raises(RenewalRefused, match=r"limited to one per 24 h \(RENEWAL_MIN_INTERVAL_HOURS\)"):
            world.send(renew(f"storm-{i}"))
    assert world.keys.created == 1
    assert world.effects("renew-intermediate") == ["changed"] + ["rejected"] * 9
    assert world.audit.events[-1]["lastRenewal"]["id"] == "storm-0"


def test_concurrent_renewals_with_different_ids_make_one(world):
    world.keys.created = 0
    ids = itertools.count()  # (thread idents can repeat: a finished thread's is reused; count() is atomic)
    results, errors = run_concurrently(lambda: world.send(renew(f"c-{next(ids)}")), 5,
                                       expected=(RenewalRefused, TransientError))
    assert world.keys.created == 1 and len(results) == 1
    assert all(isinstance(e, RenewalRefused) or "in progress" in str(e) for e in errors)


def test_a_renewal_that_would_cut_devices_off_is_refused_unless_forced_and_every_issuer_stays_on_record(world):
    world.ports = dataclasses.replace(world.ports, settings=dataclasses.replace(
        world.settings, renewal_min_interval=dt.timedelta(0)))
    first = world.customer()["intermediate"]["serial"]
    world.device("old-1", issuer=first)
    world.device("old-gone", issuer=first, not_after="2020-01-01T00:00:00Z")  # expired: not counted
    world.device("old-off", issuer=first, status="disabled")  # disabled: not counted
    world.send(renew("r1"))  # the first intermediate becomes the group's secondary: old-1 still provisions
    with pytest.raises(RenewalRefused) as refused:
        world.send(renew("r2"))
    assert f"drop intermediate {first}" in refused.value.reason and "1 active, unexpired device(s)" in \
        refused.value.reason and "(old-1)" in refused.value.reason
    assert world.audit.events[-1]["wouldCutOff"] == {"intermediate": first, "devices": 1, "named": ["old-1"]}
    for i in range(3, 10):  # forced renewals: each cuts off what it must, and no issuer leaves the record
        world.send(renew(f"r{i}", force=True))
    record = world.customer()
    assert [p["serial"] for p in record["previousIntermediates"]][-1] == first
    assert len(record["previousIntermediates"]) == 8 and record["renewals"][0]["id"] == "r9"


def test_the_sweep_holds_a_renewal_that_would_strand_devices_and_reports_it(world):
    from handlers.expiry_sweep import SweepSettings, run_sweep

    from .fakes import MemoryQueue

    world.ports = dataclasses.replace(world.ports, settings=dataclasses.replace(
        world.settings, renewal_min_interval=dt.timedelta(0)))
    first = world.customer()["intermediate"]["serial"]
    world.send(renew("r1"))
    world.device("old-1", issuer=first)
    report = run_sweep(ports=world.ports, queue=MemoryQueue(), now=NOW,
                       settings=SweepSettings(renew_before_days=100 * 365))  # everything is "near expiry"
    held = {h["customerId"]: h["reason"] for h in report["intermediates"]["held"]}
    assert "old-1" in held["contoso"] and report["counts"]["renewalsHeld"] == 1
    assert "fabrikam" in {r["customerId"] for r in report["intermediates"]["renewed"]}


def test_a_command_of_the_same_enqueue_second_as_the_recorded_one_is_applied_not_superseded(world):
    # Queue insertion times have one-second resolution: a disable-customer applied, then an enable-customer enqueued
    # in the same second. Its random requestId may sort before the disable's; it must still be applied (CI caught
    # the old ordering calling it "superseded").
    world.device("d1")
    at = NOW + dt.timedelta(minutes=5)
    customer = {"customerId": "contoso", "reason": "contract run"}
    world.send({**customer, "command": "disable-customer", "requestId": "cli-ffff"}, at=at)
    outcome = world.send({**customer, "command": "enable-customer", "requestId": "cli-0000"}, at=at)
    assert "superseded" not in outcome and world.customer()["status"] == "active"
    assert world.customer()["lastCommand"]["command"] == "enable-customer"


def test_a_command_enqueued_a_second_before_the_recorded_one_is_superseded(world):
    at = NOW + dt.timedelta(minutes=5)
    customer = {"customerId": "contoso", "reason": "r"}
    world.send({**customer, "command": "disable-customer", "requestId": "cli-0000"}, at=at)
    outcome = world.send({**customer, "command": "enable-customer", "requestId": "cli-ffff"},
                         at=at - dt.timedelta(seconds=1))
    assert "superseded" in outcome and world.customer()["status"] == "disabled"


WEBHOOK = "https://pki.example/api/dps-allocation?code=k"


def _with_webhook(world: CommandWorld, url: str | None = WEBHOOK) -> None:
    world.settings = dataclasses.replace(world.settings, allocation_webhook_url=url)
    world.ports = dataclasses.replace(world.ports, settings=world.settings)


def allocation(enable: bool, customer: str = "contoso", **extra) -> dict:
    return {"command": f"{'enable' if enable else 'disable'}-custom-allocation", "customerId": customer,
            "reason": "renewals through DPS", **extra}


def test_custom_allocation_switches_one_customers_group_either_way_and_once(world):
    """#18: an operator command switches an existing customer's group to the webhook (custom allocation) and back
    to its recorded policy; the other customer's group is untouched, and a repeat is a no-op."""
    _with_webhook(world)
    contoso = world.groups.groups["dps1"]["contoso"]
    assert contoso["allocationPolicy"] == "hashed"  # onboarded before the webhook existed
    fabrikam_dps = world.customer("fabrikam")["dps"]["name"]
    fabrikam_before = dict(world.groups.groups[fabrikam_dps]["fabrikam"])

    assert world.send(allocation(True)) == "customer contoso: allocation direct -> custom"
    group = world.groups.groups["dps1"]["contoso"]
    assert group["allocationPolicy"] == "custom"
    assert group["customAllocationDefinition"] == {"webhookUrl": WEBHOOK, "apiVersion": "2021-10-01"}
    assert world.customer()["allocation"] == "custom"
    assert world.send(allocation(True)).endswith("allocation already custom (no-op)")

    assert world.send(allocation(False)) == "customer contoso: allocation custom -> direct"
    group = world.groups.groups["dps1"]["contoso"]
    assert group["allocationPolicy"] == "hashed" and "customAllocationDefinition" not in group
    assert world.customer()["allocation"] == "direct"
    assert world.groups.groups[fabrikam_dps]["fabrikam"] == fabrikam_before
    assert world.effects("enable-custom-allocation") == ["changed", "no-op"]
    assert world.effects("disable-custom-allocation") == ["changed"]
    event = next(e for e in world.audit.events if e["action"] == "disable-custom-allocation")
    assert (event["before"], event["after"], event["policy"]) == ("custom", "direct", "hashed")


def test_a_group_switched_to_direct_stays_so_when_other_commands_rewrite_it(world):
    """The record's choice is what every later rewrite (a status command, a renewal, the sweep) applies: the guard
    that refuses to drop the webhook for want of its setting does not fire for a customer switched off on purpose."""
    _with_webhook(world)
    world.send(allocation(True))
    world.send(allocation(False))
    world.send({"command": "disable-customer", "customerId": "contoso", "reason": "unpaid"})
    group = world.groups.groups["dps1"]["contoso"]
    assert (group["provisioningStatus"], group["allocationPolicy"]) == ("disabled", "hashed")
    _with_webhook(world, None)  # a person's run without the setting: direct needs none
    world.send({"command": "enable-customer", "customerId": "contoso", "reason": "paid"})
    assert world.groups.groups["dps1"]["contoso"]["provisioningStatus"] == "enabled"


def test_enabling_custom_allocation_without_a_webhook_is_rejected_naming_the_setting(world):
    with pytest.raises(Rejected) as refused:
        world.send(allocation(True))
    assert refused.value.field == "command" and "DPS_ALLOCATION_WEBHOOK_URL" in str(refused.value)
    assert world.groups.groups["dps1"]["contoso"]["allocationPolicy"] == "hashed"
    assert "allocation" not in world.customer()


def test_a_status_command_never_supersedes_an_allocation_command_or_the_other_way_round(world):
    """Each state keeps its own last command: a disable-customer enqueued before an allocation switch that landed
    first is applied, not superseded, and both end in the group."""
    _with_webhook(world)
    later, earlier = NOW + dt.timedelta(minutes=5), NOW + dt.timedelta(minutes=1)
    world.send(allocation(True), at=later)
    world.send({"command": "disable-customer", "customerId": "contoso", "reason": "unpaid"}, at=earlier)
    group = world.groups.groups["dps1"]["contoso"]
    assert (group["provisioningStatus"], group["allocationPolicy"]) == ("disabled", "custom")
    assert world.effects("disable-customer") == ["changed"]
    world.send(allocation(False), at=earlier)  # older than the recorded allocation command: superseded
    assert world.effects("disable-custom-allocation") == ["no-op"]
    assert world.groups.groups["dps1"]["contoso"]["allocationPolicy"] == "custom"
