"""Use case: the expiry sweep (a daily timer, or ``pkictl sweep run --now DATE``).

- Intermediates expiring within ``renew_before_days`` are renewed by the same code as the
  ``renew-intermediate`` command, with the renewal id ``sweep-DATE``: two sweeps of one day renew once.
  A previous intermediate that has expired leaves its group's secondary slot.
- Devices expiring within ``device_renew_before_days`` are asked to renew themselves: the desired twin property
  ``pkiRenewal`` (``{"requested", "notAfter"}``) on their hub device, once per certificate (``renewalRequested``
  in the record); a device renews through DPS (``renewal``). One that never registered has no twin to ask.
- Devices expiring within ``notice_before_days`` are found with one blob index tag query
  (``status = 'issued' AND notAfter <= D``), never by reading every record: the work grows with the
  devices found, not with the fleet. Expired ones are marked ``expired``. Each customer with devices
  not yet noticed gets one message on ``certificate-expiry-notices`` per day; a notice record,
  created if absent, makes that once even when two sweeps run at the same time, and the devices
  it lists are marked so tomorrow's sweep does not list them again.
- A root within ``root_warn_before_days`` of expiry is a warning (renewing a root is a human decision).
- The report ``reports/expiry/DATE.json`` describes the state the day's sweeps reached.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .enrollments import sync_group
from .errors import AlreadyExists, Conflict, NotFound, NotPermitted, TransientError
from .hubs import hub_placement
from .intermediates import RenewalRefused, renew_intermediate
from .leases import expired, lease_for, stamp, update
from .ports import Document, MessageQueue, Ports
from .records import (
    CustomerRecord,
    DeviceRecord,
    DeviceStatus,
    customer_document,
    customer_tags,
    device_tags,
    list_customers,
)
from .root import ROOT_DOCUMENT

NOTICE_QUEUE = "certificate-expiry-notices"
NOTICE_LEASE = dt.timedelta(minutes=5)
MAX_NOTICE_BYTES = 48 * 1024  # a queue message is at most 64 KiB; larger lists stay in the notice record
log = logging.getLogger("pki.sweep")


@dataclass(frozen=True)
class SweepSettings:
    renew_before_days: int = 90
    notice_before_days: int = 30
    device_renew_before_days: int = 60  # devices asked to renew (twin desired property pkiRenewal) this early
    root_warn_before_days: int = 365


def report_document(day: dt.date) -> str:
    return f"reports/expiry/{day.isoformat()}.json"


def notice_document(day: dt.date, customer_id: str) -> str:
    return f"notices/expiry/{day.isoformat()}/{customer_id}.json"


def _days_left(not_after: str, now: dt.datetime) -> int:
    expires = dt.datetime.strptime(not_after, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return (expires - now).days


class _Sweep:
    def __init__(self, ports: Ports, queue: MessageQueue, settings: SweepSettings, now: dt.datetime):
        self.ports, self.queue, self.settings, self.now = ports, queue, settings, now
        self.day = now.date()
        self.owner = secrets.token_hex(8)
        self.warnings: list[str] = []
        self._placements: dict[str, str | None] = {}
        self.notice_tags = {"kind": "expiry-notice", "date": self.day.strftime("%Y%m%d")}

    def notices_of_the_day(self) -> list[dict]:
        """Every notice of this date, whichever sweep sent it."""
        notices = []
        for name in sorted(self.ports.store.find(f"\"kind\" = 'expiry-notice' AND \"date\" = "
                                                 f"'{self.notice_tags['date']}'")):
            doc = self.ports.store.get(name)
            if doc is not None:
                notices.append({"customerId": doc.data["customerId"], "noticeId": doc.data["noticeId"],
                                "devices": len(doc.data["devices"]), "status": doc.data["status"]})
        return notices

    # -- root --------------------------------------------------------------------------------------------------
    def root(self) -> dict[str, Any]:
        doc = self.ports.store.get(ROOT_DOCUMENT)
        if doc is None or doc.data.get("status") != "active":
            self.warnings.append("no active root CA: run `pkictl root create`")
            return {"status": "missing"}
        summary = doc.data["summary"]
        left = _days_left(summary["notAfter"], self.now)
        item = {"serial": summary["serial"], "notAfter": summary["notAfter"], "daysLeft": left}
        if left <= self.settings.root_warn_before_days:
            self.warnings.append(f"the root CA expires on {summary['notAfter']} ({left} days): plan a new root and "
                                 "its rollout to devices and DPS now; the service never renews a root by itself")
        return item

    # -- intermediates -----------------------------------------------------------------------------------------
    def intermediates(self) -> dict[str, list]:
        renewed, dropped, failed, held = [], [], [], []
        for customer_id in list_customers(self.ports.store):
            doc = self.ports.store.get(customer_document(customer_id))
            if doc is None or not (customer := CustomerRecord.from_json(doc.data)).onboarded \
                    or not customer.intermediate:
                continue
            try:
                try:
                    renewed += self._renew(customer)
                except RenewalRefused as exc:  # not a failure: retrying will not help, and the operator decides
                    held.append({"customerId": customer_id, "reason": exc.reason})
                    self.warnings.append(f"customer {customer_id}: intermediate not renewed: {exc.reason}")
                dropped += self._drop_expired_secondary(customer_id)
            except Exception as exc:  # noqa: BLE001 - one customer's failure must not stop the others' sweep
                failed.append({"customerId": customer_id, "error": f"{type(exc).__name__}: {exc}"})
                self.warnings.append(f"customer {customer_id}: {type(exc).__name__}: {exc}")
        return {"renewed": renewed, "secondaryRemoved": dropped, "failed": failed, "held": held}

    def _renew(self, customer: CustomerRecord) -> list[dict]:
        renewal_id = f"sweep-{self.day.isoformat()}"
        done = next((r for r in customer.renewals if r["id"] == renewal_id), None)
        left = _days_left(customer.intermediate["notAfter"], self.now)
        if done is None and left > self.settings.renew_before_days:
            return []
        old = customer.intermediate["serial"] if done is None else customer.previous_intermediates[0]["serial"]
        if done is None:  # (a concurrent sweep renewing it is waited for; then this finds it done)
            renew_intermediate(
                customer.customer_id, renewal_id=renewal_id, store=self.ports.store, keys=self.ports.keys,
                reason=f"expiry sweep: expires {customer.intermediate['notAfter']} ({left} days), within "
                       f"{self.settings.renew_before_days} days", audit=self.ports.audit, now=self.now,
                sync=lambda data: sync_group(self.ports, data, self.now), settings=self.ports.settings)
        current = CustomerRecord.from_json(self.ports.store.get(customer.document).data)
        return [{"customerId": customer.customer_id, "previousSerial": old,
                 "serial": current.intermediate["serial"], "notAfter": current.intermediate["notAfter"]}]

    def _drop_expired_secondary(self, customer_id: str) -> list[dict]:
        for _ in range(5):
            doc = self.ports.store.get(customer_document(customer_id))
            previous = (doc.data.get("previousIntermediates") or [None])[0]
            if not previous or previous["notAfter"] > stamp(self.now) or previous.get("removedFromGroup"):
                return []
            sync_group(self.ports, doc.data, self.now)  # group_body leaves out a secondary that has expired
            kept = [{**previous, "removedFromGroup": stamp(self.now)}, *doc.data["previousIntermediates"][1:]]
            data = {**doc.data, "previousIntermediates": kept}
            try:
                self.ports.store.replace(doc, data, tags=customer_tags(data))
            except Conflict:
                continue
            self.ports.audit.append({"at": stamp(self.now), "action": "sweep.secondary-removed", "effect": "changed",
                                     "customer": customer_id, "before": previous["serial"], "after": None,
                                     "reason": f"expired {previous['notAfter']}"})
            return [{"customerId": customer_id, "serial": previous["serial"], "notAfter": previous["notAfter"]}]
        return []

    # -- devices -----------------------------------------------------------------------------------------------
    def devices(self) -> dict[str, Any]:
        def day(days: int) -> str:
            return (self.now + dt.timedelta(days=days)).strftime("%Y%m%d")
        notice, renew = day(self.settings.notice_before_days), day(self.settings.device_renew_before_days)
        store = self.ports.store
        found = list(store.find(f"\"kind\" = 'device' AND \"status\" = 'issued' AND \"notAfter\" <= "
                                f"'{max(notice, renew)}'"))
        by_customer: dict[str, list[dict]] = {}
        expired = expiring = requested = 0
        for name in found:
            doc = store.get(name)
            if doc is None or doc.data.get("status") != DeviceStatus.ISSUED:
                continue
            device = DeviceRecord.from_json(doc.data)
            is_expired = device.expired_by(stamp(self.now))
            if is_expired:
                expired += 1
                doc = self._mark(doc, status=DeviceStatus.EXPIRED.value, expiredAt=stamp(self.now))
            else:
                if device.tags["notAfter"] <= renew:
                    doc, asked = self._ask_to_renew(doc, device)
                    requested += asked
                if device.tags["notAfter"] > notice:
                    continue  # in the renewal window only: no notice yet
                expiring += 1
            if doc is not None and not doc.data.get("expiryNotice"):
                by_customer.setdefault(device.customer_id, []).append({
                    "deviceId": device.device_id, "serial": device.serial, "notAfter": device.not_after,
                    "status": "expired" if is_expired else "expiring", "_doc": doc})
        notices = [self._notify(customer_id, devices) for customer_id, devices in sorted(by_customer.items())]
        return {"found": len(found), "expiring": expiring, "expired": expired, "renewalRequests": requested,
                "notices": notices}

    def _ask_to_renew(self, doc: Document | None, device: DeviceRecord) -> tuple[Document | None, int]:
        """``pkiRenewal`` on the device's twin, once per certificate; a hub that is throttled or lacks the device
        is asked again by tomorrow's sweep."""
        if doc is None or (doc.data.get("renewalRequested") or {}).get("notAfter") == device.not_after:
            return doc, 0
        dps = self._dps_of(device.customer_id)
        placement = hub_placement(self.ports.dps.registration(dps, device.device_id), device.hub) if dps else None
        if placement is None:
            return doc, 0  # never registered: no twin to ask through
        value = {"requested": stamp(self.now), "notAfter": device.not_after}
        try:
            self.ports.hubs.set_desired(placement["name"], placement["deviceId"], {"pkiRenewal": value})
        except NotPermitted:  # a sweep by a person without IoT Hub Twin Contributor: the rest goes on
            warning = ("devices were not asked to renew: this identity may not update device twins (IoT Hub Twin "
                       "Contributor, which the app holds); the app's own sweep asks them")
            self.warnings += [] if warning in self.warnings else [warning]
            return doc, 0
        except (NotFound, TransientError):
            return doc, 0
        self.ports.audit.append({"at": stamp(self.now), "action": "sweep.renewal-request", "effect": "changed",
                                 "customer": device.customer_id, "device": device.device_id, **value})
        return self._mark(doc, renewalRequested={**value, "hub": placement["name"]}), 1

    def _dps_of(self, customer_id: str) -> str | None:
        """The DPS instance holding the customer's group, read once per sweep."""
        if customer_id not in self._placements:
            customer = self.ports.store.get(customer_document(customer_id))
            self._placements[customer_id] = (customer.data.get("dps") or {}).get("name") if customer else None
        return self._placements[customer_id]

    def _mark(self, doc: Document, **changes: Any) -> Document | None:
        """Apply ``changes`` on top of the device as it is (a command may have changed it meanwhile)."""
        try:
            return update(self.ports.store, doc.name, lambda data: {**data, **changes} if data else None,
                          tags=device_tags)
        except TransientError:
            return None  # tomorrow's sweep finds the device again

    def _notify(self, customer_id: str, devices: list[dict]) -> dict[str, Any]:
        name = notice_document(self.day, customer_id)
        notice_id = f"{self.day.isoformat()}/{customer_id}"
        listed = sorted(({k: v for k, v in d.items() if k != "_doc"} for d in devices), key=lambda d: d["notAfter"])
        record = {"noticeId": notice_id, "customerId": customer_id, "status": "sending", "devices": listed,
                  "lease": lease_for(self.owner, self.now + NOTICE_LEASE)}
        try:
            doc = self.ports.store.create(name, record, tags=self.notice_tags)
        except AlreadyExists:
            doc = self.ports.store.get(name)
            lease = doc.data.get("lease") or {}
            if doc.data["status"] == "sent" or not expired(lease, self.now):
                return {"customerId": customer_id, "noticeId": notice_id, "devices": len(doc.data["devices"]),
                        "sent": doc.data["status"] == "sent", "by": "another sweep"}
            try:  # a sweep that crashed before sending: take its notice over
                doc = self.ports.store.replace(doc, {**doc.data, "lease": record["lease"]}, tags=self.notice_tags)
            except Conflict:
                return {"customerId": customer_id, "noticeId": notice_id, "devices": len(doc.data["devices"]),
                        "sent": False, "by": "another sweep"}
        listed = doc.data["devices"]
        message = {"noticeId": notice_id, "customerId": customer_id, "date": self.day.isoformat(),
                   "windowDays": self.settings.notice_before_days, "count": len(listed), "devices": listed}
        if len(json.dumps(message)) > MAX_NOTICE_BYTES:
            message = {**message, "devices": None, "listPath": f"{name} (state container)"}
        self.queue.send(NOTICE_QUEUE, message)
        self.ports.store.replace(doc, {**doc.data, "status": "sent", "sentAt": stamp(self.now), "lease": None},
                                 tags=self.notice_tags)
        for device in devices:  # listed once: tomorrow's sweep skips them (_mark re-reads on a conflict)
            self._mark(device["_doc"], expiryNotice={"noticeId": notice_id, "at": stamp(self.now)})
        self.ports.audit.append({"at": stamp(self.now), "action": "sweep.notice", "effect": "changed",
                                 "customer": customer_id, "noticeId": notice_id, "devices": len(listed)})
        return {"customerId": customer_id, "noticeId": notice_id, "devices": len(listed), "sent": True,
                "by": "this sweep"}


