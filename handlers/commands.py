"""Use case: an operator command from ``pki-commands`` -> devices and customers disabled/enabled in IoT Hub
and DPS, intermediates renewed.

Each target record (device or customer) keeps the last command applied to it (``lastCommand``: its id,
its order key and whether its side effects are done). A command is ordered by its enqueue time, then its
``requestId``, then its message id: one older than the recorded command is ``superseded`` (a no-op,
audited), so a disable and an enable of one device racing on two instances end in the state of the
later one. The record is written first (the desired state), then DPS and IoT Hub are brought to it; a
run that finds a newer desired state after its side effects applies that one too, so the last writer's
state is what DPS and the hub end with. A redelivered command finds its state applied: a no-op.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pki.ids import registration_id_problem

from .batch_chunk import device_tags, read_device
from .errors import AlreadyExists, Conflict, InvalidMessage, Rejected, TransientError
from .intermediates import renew_intermediate
from .leases import stamp, update
from .messages import REQUEST_ID, REQUEST_ID_RULE, Delivery, Fields, decode_json_message
from .onboarding import (
    CUSTOMER_ID,
    ONBOARDED,
    Group,
    OnboardingSettings,
    customer_document,
    customer_tags,
    group_body,
    placed_instance,
)
from .ports import AuditLog, DocumentStore, KeyStore, OutputFiles

QUEUE = "pki-commands"
COMMANDS = ("disable-device", "enable-device", "disable-customer", "enable-customer", "renew-intermediate")
_DEVICE_COMMANDS = ("disable-device", "enable-device")
_ATTEMPTS = 8
SAME_COMMAND_WAIT_S = 20.0  # how long a second delivery waits for the first to finish before taking over


@dataclass(frozen=True)
class Command:
    command: str
    customer_id: str
    reason: str
    device_id: str | None = None
    request_id: str | None = None
    disable_devices: bool = False
    force: bool = False

    @classmethod
    def parse(cls, raw: bytes | str) -> Command:
        """Check a message against the contract; ``InvalidMessage`` names the first bad field."""
        fields = Fields(decode_json_message(raw))
        command = fields.text("command", required=True, max_length=32)
        if command not in COMMANDS:
            raise InvalidMessage("command", f"{command!r} must be one of {', '.join(COMMANDS)}")
        customer_id = fields.text("customerId", required=True, max_length=63, pattern=CUSTOMER_ID,
                                  rule="is not a customer id (lowercase a-z, 0-9 and '-')")
        device_id = fields.text("deviceId", max_length=128)
        if command in _DEVICE_COMMANDS:
            if device_id is None:
                raise InvalidMessage("deviceId", f"is required for {command}")
            problem = registration_id_problem(device_id)
            if problem:
                raise InvalidMessage("deviceId", f"{device_id!r} {problem}")
        elif device_id is not None:
            raise InvalidMessage("deviceId", f"is not allowed for {command}")
        reason = fields.text("reason", required=True, max_length=512)
        if not reason.isprintable():
            raise InvalidMessage("reason", "must be printable text on one line")
        disable_devices = fields.boolean("disableDevices")
        if disable_devices and command != "disable-customer":
            raise InvalidMessage("disableDevices", "is only for disable-customer")
        force = fields.boolean("force")
        if force and command != "renew-intermediate":
            raise InvalidMessage("force", "is only for renew-intermediate")
        request_id = fields.text("requestId", max_length=128, pattern=REQUEST_ID, rule=REQUEST_ID_RULE)
        fields.reject_unknown()
        return cls(command=command, customer_id=customer_id, reason=reason, device_id=device_id,
                   request_id=request_id, disable_devices=disable_devices, force=force)


class Provisioning(Protocol):
    """What the commands need of the DPS pool (``dps`` names the instance)."""

    def get_group(self, dps: str, group_id: str) -> Group | None: ...

    def replace_group(self, dps: str, group: dict, etag: str) -> Group: ...

    def get_enrollment(self, dps: str, registration_id: str) -> Group | None: ...

    def put_enrollment(self, dps: str, enrollment: dict, etag: str | None) -> Group: ...

    def delete_enrollment(self, dps: str, registration_id: str, etag: str) -> None: ...

    def registration(self, dps: str, registration_id: str) -> dict | None: ...

    def registrations(self, dps: str, group_id: str) -> Iterator[dict]: ...


class HubRegistry(Protocol):
    """The IoT hubs' device registries, by host name (throttled: see clients/iothub.py)."""

    def device(self, hub: str, device_id: str) -> dict | None:
        """``{"deviceId", "status", "etag", "iotEdge"}`` or None if the hub does not know the device."""

    def set_status(self, hub: str, device: dict, status: str, reason: str) -> None:
        """At the device's etag; ``Conflict`` if it changed since it was read."""

    def set_statuses(self, hub: str, device_ids: list[str], status: str, reason: str, *,
                     iot_edge: bool = False) -> BulkOutcome:
        """Bulk update of existing devices (a missing one is not created)."""


