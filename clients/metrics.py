"""The app's metrics, one home for their names, units and attributes (OpenTelemetry API).

Without a configured SDK (no ``APPLICATIONINSIGHTS_CONNECTION_STRING``, no local exporter: ``edge/telemetry.py``)
every instrument is a no-op. Most are derived from the audit trail (``MeteredAuditLog``), which every use case
already writes at each state change: one source for what happened, whether read as an audit event or as a count.

| metric | unit | attributes |
|---|---|---|
| ``pki.certificates.issued`` | certificate | ``customer``, ``keySource`` (generated, csr), ``issuedBy`` |
| ``pki.rejections`` | message | ``queue`` (queue, container or route), ``field`` (the field named, or message) |
|   |   | (the first 50 fields per queue by name, later ones as ``other``: inputs choose them) |
| ``pki.keyvault.signs`` | sign | ``vault`` (host) |
| ``pki.keyvault.throttled`` | response | ``vault``: each 429 on a sign attempt (retried by the client) |
| ``pki.keyvault.sign.duration`` | s | ``vault``: one sign, retries and waits included |
| ``pki.batch.duration`` | s | ``customer``: a batch from its upload's intake to its report |
| ``pki.batch.rate`` | device/s | ``customer``: devices of the batch per second of ``pki.batch.duration`` |
| ``pki.renewals`` | renewal | ``customer``, ``effect`` (changed: issued, no-op: the same CSR again, rejected) |
| ``pki.commands`` | command | ``command``, ``effect`` (changed, no-op, superseded...): commands from the queue |
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics

from handlers.command_message import COMMANDS
from handlers.ports import AuditLog

_meter = metrics.get_meter("iot-pki")
log = logging.getLogger("pki")
# A rejection's field is named by the input, which may be anything a sender chose (an unknown JSON key, an unknown
# blob metadata key): the first few distinct fields per queue keep their names, later ones count as "other".
MAX_FIELDS_PER_QUEUE = 50
_fields: dict[str, set[str]] = {}
_fields_lock = threading.Lock()

CERTIFICATES_ISSUED = _meter.create_counter(
    "pki.certificates.issued", unit="{certificate}", description="certificates issued (batches and renewals)")
REJECTIONS = _meter.create_counter(
    "pki.rejections", unit="{message}", description="inputs refused with a recorded reason")
KEY_VAULT_SIGNS = _meter.create_counter("pki.keyvault.signs", unit="{sign}", description="Key Vault signs made")
KEY_VAULT_THROTTLED = _meter.create_counter(
    "pki.keyvault.throttled", unit="{response}", description="429 answers to Key Vault sign attempts")
KEY_VAULT_SIGN_DURATION = _meter.create_histogram(
    "pki.keyvault.sign.duration", unit="s", description="one Key Vault sign, retries included")
BATCH_DURATION = _meter.create_histogram(
    "pki.batch.duration", unit="s", description="a device batch from intake to report")
BATCH_RATE = _meter.create_histogram(
    "pki.batch.rate", unit="{device}/s", description="a device batch's devices per second")
RENEWALS = _meter.create_counter(
    "pki.renewals", unit="{renewal}", description="device renewals through DPS, by outcome")
COMMANDS_RUN = _meter.create_counter("pki.commands", unit="{command}", description="operator commands, by effect")


def observe(event: Mapping[str, Any]) -> None:
    """Count what one audit event says happened."""
    action, effect, customer = event.get("action"), event.get("effect"), event.get("customer") or ""
    if action == "batch.issue":
        by_source: dict[str, int] = {}
        for item in event.get("issued") or ():
            source = item.get("keySource") or "unknown"
            by_source[source] = by_source.get(source, 0) + 1
        for source, count in by_source.items():
            CERTIFICATES_ISSUED.add(count, {"customer": customer, "keySource": source, "issuedBy": "batch"})
    elif action == "batch.intake" and effect == "rejected":  # a whole batch refused, recorded by intake itself
        rejected("device-batches", event.get("field"))
    elif action == "batch.complete":
        seconds = float(event.get("seconds") or 0)
        devices = sum((event.get("counts") or {}).values())
        BATCH_DURATION.record(seconds, {"customer": customer})
        if seconds > 0:
            BATCH_RATE.record(devices / seconds, {"customer": customer})
    elif action == "renew-device":
        RENEWALS.add(1, {"customer": customer, "effect": effect or ""})
        if effect == "changed":
            CERTIFICATES_ISSUED.add(1, {"customer": customer, "keySource": "csr", "issuedBy": "renewal"})
    elif action in COMMANDS and event.get("messageId"):  # a command from the queue (not the sweep's own renewals)
        COMMANDS_RUN.add(1, {"command": action, "effect": effect or ""})


class MeteredAuditLog:
    """An ``AuditLog`` that also counts each event (``observe``); everything else is the wrapped log's."""

    def __init__(self, inner: AuditLog):
        self._inner = inner

    def append(self, event: Mapping[str, Any]) -> None:
        self._inner.append(event)
        try:
            observe(event)
        except Exception:  # a metric must never fail (and so redo) the work it counts
            log.exception("metrics: could not count audit event %s", event.get("action"))

    def __getattr__(self, name: str) -> Any:  # query() and the like
        return getattr(self._inner, name)


def rejected(queue: str, field: str | None) -> None:
    """An input refused and recorded (by ``edge``, or a batch by its intake): counted by where it came and the
    field it named."""
    label = field or "message"
    with _fields_lock:
        seen = _fields.setdefault(queue, set())
        if label not in seen:
            if len(seen) >= MAX_FIELDS_PER_QUEUE:
                label = "other"
            else:
                seen.add(label)
    REJECTIONS.add(1, {"queue": queue, "field": label})
