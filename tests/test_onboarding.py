"""The onboarding use case with fakes at its ports: contract, state machine, idempotency, placement."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509

from handlers.dps_pool import OnboardingSettings
from handlers.errors import CapacityExhausted, InvalidMessage, Rejected
from handlers.onboarding import OnboardingRequest
from handlers.records import customer_document, list_customers
from pki.keys import KeyType

from .fakes import run_concurrently
from .worlds import POOL, World
from .x509_helpers import NOW, assert_ca_cert, openssl_verify


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


MESSAGE = {"customerId": "contoso", "displayName": "Contoso Ltd", "country": "DE", "requestId": "erp-1",
           "initialTwin": {"tags": {"customer": "contoso"}, "properties": {"desired": {"telemetryInterval": 60}}}}


def test_a_new_customer_gets_an_intermediate_and_a_group(world):
    outcome = world.onboard(MESSAGE, message_id="m1")
    assert outcome.status == "onboarded"
    record = world.store.get(customer_document("contoso")).data
    assert record["status"] == "active" and record["dps"]["name"] == "dps1"
    intermediate = x509.load_pem_x509_certificate(record["intermediate"]["certificatePem"].encode())
    root = x509.load_pem_x509_certificate(world.store.get("root-ca.json").data["certificatePem"].encode())
    assert_ca_cert(intermediate, issuer=root, path_length=0)
    assert openssl_verify(root, intermediate, purpose=None).returncode == 0
    assert intermediate.subject.rfc4514_string() == "CN=contoso,O=Contoso Ltd,C=DE"
    group = world.groups.groups["dps1"]["contoso"]
    assert group["attestation"]["x509"]["signingCertificates"]["primary"]["certificate"] == \
        record["intermediate"]["certificatePem"]
    assert group["initialTwin"] == MESSAGE["initialTwin"]
    assert group["iotHubs"] == ["hub1.azure-devices.net"] and group["provisioningStatus"] == "enabled"
    assert world.keys.created == 1
    transitions = [(e["before"], e["after"]) for e in world.audit.events]
    assert transitions == [(None, "pending"), ("pending", "key_created"), ("key_created", "certificate_issued"),
                           ("certificate_issued", "group_created"), ("group_created", "active")]
    assert all(e["requestId"] == "erp-1" and e["messageId"] == "m1" for e in world.audit.events)
    assert list_customers(world.store) == ["contoso"]


def test_redelivery_is_a_no_op_in_the_audit_log(world):
    world.onboard(MESSAGE)
    for _ in range(3):
        assert world.onboard({**MESSAGE, "requestId": "erp-retry"}).status == "already_active"
    assert world.keys.created == 1 and world.groups.creates == 1
    assert [e["effect"] for e in world.audit.events[-3:]] == ["no-op"] * 3


def test_same_id_with_other_parameters_is_rejected_naming_the_difference(world):
    world.onboard(MESSAGE)
    with pytest.raises(Rejected) as caught:
        world.onboard({**MESSAGE, "country": "FR"})
    assert "country: recorded 'DE', message 'FR'" in str(caught.value)


def test_a_crash_after_the_key_resumes_with_that_key(world):
    world.keys.fail_signing = 1  # the root's signature fails once: the key exists, no certificate yet
    with pytest.raises(ConnectionError):
        world.onboard(MESSAGE)
    record = world.store.get(customer_document("contoso")).data
    assert record["status"] == "key_created"
    world.store.replace(world.store.get(customer_document("contoso")), {**record, "lease": None})  # lease ran out
    assert world.onboard(MESSAGE).status == "onboarded"
    assert world.keys.created == 1


def test_a_key_made_by_a_run_that_crashed_before_recording_it_is_reused(world):
    world.keys.create_key("customer-contoso", KeyType.EC_P256)  # as if a run died right after create_key
    world.onboard(MESSAGE)
    assert world.keys.created == 1
    assert world.store.get(customer_document("contoso")).data["key"]["version"] == \
        world.keys.get_key("customer-contoso").version


def test_concurrent_deliveries_converge_on_one_key_and_one_group(world):
    # a TransientError ("in progress, retry") is an acceptable answer for the losers
    outcomes, errors = run_concurrently(lambda: world.onboard(MESSAGE).status, 5)
    assert "onboarded" in outcomes
    assert world.keys.created == 1 and world.groups.creates == 1
    assert all(type(e).__name__ == "TransientError" for e in errors)


def test_placement_fills_the_emptier_instance_and_respects_linked_hubs(tmp_path):
    world = World(tmp_path)
    for i in range(4):
        world.onboard({"customerId": f"c{i}"})
    placed = [world.store.get(customer_document(f"c{i}")).data["dps"]["name"] for i in range(4)]
    assert placed == ["dps1", "dps2", "dps1", "dps2"]
    world.onboard({"customerId": "hub2-only", "iotHubs": ["hub2.azure-devices.net"]})
    assert world.store.get(customer_document("hub2-only")).data["dps"]["name"] == "dps2"
    with pytest.raises(InvalidMessage, match="iotHubs: no DPS instance links all of hub3"):
        world.onboard({"customerId": "nowhere", "iotHubs": ["hub3.azure-devices.net"]})


def test_a_full_pool_rejects_without_leaving_state(tmp_path):
    world = World(tmp_path)
    world.settings = OnboardingSettings(pool=POOL, max_groups_per_dps=2)
    for i in range(4):
        world.onboard({"customerId": f"c{i}"})
    with pytest.raises(CapacityExhausted, match="every eligible DPS instance holds 2 enrollment groups"):
        world.onboard({"customerId": "c4"})
    assert world.store.get(customer_document("c4")) is None
    assert world.audit.events[-1]["effect"] == "rejected"


def test_a_dps_that_fills_up_under_us_moves_the_customer_before_its_group_exists(tmp_path):
    world = World(tmp_path, capacity=1)
    world.groups.groups["dps1"] = {"foreign": {}}  # a group this service did not make: dps1 is full
    world.onboard({"customerId": "contoso"})
    assert world.store.get(customer_document("contoso")).data["dps"]["name"] == "dps2"
    assert "contoso" in world.groups.groups["dps2"]


def test_a_group_of_the_same_id_with_another_certificate_is_not_taken_over(world, tmp_path):
    other = World(tmp_path / "other")
    other.onboard(MESSAGE)
    world.groups.groups["dps1"] = other.groups.groups["dps1"]
    with pytest.raises(Rejected, match="exists on dps1 with another signing certificate"):
        world.onboard(MESSAGE)


@pytest.mark.parametrize("raw, field, rule", [
    ("not json", "message", "neither JSON nor base64"),
    (base64.b64encode(b"{bad").decode(), "message", "not valid JSON"),
    ('{"customerId": ', "message", "not valid JSON"),
    ("", "message", "is empty"),
    (base64.b64encode(b"[1]").decode(), "message", "must be a JSON object"),
    ("{}", "customerId", "is required"),
    ('{"customerId": ""}', "customerId", "must not be empty"),
    ('{"customerId": "Contoso"}', "customerId", "must be lowercase"),
    ('{"customerId": "con_toso"}', "customerId", "is not a customer id (1-63 of a-z, 0-9 and '-'"),
    ('{"customerId": "-contoso"}', "customerId", "starting and ending with a letter or digit"),
    ('{"customerId": "' + "a" * 64 + '"}', "customerId", "at most 63 characters"),
    ('{"customerId": 42}', "customerId", "must be a string, not a number"),
    ('{"customerId": "c", "custmerName": "x"}', "custmerName", "unknown field(s) 'custmerName'"),
    ('{"customerId": "c", "country": "Germany"}', "country", "not an ISO 3166 alpha-2 code"),
    ('{"customerId": "c", "country": "XX"}', "country", "not an ISO 3166 alpha-2 code"),
    ('{"customerId": "c", "displayName": "' + "x" * 65 + '"}', "displayName", "at most 64 characters"),
    ('{"customerId": "c", "iotHubs": "hub1"}', "iotHubs", "must be a list of non-empty strings"),
    ('{"customerId": "c", "allocationPolicy": "custom"}', "allocationPolicy", "must be one of"),
    ('{"customerId": "c", "allocationPolicy": "static"}', "iotHubs", "exactly one IoT hub"),
    ('{"customerId": "c", "iotEdge": "yes"}', "iotEdge", "must be true or false"),
    ('{"customerId": "c", "initialTwin": {"tags": {}, "reported": {}}}', "initialTwin.reported", "unknown field"),
    ('{"customerId": "c", "initialTwin": [1]}', "initialTwin", "must be a JSON object"),
    ('{"customerId": "c", "initialTwin": {"tags": {"x": "' + "y" * 20000 + '"}}}', "initialTwin", "at most 16384"),
])
def test_malformed_messages_name_the_field(raw, field, rule):
    with pytest.raises(InvalidMessage) as caught:
        OnboardingRequest.parse(raw)
    assert caught.value.field == field
    assert rule in str(caught.value)


def test_plain_and_base64_messages_are_the_same_request():
    plain = json.dumps(MESSAGE)
    assert OnboardingRequest.parse(plain) == OnboardingRequest.parse(base64.b64encode(plain.encode()))


def test_the_same_message_delivered_twice_at_once_still_makes_one_key(world):
    _, errors = run_concurrently(lambda: world.onboard(MESSAGE, message_id="same-message").status, 3)
    assert world.keys.created == 1 and world.groups.creates == 1
    assert all(type(e).__name__ == "TransientError" for e in errors)


def test_a_customer_rejected_for_capacity_keeps_its_intermediate_when_retried(tmp_path):
    world = World(tmp_path, capacity=0)  # every DPS refuses: the customer is rejected after its intermediate
    with pytest.raises(CapacityExhausted, match="refused a new enrollment group as full"):
        world.onboard({"customerId": "late"})
    rejected = world.store.get(customer_document("late")).data
    assert rejected["status"] == "rejected" and rejected["dps"] == {}
    assert list(world.store.find("\"kind\" = 'customer' AND \"dps\" = 'dps1'")) == []  # no longer counted
    world.groups.capacity = 100
    world.onboard({"customerId": "late"})
    active = world.store.get(customer_document("late")).data
    assert active["status"] == "active"
    assert active["intermediate"]["serial"] == rejected["intermediate"]["serial"]
    assert world.keys.created == 1


def test_with_the_allocation_webhook_configured_groups_allocate_through_it_and_the_record_keeps_the_policy(tmp_path):
    """DPS_ALLOCATION_WEBHOOK_URL: the group's allocationPolicy is custom, with the webhook (service.json's
    CustomAllocationDefinition); the customer's own policy stays recorded, for the webhook to apply."""
    import dataclasses

    world = World(tmp_path)
    url = "https://pki-app.azurewebsites.net/api/dps-allocation?code=function-key"
    world.settings = dataclasses.replace(world.settings, allocation_webhook_url=url)
    world.onboard({"customerId": "acme", "allocationPolicy": "static", "iotHubs": ["hub1.azure-devices.net"]})
    group = world.groups.groups["dps1"]["acme"]
    assert group["allocationPolicy"] == "custom"
    assert group["customAllocationDefinition"] == {"webhookUrl": url, "apiVersion": "2021-10-01"}
    assert group["iotHubs"] == ["hub1.azure-devices.net"]
    record = world.store.get(customer_document("acme")).data
    assert record["parameters"]["allocationPolicy"] == "static" and record["status"] == "active"


def test_a_run_without_the_webhook_setting_refuses_to_switch_a_custom_group_back(tmp_path):
    import dataclasses

    from handlers.enrollments import sync_group
    from handlers.errors import Rejected
    from handlers.ports import Ports

    world = World(tmp_path)
    with_webhook = dataclasses.replace(world.settings, allocation_webhook_url="https://app/api/dps-allocation?code=k")
    world.settings = with_webhook
    world.onboard({"customerId": "acme"})
    customer = world.store.get(customer_document("acme")).data
    ports = Ports(store=world.store, keys=world.keys, dps=world.groups, hubs=None, files=None, audit=world.audit,
                  settings=dataclasses.replace(with_webhook, allocation_webhook_url=None))
    with pytest.raises(Rejected, match="DPS_ALLOCATION_WEBHOOK_URL"):
        sync_group(ports, {**customer, "status": "disabled"}, NOW)
    assert world.groups.groups["dps1"]["acme"]["allocationPolicy"] == "custom"