@dataclass(frozen=True)
class BulkOutcome:
    """What a bulk status change did: devices the hub refused (with its reasons), devices it no longer has."""

    problems: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ports:
    store: DocumentStore
    keys: KeyStore
    dps: Provisioning
    hubs: HubRegistry
    files: OutputFiles
    audit: AuditLog
    settings: OnboardingSettings


def order_key(command: Command, delivery: Delivery) -> str:
    """Later commands sort later: enqueue time (microseconds), then requestId, then message id."""
    at = delivery.enqueued_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") \
        if delivery.enqueued_at else ""
    return f"{at}|{command.request_id or ''}|{delivery.message_id or ''}"


def command_id(command: Command, delivery: Delivery) -> str:
    """What makes two deliveries "the same command": its requestId, else its queue message id."""
    return command.request_id or f"message:{delivery.message_id}"


class _Run:
    def __init__(self, command: Command, delivery: Delivery, ports: Ports, now: dt.datetime, sleep=time.sleep):
        self.command, self.delivery, self.ports, self.now, self.sleep = command, delivery, ports, now, sleep
        self.order = order_key(command, delivery)
        self.id = command_id(command, delivery)

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
        if doc.data["status"] not in ONBOARDED:
            raise Rejected(f"customer {self.command.customer_id!r} is {doc.data['status']}, not onboarded: "
                           "finish its onboarding first", field="customerId")
        return doc

    def desire(self, name: str, read, wanted: str, changes) -> tuple[Any, str | None]:
        """Record the desired state; returns the record and None, or the record and the no-op reason."""
        waited = 0.0
        for _ in range(_ATTEMPTS + int(SAME_COMMAND_WAIT_S / 0.5)):
            doc = read()
            last = doc.data.get("lastCommand") or {}
            if last.get("id") == self.id:  # the same command again (redelivered, or sent twice with one requestId)
                if last.get("applied"):
                    return doc, f"already applied by this command ({self.id})"
                if waited < SAME_COMMAND_WAIT_S:  # another run of it is applying it: let that one finish
                    self.sleep(0.5)
                    waited += 0.5
                    continue
                return doc, None  # that run is gone: finish its work
            if last.get("order", "") > self.order:
                return doc, f"superseded by the later {last.get('command')} ({last.get('id')})"
            if doc.data["status"] == wanted and last.get("applied", True):
                if last.get("order", "") < self.order:  # remember it: an older, opposite command is superseded
                    data = {**doc.data, "lastCommand": {**self.last(), "applied": True}}
                    try:
                        doc = self.ports.store.replace(doc, data, tags=self.tags(data))
                    except Conflict:
                        continue
                return doc, f"already {wanted}"
            data = {**changes(doc.data), "status": wanted, "lastCommand": self.last(),
                    "updatedAt": stamp(self.now)}
            try:
                return self.ports.store.replace(doc, data, tags=self.tags(data)), None
            except Conflict:
                continue
        raise TransientError(f"{name}: the record kept changing; retry")

    def tags(self, data: dict) -> dict[str, str]:
        return device_tags(data) if self.command.command in _DEVICE_COMMANDS else customer_tags(data)

    def settle(self, read, apply) -> Any:
        """Bring DPS/IoT Hub to the record's desired state until no newer command has landed meanwhile, then
        mark the command applied. Whoever writes a desired state last also applies last. ``apply`` may return
        fields it learned (where the device lives) to keep in the record."""
        for _ in range(_ATTEMPTS):
            doc = read()
            learned = apply(doc.data) or {}
            again = read()
            if (again.data.get("lastCommand") or {}).get("order") != (doc.data.get("lastCommand") or {}).get("order"):
                continue  # a newer command changed the desired state while this one applied: apply that too
            last = {**again.data["lastCommand"], "applied": True}
            try:
                return self.ports.store.replace(again, {**again.data, **learned, "lastCommand": last},
                                                tags=self.tags(again.data))
            except Conflict:
                continue
        raise TransientError("the desired state kept changing while it was applied; retry")


