"""ACCEPTANCE for the expiry sweep on Azurite + the emulators (real SDK clients): a rehearsal with ``--now``
renews an intermediate that devices of both generations register with; concurrent sweeps renew and notify
once. The sweep's cost growing with the devices found, not the fleet, is measured by ``python -m bench sweep``."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading

import pytest
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from cryptography import x509

from clients.storage import queue_client
from devhost.stack import person_settings
from emulators.stack import ADMIN, APP
from handlers.expiry_sweep import NOTICE_QUEUE, run_sweep
from handlers.records import customer_document, device_document, device_tags
from pki.export import thumbprints
from pkictl.cli import main as pkictl

from .worlds import Fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storage(own_azurite):
    return own_azurite


@pytest.fixture
def env(storage, stack):
    from .batch_helpers import wired_env

    storage.queue_client(NOTICE_QUEUE).clear_messages()
    return wired_env(storage, stack, INTERMEDIATE_VALIDITY_DAYS="80")


def _at(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_a_rehearsal_80_days_before_expiry_renews_and_both_generations_register(env, stack, tmp_path,
                                                                                 credential_of):
    fleet = Fleet(env, stack, tmp_path)
    acme = fleet.acme
    fleet.issue(acme, ["old-1"], "before.jsonl")
    old = fleet.services.store.get(customer_document(acme)).data
    when = _at(old["intermediate"]["notAfter"]) - dt.timedelta(days=80)
    out = io.StringIO()
    admin = person_settings(fleet.settings_env, stack.client_id(ADMIN))  # a sweep by hand renews: the PKI admin's
    code = pkictl(["sweep", "run", "--now", when.strftime("%Y-%m-%dT%H:%M:%SZ")], env=admin, out=out, err=out)
    assert code == 0, out.getvalue()
    assert f"renewed {acme}: serial {old['intermediate']['serial']} -> " in out.getvalue()
    renewed = fleet.services.store.get(customer_document(acme)).data
    dps = DeviceProvisioningClient(stack.dps[0].endpoint, credential_of(APP), connection_verify=str(stack.ca_path))
    slots = dps.enrollment_group.get(acme)["attestation"]["x509"]["signingCertificates"]
    new_cert = x509.load_pem_x509_certificate(renewed["intermediate"]["certificatePem"].encode())
    assert slots["primary"]["info"]["sha1Thumbprint"].upper() == thumbprints(new_cert)["sha1"]
    assert slots["secondary"]["info"]["sha1Thumbprint"].upper() == old["intermediate"]["thumbprintSha1"]
    fleet.issue(acme, ["new-1"], "after.jsonl")
    assert fleet.register(acme, "old-1") == stack.iothub.hostname
    assert fleet.register(acme, "new-1") == stack.iothub.hostname
    out = io.StringIO()
    assert pkictl(["sweep", "show", when.date().isoformat(), "--json"], env=fleet.operator_env, out=out) == 0
    assert json.loads(out.getvalue())["counts"]["intermediatesRenewed"] >= 1
    out = io.StringIO()
    assert pkictl(["sweep", "show", when.date().isoformat()], env=fleet.operator_env, out=out) == 0
    assert out.getvalue().startswith(f"expiry sweep {when.date().isoformat()}")  # the summary `sweep run` prints


def test_two_concurrent_sweeps_renew_once_and_notify_once(env, stack, tmp_path):
    fleet = Fleet(env, stack, tmp_path)
    services = fleet.services
    now = dt.datetime.now(dt.UTC)
    customers = [fleet.acme, fleet.globex]
    for customer in customers:
        for i in range(30):
            record = {"customerId": customer, "deviceId": f"{customer}-dev-{i}", "status": "issued", "serial": f"{i:X}",
                      "notAfter": (now + dt.timedelta(days=3 + i % 20)).strftime("%Y-%m-%dT%H:%M:%SZ"), "outputs": {}}
            services.store.create(device_document(f"{customer}-dev-{i}"), record, tags=device_tags(record))
    versions = {c: len(stack.keyvault.key_versions(f"customer-{c}")) for c in customers}
    reports, errors = [], []

    def sweep():
        try:
            reports.append(run_sweep(ports=services.commands, queue=services.queue, settings=services.sweep,
                                     now=now + dt.timedelta(days=1)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for customer in customers:  # 80-day intermediates are inside the 90-day window: renewed, once
        assert len(stack.keyvault.key_versions(f"customer-{customer}")) == versions[customer] + 1
    queue = queue_client(services.settings, NOTICE_QUEUE)
    notices = [json.loads(m.content) for m in queue.receive_messages(max_messages=32)]
    mine = [n for n in notices if n["customerId"] in customers]
    assert sorted(n["customerId"] for n in mine) == sorted(customers)
    assert all(n["count"] == 30 and len(n["devices"]) == 30 for n in mine)


def test_the_app_asks_a_registered_device_in_the_renewal_window_to_renew_through_its_twin(env, stack, tmp_path):
    """The sweep as the app (its identity: IoT Hub Twin Contributor) sets the desired property pkiRenewal on the
    hub device DPS assigned, once."""
    from azure.iot.hub import IoTHubRegistryManager

    fleet = Fleet(env, stack, tmp_path)
    fleet.issue(fleet.acme, ["ask-1"], "ask.jsonl")
    assert fleet.register(fleet.acme, "ask-1") == stack.iothub.hostname
    record = fleet.services.store.get(device_document("ask-1")).data
    when = _at(record["notAfter"]) - dt.timedelta(days=40)
    hub = IoTHubRegistryManager.from_connection_string(stack.iothub_connection_string)
    hub.protocol.config.connection.verify = str(stack.ca_path)
    version = hub.get_twin("ask-1").properties.desired["$version"]
    sweep = fleet.services.sweep
    for _ in range(2):
        report = run_sweep(ports=fleet.services.commands, queue=fleet.services.queue, settings=sweep, now=when)
    assert report["devices"]["renewalRequests"] == 0  # the first sweep asked
    desired = hub.get_twin("ask-1").properties.desired
    assert desired["pkiRenewal"] == {"requested": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "notAfter": record["notAfter"]}
    assert desired["$version"] == version + 1  # one update