def run_sweep(*, ports: Ports, queue: MessageQueue, settings: SweepSettings, now: dt.datetime,
              clock: Callable[[], dt.datetime] | None = None) -> dict[str, Any]:
    """Run the sweep for ``now``'s date; returns the report (also written to ``reports/expiry/DATE.json``)."""
    started = (clock or (lambda: dt.datetime.now(dt.UTC)))()
    sweep = _Sweep(ports, queue, settings, now)
    root = sweep.root()
    intermediates = sweep.intermediates()
    devices = sweep.devices()
    counts = {"intermediatesRenewed": len(intermediates["renewed"]), "renewalsHeld": len(intermediates["held"]),
              "secondariesRemoved": len(intermediates["secondaryRemoved"]),
              "devicesExpiring": devices["expiring"], "devicesMarkedExpired": devices["expired"],
              "noticesSentByThisRun": sum(1 for n in devices["notices"] if n["by"] == "this sweep"),
              "warnings": len(sweep.warnings)}
    run = {"ranAt": stamp(started), "now": stamp(now), "counts": counts}
    report = {
        "date": sweep.day.isoformat(), "now": stamp(now), "settings": settings.__dict__, "counts": counts,
        "root": root, "intermediates": intermediates, "devices": devices, "warnings": sweep.warnings,
    }
    for warning in sweep.warnings:
        log.warning("expiry sweep %s: %s", sweep.day, warning)
    written = _write_report(ports, report_document(sweep.day), report, run, sweep.notices_of_the_day)
    if intermediates["failed"]:  # after the report: the timer's retry policy runs the (idempotent) sweep again
        raise SweepIncomplete(f"{len(intermediates['failed'])} customer(s) could not be swept: "
                              f"{intermediates['failed'][0]['customerId']}: {intermediates['failed'][0]['error']}",
                              written)
    return written


class SweepIncomplete(TransientError):
    """Some customers failed; the report is written and names them. Raised so the host retries the sweep."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _write_report(ports: Ports, name: str, report: dict, run: dict, notices: Callable[[], list[dict]]) -> dict:
    """The day's report: the last run's findings, every run's counts, and every notice of the day."""

    def add_run(data: dict | None) -> dict:
        return {**report, "runs": [*(data or {}).get("runs", []), run], "notices": notices()}

    return update(ports.store, name, add_run, tags=lambda _: {"kind": "expiry-report"}).data