# --- devices -------------------------------------------------------------------------------------------------
def _device_apply(run: _Run, customer: dict, certificate_pem: str):
    dps, device_id = customer["dps"]["name"], run.command.device_id
    ports = run.ports

    def apply(device: dict) -> None:
        disabled = device["status"] == "disabled"
        reason = (device.get("lastCommand") or {}).get("reason", "")
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
        if _assigned(registration) and not registered_through(ports.dps, dps, customer["customerId"], device_id):
            # Not this customer's device in the hub, whatever our record says: leave it alone.
            return {"hub": {**(device.get("hub") or {}), "status": "not-touched",
                            "why": f"registration {device_id} on {dps} is assigned through another enrollment, not "
                                   f"the group {customer['customerId']}"}}
        placement = hub_placement(registration, device)
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


def _assigned(registration: dict | None) -> bool:
    return bool(registration) and registration.get("status", "assigned") == "assigned" \
        and bool(registration.get("assignedHub"))


def registered_through(dps: Provisioning, instance: str, group_id: str, registration_id: str) -> bool:
    """Whether the device's registration went through enrollment group ``group_id``. DPS's registration state does not
    name its enrollment (DeviceRegistrationState in the service API spec, 2021-10-01: no group field); the query of
    one group's registrations (DeviceRegistrationState_Query) is the only place that says, so it is read, paged,
    until the device turns up."""
    wanted = registration_id.lower()  # DPS registration ids compare case-insensitively
    return any((state.get("registrationId") or "").lower() == wanted for state in dps.registrations(instance, group_id))


def hub_placement(registration: dict | None, record: dict) -> dict | None:
    """Where a device lives in IoT Hub: DPS's registration state when its latest attempt was assigned, otherwise what
    the device record learned when it last was. A refused attempt (``disabled``, ``failed``) names no hub, and the
    device is still where it was assigned before it (DPS does not remove it from the hub)."""
    if _assigned(registration):
        return {"name": registration["assignedHub"],
                "deviceId": registration.get("deviceId") or registration.get("registrationId")}
    known = record.get("hub") or {}
    return {"name": known["name"], "deviceId": known["deviceId"]} if known.get("name") else None


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
    current = read().data
    before = current["status"]
    if disable:
        wanted = "disabled"
    else:
        wanted = "expired" if current.get("notAfter", "") and current["notAfter"] < stamp(run.now) else "issued"

    def changes(data: dict) -> dict:
        if disable:
            return {**data, "disabledReason": command.reason, "disabledAt": stamp(run.now)}
        return {k: v for k, v in data.items() if k not in ("disabledReason", "disabledAt")}

    doc, noop = run.desire(name, read, wanted, changes)
    if noop:
        run.audit("no-op", before, doc.data["status"], why=noop)
        return f"device {command.customer_id}/{command.device_id}: {noop} (no-op)"
    certificate = ports.files.get(doc.data["outputs"]["certificate"]).decode()
    settled = run.settle(read, _device_apply(run, customer, certificate))
    hub = (settled.data if settled is not None else {}).get("hub")
    run.audit("changed", before, wanted, serial=doc.data.get("serial"),
              hub=hub or "never assigned to a hub: nothing to change there")
    return f"device {command.customer_id}/{command.device_id}: {before} -> {wanted}"


