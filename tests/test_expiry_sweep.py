"""The expiry sweep with fakes at its ports: renewal window, secondary removal, notices once, root warning."""

from __future__ import annotations

import datetime as dt

import pytest

from handlers.expiry_sweep import NOTICE_QUEUE, SweepSettings, report_document, run_sweep
from handlers.records import customer_document, device_document, device_tags

from .fakes import MemoryQueue, run_concurrently
from .worlds import CommandWorld
from .x509_helpers import NOW


class SweepWorld(CommandWorld):
    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.queue = MemoryQueue()

    def record(self, customer: str, device: str, not_after: dt.datetime, status: str = "issued") -> None:
        record = {"customerId": customer, "deviceId": device, "status": status, "serial": f"S-{device}",
                  "notAfter": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), "outputs": {}}
        self.store.create(device_document(device), record, tags=device_tags(record))

    def sweep(self, now: dt.datetime, **settings):
        return run_sweep(ports=self.ports, queue=self.queue, settings=SweepSettings(**settings), now=now)

    def notices(self) -> list[dict]:
        return [m for q, m in self.queue.sent if q == NOTICE_QUEUE]


@pytest.fixture
def world(tmp_path):
    return SweepWorld(tmp_path)


def _at(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_an_intermediate_within_the_window_is_renewed_once_per_day(world):
    expires = _at(world.customer()["intermediate"]["notAfter"])
    nothing = world.sweep(expires - dt.timedelta(days=100))
    assert nothing["counts"]["intermediatesRenewed"] == 0
    old = world.customer()["intermediate"]["serial"]
    when = expires - dt.timedelta(days=80)
    report = world.sweep(when)
    renewed = {r["customerId"]: r for r in report["intermediates"]["renewed"]}
    assert set(renewed) == {"contoso", "fabrikam"} and renewed["contoso"]["previousSerial"] == old
    assert world.customer()["previousIntermediates"][0]["serial"] == old
    created = world.keys.created
    again = world.sweep(when + dt.timedelta(hours=1))  # the timer fired twice: nothing renewed twice
    assert world.keys.created == created
    assert again["intermediates"]["renewed"] == report["intermediates"]["renewed"]
    stored = world.store.get(report_document(when.date())).data
    assert len(stored["runs"]) == 2 and stored["counts"]["intermediatesRenewed"] == 2


def test_an_expired_secondary_leaves_the_group(world):
    expires = _at(world.customer()["intermediate"]["notAfter"])
    world.sweep(expires - dt.timedelta(days=80))  # renewed: the old intermediate becomes the secondary
    previous = world.customer()["previousIntermediates"][0]
    group = world.groups.get_group("dps1", "contoso").data["attestation"]["x509"]["signingCertificates"]
    assert "secondary" in group
    after = _at(previous["notAfter"]) + dt.timedelta(days=1)
    report = world.sweep(after)
    removed = {r["customerId"]: r["serial"] for r in report["intermediates"]["secondaryRemoved"]}
    assert removed["contoso"] == previous["serial"] and report["intermediates"]["renewed"] == []
    group = world.groups.get_group("dps1", "contoso").data["attestation"]["x509"]["signingCertificates"]
    assert "secondary" not in group and "primary" in group
    assert world.sweep(after)["intermediates"]["secondaryRemoved"] == []


def test_expiring_devices_get_one_notice_per_customer_and_expired_ones_are_marked(world):
    for i in range(5):
        world.record("contoso", f"soon-{i}", NOW + dt.timedelta(days=10 + i))
    world.record("contoso", "gone", NOW - dt.timedelta(days=1))
    world.record("contoso", "later", NOW + dt.timedelta(days=200))
    world.record("contoso", "off", NOW + dt.timedelta(days=5), status="disabled")
    world.record("fabrikam", "f-soon", NOW + dt.timedelta(days=3))
    report = world.sweep(NOW, renew_before_days=1)
    assert report["devices"]["expiring"] == 6 and report["devices"]["expired"] == 1
    notices = {n["customerId"]: n for n in world.notices()}
    assert set(notices) == {"contoso", "fabrikam"}
    assert sorted(d["deviceId"] for d in notices["contoso"]["devices"]) == ["gone"] + [f"soon-{i}" for i in range(5)]
    assert {d["status"] for d in notices["contoso"]["devices"] if d["deviceId"] == "gone"} == {"expired"}
    assert notices["contoso"]["devices"][1]["serial"] == "S-soon-0"
    assert world.store.get(device_document("gone")).data["status"] == "expired"
    world.sweep(NOW + dt.timedelta(hours=2), renew_before_days=1)  # same day: no second notice
    world.sweep(NOW + dt.timedelta(days=1), renew_before_days=1)  # next day: these devices were noticed already
    assert len(world.notices()) == 2
    world.record("contoso", "new-soon", NOW + dt.timedelta(days=20))
    world.sweep(NOW + dt.timedelta(days=2), renew_before_days=1)
    assert [d["deviceId"] for d in world.notices()[-1]["devices"]] == ["new-soon"]


def test_concurrent_sweeps_renew_once_and_notify_once(world):
    for i in range(20):
        world.record("contoso", f"d-{i}", NOW + dt.timedelta(days=5))
    expires = _at(world.customer()["intermediate"]["notAfter"])
    when = expires - dt.timedelta(days=30)
    created = world.keys.created
    _, errors = run_concurrently(lambda: world.sweep(when), 3)
    assert not errors, errors
    assert world.keys.created == created + 2  # one per customer
    assert len(world.notices()) == 1 and len(world.notices()[0]["devices"]) == 20
    assert [e["effect"] for e in world.audit.events if e["action"] == "renew-intermediate"].count("changed") == 2


def test_the_root_near_expiry_is_a_warning(world):
    root_expires = _at(world.store.get("root-ca.json").data["summary"]["notAfter"])
    report = world.sweep(root_expires - dt.timedelta(days=200), renew_before_days=1)
    assert any("root CA expires" in w for w in report["warnings"])
    assert not world.sweep(NOW, renew_before_days=1)["warnings"]


def test_the_device_query_reads_only_what_it_finds(world):
    for i in range(300):
        world.record("contoso", f"far-{i}", NOW + dt.timedelta(days=300))
    world.record("contoso", "near", NOW + dt.timedelta(days=3))
    reads = []
    get = world.store.get
    world.store.get = lambda name: (reads.append(name), get(name))[1]
    world.sweep(NOW, renew_before_days=1)
    assert not [n for n in reads if n.startswith("devices/") and "far-" in n]
    assert customer_document("contoso") in reads


def test_a_sweep_that_fails_for_a_customer_is_retried_by_its_timer_policy_and_completes(world):
    """DPS refuses contoso's group update once: the sweep still sweeps fabrikam, writes its report naming contoso
    and raises; the host runs it again by the timer's retry policy (exponential, 1 minute first), and the retry
    finishes contoso's renewal from where it stopped (one new key, not two)."""
    from pathlib import Path

    from devhost.host import RetryPolicy, load_app, read_functions, run_with_retries
    from handlers.errors import TransientError

    app = load_app(Path(__file__).resolve().parent.parent)  # function_app.py, as the host loads it
    policy = read_functions(app, {"EXPIRY_SWEEP_SCHEDULE": "0 0 3 * * *"})["expiry_sweep_timer"].retry
    assert policy == RetryPolicy("exponential_backoff", 4, minimum_s=60, maximum_s=1800)  # as the README says
    replace, refused = world.groups.replace_group, []

    def replace_once(dps, group, etag):
        if group["enrollmentGroupId"] == "contoso" and not refused:
            refused.append(group["enrollmentGroupId"])
            raise TransientError("DPS: 503 ServiceUnavailable")
        return replace(dps, group, etag)

    world.groups.replace_group = replace_once
    when = _at(world.customer()["intermediate"]["notAfter"]) - dt.timedelta(days=80)
    created, waits, attempts = world.keys.created, [], []

    def attempt(retry_context):
        attempts.append(retry_context.retry_count)
        return world.sweep(when)

    report = run_with_retries(policy, attempt, wait=lambda seconds: waits.append(seconds) is not None)
    assert refused == ["contoso"] and attempts == [0, 1] and waits == [60.0]
    assert {r["customerId"] for r in report["intermediates"]["renewed"]} == {"contoso", "fabrikam"}
    assert world.keys.created == created + 2  # one new key per customer across both attempts
    runs = world.store.get(report_document(when.date())).data["runs"]
    assert [r["counts"]["intermediatesRenewed"] for r in runs] == [1, 2]


def test_devices_in_the_renewal_window_are_asked_to_renew_through_their_twin_once_per_certificate(world):
    from handlers.leases import stamp

    from .worlds import HUB

    def day(days: int) -> str:
        return (NOW + dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")

    world.device("r-1", not_after=day(45))
    world.device("r-2", not_after=day(45), registered=False)  # no twin to ask through
    world.device("r-3", not_after=day(90))  # outside the window
    report = world.sweep(NOW, renew_before_days=1)
    assert report["devices"]["renewalRequests"] == 1 and report["devices"]["expiring"] == 0
    asked = {"requested": stamp(NOW), "notAfter": day(45)}
    assert world.hubs.devices[(HUB, "r-1")]["desired"] == {"pkiRenewal": asked}
    assert "desired" not in world.hubs.devices[(HUB, "r-3")]
    assert world.store.get(device_document("r-1")).data["renewalRequested"] == {**asked, "hub": HUB}
    assert not world.notices()  # 45 days out: asked to renew, not yet noticed
    calls = world.hubs.calls
    assert world.sweep(NOW + dt.timedelta(days=1), renew_before_days=1)["devices"]["renewalRequests"] == 0
    assert world.hubs.calls == calls  # once per certificate
    doc = world.store.get(device_document("r-1"))  # a new certificate (a renewal or a reissue): asked again in time
    world.store.replace(doc, {**doc.data, "notAfter": day(50)}, tags=device_tags({**doc.data, "notAfter": day(50)}))
    assert world.sweep(NOW + dt.timedelta(days=2), renew_before_days=1)["devices"]["renewalRequests"] == 1
    assert [e["device"] for e in world.audit.events if e["action"] == "sweep.renewal-request"] == ["r-1", "r-1"]


def test_a_sweep_whose_identity_may_not_update_twins_warns_once_and_does_the_rest(world):
    from handlers.errors import NotPermitted

    def refused(*_args):
        raise NotPermitted("twin of r-1: not permitted (HTTP 401)")

    for device in ("r-1", "r-2"):
        world.device(device, not_after=(NOW + dt.timedelta(days=20)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    world.hubs.set_desired = refused
    report = world.sweep(NOW, renew_before_days=1)
    assert report["devices"]["renewalRequests"] == 0 and report["devices"]["expiring"] == 2
    assert [w for w in report["warnings"] if "IoT Hub Twin Contributor" in w] == [
        ("devices were not asked to renew: this identity may not update device twins (IoT Hub Twin Contributor, "
        "which the app holds); the app's own sweep asks them")]
    assert len(world.notices()) == 1 and "renewalRequested" not in world.store.get(device_document("r-1")).data
