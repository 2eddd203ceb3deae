"""Use case: an operator command from ``pki-commands`` -> devices and customers disabled/enabled in IoT Hub
and DPS, a customer's group switched to or from custom allocation (the webhook), intermediates renewed.

Each target record (device or customer) keeps the last command applied to it (``lastCommand``: its id,
its order key and whether its side effects are done). A command is ordered by its enqueue time, then its
``requestId``, then its message id: one enqueued before the recorded command is ``superseded`` (a no-op,
audited; one of the same second, which insertion times cannot order, is applied on top), so a disable and an
enable of one device racing on two instances end in the state of the later one. The record is written first (the
desired state), then DPS and IoT Hub are brought to it; a run that finds a newer desired state after its side
effects applies that one too, so the last writer's state is what DPS and the hub end with. A redelivered command
finds its state applied: a no-op. A customer's allocation is a state of its own, with its own last command
(``lastAllocationCommand``): a status command never supersedes an allocation command, or the other way round.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from .command_message import ALLOCATION_COMMANDS, DEVICE_COMMANDS, Command, command_id, enqueued_before, order_key
from .enrollments import sync_group
from .errors import AlreadyExists, Conflict, Rejected, TransientError
from .hubs import assigned, hub_placement, registered_through, remember_hub_devices
from .intermediates import renew_intermediate
from .leases import stamp
from .messages import Delivery
from .ports import Ports
from .records import (
    CustomerRecord,
    DeviceRecord,
    DeviceStatus,
    customer_document,
    customer_tags,
    device_tags,
    read_device,
)

_ATTEMPTS = 8
SAME_COMMAND_WAIT_S = 20.0  # how long a second delivery waits for the first to finish before taking over
# Each state a command sets, and the field of the record that keeps the last command applied to it.
_LAST = {"status": "lastCommand", "allocation": "lastAllocationCommand"}


class _Run:
    def __init__(self, command: Command, delivery: Delivery, ports: Ports, now: dt.datetime, sleep=time.sleep):
        self.command, self.delivery, self.ports, self.now, self.sleep = command, delivery, ports, now, sleep
        self.order = order_key(command, delivery)
        self.id = command_id(command, delivery)
        self.field = "allocation" if command.command in ALLOCATION_COMMANDS else "status"  # the state it sets
        self.slot = _LAST[self.field]

    def audit(self, effect: str, before: Any, after: Any, **extra: Any) -> None:
        self.ports.audit.append({
            "at": stamp(self.now), "action": self.command.command, "effect": effect,
            "customer": self.command.customer_id, "device": self.command.device_id, "before": before, "after": after,
            "reason": self.command.reason, "requestId": self.command.request_id,
            "messageId": self.delivery.message_id, "order": self.order, **extra})

    def last(self) -> dict:
        return {"id": self.id, "command": self.command.command, "order": self.order, "reason": self.command.reason,
                "at": stamp(self.now), "applied": False}

    def customer(self) -> Any:
        doc = self.ports.store.get(customer_document(self.command.customer_id))
        if doc is None:
            raise Rejected(f"customer {self.command.customer_id!r} is unknown", field="customerId")
        if not CustomerRecord.from_json(doc.data).onboarded:
            raise Rejected(f"customer {self.command.customer_id!r} is {doc.data['status']}, not onboarded: "
                           "finish its onboarding first", field="customerId")
        return doc

    def desire(self, name: str, read, wanted: str, changes) -> tuple[Any, str | None]:
        """Record the desired state (the record's ``self.field``); returns the record and None, or the record and
        the no-op reason. A record without the field has no state recorded yet (a customer's allocation that
        follows the app's setting): the command records it."""
        waited = 0.0
        for _ in range(_ATTEMPTS + int(SAME_COMMAND_WAIT_S / 0.5)):
            doc = read()
            last = doc.data.get(self.slot) or {}
            if last.get("id") == self.id:  # the same command again (redelivered, or sent twice with one requestId)
                if last.get("applied"):
                    return doc, f"already applied by this command ({self.id})"
                if waited < SAME_COMMAND_WAIT_S:  # another run of it is applying it: let that one finish
                    self.sleep(0.5)
                    waited += 0.5
                    continue
                return doc, None  # that run is gone: finish its work
            if enqueued_before(self.order, last.get("order", "")):
                return doc, f"superseded by the later {last.get('command')} ({last.get('id')})"
            if doc.data.get(self.field) == wanted and last.get("applied", True):
                if last.get("order", "") < self.order:  # remember it: an older, opposite command is superseded
                    data = {**doc.data, self.slot: {**self.last(), "applied": True}}
                    try:
                        doc = self.ports.store.replace(doc, data, tags=self.tags(data))
                    except Conflict:
                        continue
                return doc, f"already {wanted}" if self.field == "status" else f"{self.field} already {wanted}"
            data = {**changes(doc.data), self.field: wanted, self.slot: self.last(), "updatedAt": stamp(self.now)}
            try:
                return self.ports.store.replace(doc, data, tags=self.tags(data)), None
            except Conflict:
                continue
        raise TransientError(f"{name}: the record kept changing; retry")

    def tags(self, data: dict) -> dict[str, str]:
        return device_tags(data) if self.command.command in DEVICE_COMMANDS else customer_tags(data)

    def settle(self, read, apply) -> Any:
        """Bring DPS/IoT Hub to the record's desired state until no newer command has landed meanwhile, then
        mark the command applied. Whoever writes a desired state last also applies last. ``apply`` may return
        fields it learned (where the device lives) to keep in the record."""
        def orders(data: dict) -> list[str | None]:
            return [(data.get(slot) or {}).get("order") for slot in _LAST.values()]

        for _ in range(_ATTEMPTS):
            doc = read()
            learned = apply(doc.data) or {}
            again = read()
            if orders(again.data) != orders(doc.data):
                # a newer command (of either state: both shape the group) changed the desired state while this one
                # applied: apply that too
                continue
            last = {**again.data[self.slot], "applied": True}
            try:
                return self.ports.store.replace(again, {**again.data, **learned, self.slot: last},
                                                tags=self.tags(again.data))
            except Conflict:
                continue
        raise TransientError("the desired state kept changing while it was applied; retry")


# --- devices -------------------------------------------------------------------------------------------------
def _device_apply(run: _Run, customer: dict, certificate_pem: str):
    dps, device_id = customer["dps"]["name"], run.command.device_id
    ports = run.ports

    def apply(data: dict) -> None:
        device = DeviceRecord.from_json(data)
        disabled = device.status is DeviceStatus.DISABLED
        reason = (device.events.get("lastCommand") or {}).get("reason", "")
        for _ in range(_ATTEMPTS):  # DPS: a disabled individual enrollment blocks the device's re-provisioning
            enrollment = ports.dps.get_enrollment(dps, device_id)
            try:
                if disabled:
                    body = {"registrationId": device_id, "deviceId": device_id, "provisioningStatus": "disabled",
                            "attestation": {"type": "x509", "x509": {"clientCertificates": {
                                "primary": {"certificate": certificate_pem}}}}}
                    if enrollment is None or enrollment.data.get("provisioningStatus") != "disabled":
                        ports.dps.put_enrollment(dps, body, enrollment.etag if enrollment else None)
                elif enrollment is not None:
                    ports.dps.delete_enrollment(dps, device_id, enrollment.etag)
                break
            except (AlreadyExists, Conflict):
                continue
        else:
            raise TransientError(f"individual enrollment {device_id} on {dps} kept changing; retry")
        registration = ports.dps.registration(dps, device_id)
        if assigned(registration) and not registered_through(ports.dps, dps, customer["customerId"], device_id):
            # Not this customer's device in the hub, whatever our record says: leave it alone.
            return {"hub": {**(device.hub or {}), "status": "not-touched",
                            "why": f"registration {device_id} on {dps} is assigned through another enrollment, not "
                                   f"the group {customer['customerId']}"}}
        placement = hub_placement(registration, device.hub)
        if placement is None:
            return {}  # never assigned: there is nothing in a hub to disable
        hub, hub_device = placement["name"], placement["deviceId"]
        wanted = "disabled" if disabled else "enabled"
        for _ in range(_ATTEMPTS):  # IoT Hub: a provisioned device talks to its hub directly
            current = ports.hubs.device(hub, hub_device)
            if current is None:  # deleted from the hub by someone: nothing there can connect, which is done
                return {"hub": {**placement, "status": "absent"}}
            if current["status"] != wanted:
                try:
                    ports.hubs.set_status(hub, current, wanted, reason)
                except Conflict:
                    continue
            return {"hub": {**placement, "status": wanted}}
        raise TransientError(f"device {hub_device} on {hub} kept changing; retry")

    return apply


def _device_command(run: _Run) -> str:
    command, ports = run.command, run.ports
    customer = run.customer().data
    name = f"device {command.device_id} of customer {command.customer_id}"

    def read():
        doc = read_device(ports.store, command.customer_id, command.device_id)
        if doc is None:
            raise Rejected(f"device {command.device_id!r} of customer {command.customer_id!r} has no certificate "
                           "from this service", field="deviceId")
        return doc

    disable = command.command == "disable-device"
    current = DeviceRecord.from_json(read().data)
    before = current.status.value
    if disable:
        wanted = DeviceStatus.DISABLED.value
    else:
        wanted = (DeviceStatus.EXPIRED if current.expired_by(stamp(run.now)) else DeviceStatus.ISSUED).value

    def changes(data: dict) -> dict:
        if disable:
            return {**data, "disabledReason": command.reason, "disabledAt": stamp(run.now)}
        return {k: v for k, v in data.items() if k not in ("disabledReason", "disabledAt")}

    doc, noop = run.desire(name, read, wanted, changes)
    if noop:
        run.audit("no-op", before, doc.data["status"], why=noop)
        return f"device {command.customer_id}/{command.device_id}: {noop} (no-op)"
    certificate = current.certificate_pem_in(ports.files)
    settled = run.settle(read, _device_apply(run, customer, certificate))
    hub = (settled.data if settled is not None else {}).get("hub")
    run.audit("changed", before, wanted, serial=doc.data.get("serial"),
              hub=hub or "never assigned to a hub: nothing to change there")
    return f"device {command.customer_id}/{command.device_id}: {before} -> {wanted}"


def _hub_devices(run: _Run, customer: dict, wanted: str) -> tuple[list[str], list[str]]:
    """Set the status of every hub device registered through the customer's group, in bulk. Devices disabled
    one by one (``disable-device``) stay disabled when a customer is enabled again."""
    ports = run.ports
    keep_disabled = set()
    if wanted == "enabled":
        keep_disabled = {n.rsplit("/", 1)[-1].removesuffix(".json") for n in ports.store.find(
            f"\"kind\" = 'device' AND \"customer\" = '{customer['customerId']}' AND \"status\" = 'disabled'")}
    by_hub: dict[str, list[str]] = {}
    for state in ports.dps.registrations(customer["dps"]["name"], customer["customerId"]):
        if state.get("registrationId") in keep_disabled:
            continue
        known = None
        if state.get("status", "assigned") != "assigned":  # a refused latest attempt: where the record saw it
            doc = read_device(ports.store, customer["customerId"], state["registrationId"])
            known = DeviceRecord.from_json(doc.data).hub if doc is not None else None
        placement = hub_placement(state, known)
        if placement is not None:
            by_hub.setdefault(placement["name"], []).append(placement["deviceId"])
    kept = remember_hub_devices(ports, customer["customerId"], by_hub)
    if wanted == "enabled":  # the devices disabled before, wherever DPS lost track of them meanwhile
        by_hub = {hub: [d for d in devices if d not in keep_disabled] for hub, devices in kept.items()}
    problems, absent = [], []
    iot_edge = bool(customer["parameters"].get("iotEdge"))
    for hub, devices in sorted(by_hub.items()):
        outcome = ports.hubs.set_statuses(hub, devices, wanted, run.command.reason, iot_edge=iot_edge)
        problems += outcome.problems
        absent += [f"{hub}/{d}" for d in outcome.absent]  # deleted from the hub: nothing there can connect
    if problems:
        raise TransientError(f"IoT Hub refused {len(problems)} device updates (first: {problems[0]}); retry")
    return [d for devices in by_hub.values() for d in devices], absent


def _customer_command(run: _Run) -> str:
    command, ports = run.command, run.ports
    name = customer_document(command.customer_id)
    disable = command.command == "disable-customer"
    wanted = "disabled" if disable else "active"
    before = run.customer().data["status"]

    def changes(data: dict) -> dict:
        if disable:
            return {**data, "disabledReason": command.reason, "devicesDisabled": command.disable_devices}
        return {k: v for k, v in data.items() if k != "disabledReason"}

    doc, noop = run.desire(name, run.customer, wanted, changes)
    if noop and not (disable and command.disable_devices and not doc.data.get("devicesDisabled")):
        run.audit("no-op", before, doc.data["status"], why=noop)
        return f"customer {command.customer_id}: {noop} (no-op)"
    if noop:  # disabled already, now with its devices too
        doc = ports.store.replace(doc, {**doc.data, "devicesDisabled": True, "lastCommand": run.last()},
                                  tags=customer_tags(doc.data))
    touched: list[str] = []
    absent: list[str] = []

    def apply(customer: dict) -> None:
        sync_group(ports, customer, run.now)
        if customer.get("devicesDisabled"):  # kept after an enable: the hub devices it disabled are enabled again
            touched[:], absent[:] = _hub_devices(run, customer,
                                                 "disabled" if customer["status"] == "disabled" else "enabled")

    run.settle(run.customer, apply)
    run.audit("changed", before, wanted, hubDevices=len(touched), absentFromHub=absent)
    return (f"customer {command.customer_id}: {before} -> {wanted}"
            + (f", {len(touched)} hub devices" if touched else ""))


def _allocation_command(run: _Run) -> str:
    """``enable-custom-allocation``: the customer's group allocates through the app's webhook (and so its devices
    can renew through DPS); ``disable-custom-allocation``: DPS allocates by the customer's recorded policy itself,
    and renewal payloads go unanswered. The record keeps the choice (``allocation``: ``custom`` or ``direct``)."""
    command, ports = run.command, run.ports
    url = ports.settings.allocation_webhook_url
    wanted = "custom" if command.command == "enable-custom-allocation" else "direct"
    if wanted == "custom" and not url:
        raise Rejected("the app has no DPS_ALLOCATION_WEBHOOK_URL, so DPS has no webhook to call: set it (README, "
                       "Settings) before enabling custom allocation", field="command")
    customer = run.customer().data
    group = ports.dps.get_group(customer["dps"]["name"], command.customer_id)
    # before: as the group in DPS has it (a record without a choice follows the setting, which groups take only when
    # the service next rewrites them)
    before = "custom" if group is not None and group.data.get("allocationPolicy") == "custom" else "direct"
    doc, noop = run.desire(customer_document(command.customer_id), run.customer, wanted, lambda data: data)
    if noop:
        run.audit("no-op", before, wanted, why=noop)
        return f"customer {command.customer_id}: {noop} (no-op)"
    run.settle(run.customer, lambda customer: sync_group(ports, customer, run.now))
    run.audit("changed", before, wanted, policy=doc.data["parameters"].get("allocationPolicy") or "hashed")
    return f"customer {command.customer_id}: allocation {before} -> {wanted}"


def run_command(command: Command, delivery: Delivery, *, ports: Ports, now: dt.datetime,
                sleep=time.sleep) -> str:
    run = _Run(command, delivery, ports, now, sleep)
    if command.command in DEVICE_COMMANDS:
        return _device_command(run)
    if command.command in ALLOCATION_COMMANDS:
        return _allocation_command(run)
    if command.command == "renew-intermediate":
        run.customer()
        outcome = renew_intermediate(command.customer_id, renewal_id=run.id, reason=command.reason,
                                     store=ports.store, keys=ports.keys, audit=ports.audit, now=now,
                                     sync=lambda customer: sync_group(ports, customer, now),
                                     settings=ports.settings, request_id=command.request_id,
                                     message_id=delivery.message_id, force=command.force)
        return f"customer {command.customer_id}: {outcome}"
    return _customer_command(run)