# --- customers -----------------------------------------------------------------------------------------------
def sync_group(ports: Ports, customer: dict, now: dt.datetime) -> None:
    """Make the customer's enrollment group match its record: status, primary and (unexpired) secondary."""
    dps = customer["dps"]["name"]
    wanted = group_body(customer, placed_instance(ports.settings.pool, customer), now=now)
    for _ in range(_ATTEMPTS):
        group = ports.dps.get_group(dps, customer["customerId"])
        if group is None:
            raise Rejected(f"enrollment group {customer['customerId']} is missing on {dps}: it was deleted by hand")
        if _same_group(group.data, wanted):
            return
        try:
            ports.dps.replace_group(dps, wanted, group.etag)
            return
        except Conflict:
            continue
    raise TransientError(f"enrollment group {customer['customerId']} on {dps} kept changing; retry")


def _same_group(found: dict, wanted: dict) -> bool:
    """Status and certificates (DPS returns thumbprints, not PEM) already as wanted."""
    from cryptography import x509

    from pki.export import thumbprints

    if found.get("provisioningStatus", "enabled") != wanted["provisioningStatus"]:
        return False
    found_slots = ((found.get("attestation") or {}).get("x509") or {}).get("signingCertificates") or {}
    wanted_slots = wanted["attestation"]["x509"]["signingCertificates"]
    for slot in ("primary", "secondary"):
        have = ((found_slots.get(slot) or {}).get("info") or {}).get("sha1Thumbprint", "").upper()
        pem = (wanted_slots.get(slot) or {}).get("certificate")
        want = thumbprints(x509.load_pem_x509_certificate(pem.encode()))["sha1"].upper() if pem else ""
        if have != want:
            return False
    return True


def hub_devices_document(customer_id: str) -> str:
    """Where the hub devices that ``disable-customer`` disabled are kept, by hub: DPS forgets a device's hub once its
    latest attempt was refused (a disabled group refuses every device that tries again), so the enable that
    follows must find them here."""
    return f"customers/{customer_id}/hub-devices.json"


def _remember_hub_devices(ports: Ports, customer_id: str, by_hub: dict[str, list[str]]) -> dict[str, list[str]]:
    """Merge ``by_hub`` into the kept list; returns the union (what an enable must reach)."""
    def merge(data: dict | None) -> dict | None:
        kept = (data or {}).get("hubs") or {}
        merged = {hub: sorted(set(kept.get(hub, [])) | set(by_hub.get(hub, []))) for hub in set(kept) | set(by_hub)}
        if data is not None and merged == kept:
            return None
        return {**(data or {"customerId": customer_id}), "hubs": merged}

    return update(ports.store, hub_devices_document(customer_id), merge).data["hubs"]


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
        record = {}
        if state.get("status", "assigned") != "assigned":  # a refused latest attempt: where the record saw it
            doc = read_device(ports.store, customer["customerId"], state["registrationId"])
            record = doc.data if doc is not None else {}
        placement = hub_placement(state, record)
        if placement is not None:
            by_hub.setdefault(placement["name"], []).append(placement["deviceId"])
    kept = _remember_hub_devices(ports, customer["customerId"], by_hub)
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


def run_command(command: Command, delivery: Delivery, *, ports: Ports, now: dt.datetime,
                sleep=time.sleep) -> str:
    run = _Run(command, delivery, ports, now, sleep)
    if command.command in _DEVICE_COMMANDS:
        return _device_command(run)
    if command.command == "renew-intermediate":
        run.customer()
        outcome = renew_intermediate(command.customer_id, renewal_id=run.id, reason=command.reason,
                                     store=ports.store, keys=ports.keys, audit=ports.audit, now=now,
                                     sync=lambda customer: sync_group(ports, customer, now),
                                     settings=ports.settings, request_id=command.request_id,
                                     message_id=delivery.message_id, force=command.force)
        return f"customer {command.customer_id}: {outcome}"
    return _customer_command(run)

