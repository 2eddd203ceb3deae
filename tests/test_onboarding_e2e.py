"""ACCEPTANCE for customer onboarding, on Azurite + the emulators with the real SDK clients; the
queue-triggered function runs under devhost exactly as deployed (function_app.py)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clients.audit import StoreAuditLog
from clients.factory import enrollment_groups, key_store
from clients.storage import queue_client, state_store
from devhost.stack import person_settings, sas_settings
from emulators.stack import ADMIN, APP
from handlers.errors import CapacityExhausted
from handlers.onboarding import OnboardingRequest, onboard_customer
from handlers.records import customer_document
from handlers.root_ca import RootRequest, create_root
from pki.export import thumbprints
from pki.keys import KeyType
from settings import load_settings

from .batch_helpers import wired_env, with_host_json
from .worlds import Devhost
from .x509_helpers import assert_ca_cert, openssl_verify

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
QUEUE = "customer-onboarding"


@pytest.fixture(scope="module")
def storage(own_azurite):
    return own_azurite


def stack_settings(azurite, stack, container: str) -> dict[str, str]:
    return wired_env(azurite, stack, STATE_CONTAINER=container)


@pytest.fixture
def env(storage, stack, tmp_path):
    values = {**stack_settings(storage, stack, f"state-{secrets.token_hex(5)}"),
              "ROOT_CA_KEY_NAME": f"root-{secrets.token_hex(4)}"}
    settings = load_settings(values)
    # As on Azure: the PKI administrator creates the root key in the root vault; the app only reads and signs there.
    admin = load_settings(person_settings(values, stack.client_id(ADMIN)))
    create_root(RootRequest(settings.root_key_name, KeyType.EC_P384, 20, "E2E Root"),
                store=state_store(settings), keys=key_store(admin), now=dt.datetime.now(dt.UTC))
    assert stack.rootvault.key_versions(settings.root_key_name) and not stack.keyvault.key_versions(
        settings.root_key_name)
    return with_host_json(values, tmp_path, QUEUE)


def _queue(env: dict):
    return queue_client(load_settings({k: v for k, v in env.items() if not k.startswith("_")}), QUEUE)


def send(env: dict, text: str) -> None:
    _queue(env).send_message(text)


def settle(env: dict, customers: list[str], timeout: float = 120) -> dict[str, dict]:
    """Wait until the queue is empty and every customer is active; returns their records."""
    store = state_store(load_settings({k: v for k, v in env.items() if not k.startswith("_")}))
    queue = _queue(env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = {c: store.get(customer_document(c)) for c in customers}
        done = all(r is not None and r.data["status"] == "active" for r in records.values())
        if done and queue.get_queue_properties().approximate_message_count == 0:
            return {c: r.data for c, r in records.items()}
        time.sleep(0.3)
    failures = [store.get(n).data for n in store.find("\"kind\" = 'failure'")]
    raise AssertionError(f"not settled: { {c: (r.data['status'] if r else None) for c, r in records.items()} }; "
                         f"failures: {json.dumps(failures)[:3000]}")


def audit_events(env: dict, customer: str) -> list[dict]:
    store = state_store(load_settings({k: v for k, v in env.items() if not k.startswith("_")}))
    names = store.find(f"\"kind\" = 'audit' AND \"customer\" = '{customer}'")
    return sorted((store.get(n).data for n in names), key=lambda e: e["recordedAt"])


def dps_client(stack, index: int = 0) -> DeviceProvisioningClient:
    from azure.identity import ManagedIdentityCredential

    return DeviceProvisioningClient(stack.dps[index].endpoint,
                                    ManagedIdentityCredential(client_id=stack.client_id(APP)),
                                    connection_verify=str(stack.ca_path))


def groups_named(stack, group_id: str) -> int:
    return sum(group_id in d.group_ids() for d in stack.dps)


def test_one_message_makes_an_active_customer_with_its_intermediate_in_the_group(env, stack):
    customer = f"acme-{secrets.token_hex(3)}"
    send(env, json.dumps({"customerId": customer, "displayName": "Acme GmbH", "country": "DE", "requestId": "erp-7"}))
    host = Devhost(env)
    try:
        record = settle(env, [customer])[customer]
    finally:
        host.stop()
    intermediate = x509.load_pem_x509_certificate(record["intermediate"]["certificatePem"].encode())
    store = state_store(load_settings({k: v for k, v in env.items() if not k.startswith("_")}))
    root = x509.load_pem_x509_certificate(store.get("root-ca.json").data["certificatePem"].encode())
    assert_ca_cert(intermediate, issuer=root, path_length=0)
    verified = openssl_verify(root, intermediate, at=dt.datetime.now(dt.UTC), purpose=None)
    assert verified.returncode == 0, verified.stderr
    dps_index = [d.name for d in stack.dps].index(record["dps"]["name"])
    group = dps_client(stack, dps_index).enrollment_group.get(customer)
    primary = group["attestation"]["x509"]["signingCertificates"]["primary"]["info"]
    assert primary["sha1Thumbprint"].upper() == thumbprints(intermediate)["sha1"]
    assert group["provisioningStatus"] == "enabled"
    assert stack.keyvault.key_versions(f"customer-{customer}") == [record["key"]["version"]]  # only in Key Vault
    assert [e["after"] for e in audit_events(env, customer)] == [
        "pending", "key_created", "certificate_issued", "group_created", "active"]


def test_five_deliveries_two_concurrent_on_two_workers_make_one_key_one_intermediate_one_group(env, stack):
    customer = f"dup-{secrets.token_hex(3)}"
    message = json.dumps({"customerId": customer, "requestId": "erp-dup"})
    for text in (message, base64.b64encode(message.encode()).decode()):  # the two arrive together
        send(env, text)
    workers = [Devhost(env), Devhost(env)]
    try:
        settle(env, [customer])
        for _ in range(3):  # three late redeliveries
            send(env, message)
        settle(env, [customer])
        time.sleep(1.5)
    finally:
        for worker in workers:
            worker.stop()
    assert len(stack.keyvault.key_versions(f"customer-{customer}")) == 1
    assert groups_named(stack, customer) == 1
    events = audit_events(env, customer)
    assert [e["after"] for e in events if e["effect"] == "changed"] == [
        "pending", "key_created", "certificate_issued", "group_created", "active"]
    no_ops = [e for e in events if e["effect"] == "no-op" and e["after"] == "active"]
    assert len(no_ops) >= 4


def test_twenty_customers_complete_under_key_vault_429s_and_dps_503s(env, stack):
    stack.faults("keyvault", rate_per_s=40, retry_after=False)
    for dps in stack.dps:
        stack.faults(dps.name, error_503_fraction=0.3)
    customers = [f"load-{i:02d}-{secrets.token_hex(2)}" for i in range(20)]
    for customer in customers:
        send(env, json.dumps({"customerId": customer}))
    workers = [Devhost(env, concurrency=4), Devhost(env, concurrency=4)]
    try:
        records = settle(env, customers, timeout=240)
    finally:
        for worker in workers:
            worker.stop()
    assert stack.servers["keyvault"].gate.stats["throttled"] > 0
    assert sum(stack.servers[d.name].gate.stats["failed_503"] for d in stack.dps) > 0
    for customer in customers:
        assert len(stack.keyvault.key_versions(f"customer-{customer}")) == 1
        assert groups_named(stack, customer) == 1
        assert records[customer]["status"] == "active"


MALFORMED = [
    "", "not json", "[]", base64.b64encode(b"{broken").decode(), '{"customerId": ',
    "{}", '{"customerId": ""}', '{"customerId": "UPPER"}', '{"customerId": "bad_id"}', '{"customerId": 7}',
    '{"customerId": "ok-1", "custmerId": "typo"}', '{"customerId": "ok-2", "country": "Germany"}',
    '{"customerId": "ok-3", "country": "ZZ"}', '{"customerId": "ok-4", "displayName": "' + "x" * 100 + '"}',
    '{"customerId": "ok-5", "iotHubs": [1]}', '{"customerId": "ok-6", "iotEdge": "true"}',
    '{"customerId": "' + "a" * 64 + '"}', '{"customerId": "ok-7", "initialTwin": "tags"}',
]


def test_malformed_messages_are_recorded_with_their_field_and_nothing_else_happens(env, storage):
    for text in MALFORMED:
        send(env, text if text else " ")
    host = Devhost(env)
    store = state_store(load_settings({k: v for k, v in env.items() if not k.startswith("_")}))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(store.find("\"kind\" = 'rejection'"))) < len(MALFORMED):
            time.sleep(0.3)
    finally:
        output = host.stop()
    rejections = [store.get(n).data for n in store.find("\"kind\" = 'rejection'")]
    assert len(rejections) == len(MALFORMED), output
    assert all(r["reason"] and r["payload"] is not None for r in rejections)
    fields = {r["field"] for r in rejections}
    assert {"message", "customerId", "custmerId", "country", "displayName", "iotHubs", "iotEdge",
            "initialTwin"} <= fields
    assert list(store.find("\"kind\" = 'customer'")) == []
    poison = storage.queue_client(f"{QUEUE}-poison")
    try:
        assert poison.peek_messages() == []
    except Exception as exc:  # noqa: BLE001 - the queue not existing is the same as empty
        assert "QueueNotFound" in str(exc)
    assert "Traceback" not in output


def _filler_group(group_id: str) -> dict:
    """An enrollment group of someone else's, with a CA certificate of its own (DPS takes a certificate in one
    enrollment entry only)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from pki.keys import generate_key

    key = generate_key(KeyType.EC_P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, group_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return {"enrollmentGroupId": group_id, "attestation": {"type": "x509", "x509": {"signingCertificates": {
        "primary": {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}}}}}


def test_customers_fill_a_pool_of_two_to_100_groups_each_and_the_next_is_rejected(storage, fresh_stack):
    # Keys instead of an identity for storage and DPS (a storage connection string, DPS_CONNECTION_STRINGS):
    # supported for those who run that way, so exercised here.
    with fresh_stack("pool", dps_instances=2) as pool:
        values = sas_settings(storage, pool, STATE_CONTAINER=f"state-{secrets.token_hex(5)}")
        settings = load_settings(values)
        assert settings.storage.connection_string and settings.dps_connection_strings
        store, keys = state_store(settings), key_store(settings)
        groups = enrollment_groups(settings)
        from handlers.dps_pool import OnboardingSettings

        onboarding = OnboardingSettings(pool=settings.dps_pool)
        now = dt.datetime.now(dt.UTC)
        create_root(RootRequest("root", KeyType.EC_P256, 20, "Pool Root"), store=store, keys=keys, now=now)
        # 98 groups of others on each instance (DPS holds at most 100 per instance), made through DPS's API
        fillers = [(d.name, f"other-{d.name}-{i:03d}") for d in settings.dps_pool for i in range(98)]
        with ThreadPoolExecutor(8) as workers:
            list(workers.map(lambda f: groups.create_group(f[0], _filler_group(f[1])), fillers))

        def onboard(i: int):
            return onboard_customer(OnboardingRequest(customer_id=f"c{i:03d}"), store=store, keys=keys, groups=groups,
                                    audit=StoreAuditLog(store), settings=onboarding, now=now)

        for i in range(2):
            onboard(i)
        assert [len(d.group_ids()) for d in pool.dps] == [99, 99]  # placement fills both
        for i in range(2, 4):
            onboard(i)
        assert [len(d.group_ids()) for d in pool.dps] == [100, 100]
        # the groups of others are not in the service's count: DPS's refusal, recognised by its words, says full
        with pytest.raises(CapacityExhausted, match=r"refused a new enrollment group as full \(dps1, dps2\)"):
            onboard(4)
        rejected = store.get(customer_document("c004")).data  # kept, with its intermediate, for a retry later
        assert rejected["status"] == "rejected" and rejected["dps"] == {}
        assert [len(d.group_ids()) for d in pool.dps] == [100, 100]
