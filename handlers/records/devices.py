"""The device record, ``devices/{deviceId}.json``: one per device id across customers; statuses, JSON form, index
tags and the expiry rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from ..ports import Document, DocumentStore


class DeviceStatus(StrEnum):
    ISSUED = "issued"
    DISABLED = "disabled"  # by disable-device; enable-device sets it back (or to expired, if it is)
    EXPIRED = "expired"  # by the expiry sweep or enable-device, once notAfter has passed


class IssuedBy(StrEnum):
    BATCH = "batch"  # a device batch (the factory), first issue or reissue=true
    RENEWAL = "renewal"  # the device renewed it through DPS (the custom allocation webhook)


HISTORY_KEPT = 20  # previous certificates a record keeps, newest first: years of yearly renewals


class KeySource(StrEnum):
    GENERATED = "generated"  # the service made the key: it is in the PFX / encrypted key output
    CSR = "csr"  # the device kept its key and sent a CSR


@dataclass(frozen=True)
class DeviceRecord:
    """``devices/{deviceId}.json``: the certificate this service issued to a device, where its outputs are, and what
    commands and the sweep learned about it since. ``certificate`` holds the rest of ``pki.export.summary`` (subject,
    issuer, notBefore, thumbprints); ``events`` what commands and the sweep added (``disabledReason``, ``expiredAt``,
    ``expiryNotice``...), kept as they wrote it. ``previous`` lists the certificates this one replaced, newest first
    (``certificates`` is the whole history): a renewal accepts the current or a previous certificate as the one the
    device presents."""

    customer_id: str
    device_id: str
    status: DeviceStatus
    serial: str
    not_after: str
    key_source: KeySource
    outputs: Mapping[str, str]  # its one output blob, "pfx" or "pem" (older records: certificate, chain, pfx|key)
    certificate_pem: str | None = None  # the device certificate (older records: in outputs["certificate"])
    issued_at: str | None = None
    intermediate_serial: str | None = None
    batch: str | None = None
    row: int | None = None
    pfx_secret: Mapping[str, str] | None = None  # the batch's password secret (name, version); generated keys only
    hub: Mapping[str, str] | None = None  # where a command last found the device in IoT Hub
    issued_by: IssuedBy | None = None  # records written before it was kept: a batch
    previous: tuple[Mapping[str, Any], ...] | None = None
    certificate: Mapping[str, str] = field(default_factory=dict)
    events: Mapping[str, Any] = field(default_factory=dict)

    _FIELDS: ClassVar[dict[str, str]] = {
        "customerId": "customer_id", "deviceId": "device_id", "status": "status", "serial": "serial",
        "notAfter": "not_after", "issuedAt": "issued_at", "keySource": "key_source", "outputs": "outputs",
        "certificatePem": "certificate_pem",
        "intermediateSerial": "intermediate_serial", "batch": "batch", "row": "row", "pfxSecret": "pfx_secret",
        "hub": "hub", "issuedBy": "issued_by", "previousCertificates": "previous"}
    _CERTIFICATE: ClassVar[tuple[str, ...]] = ("subject", "issuer", "notBefore", "thumbprintSha1", "thumbprintSha256")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceRecord:
        known = {attr: data[key] for key, attr in cls._FIELDS.items() if key in data}
        if "previous" in known:
            known["previous"] = tuple(known["previous"])
        if "issued_by" in known:
            known["issued_by"] = IssuedBy(known["issued_by"])
        return cls(**{**known, "status": DeviceStatus(data["status"]),
                      "key_source": KeySource(data.get("keySource") or KeySource.GENERATED)},
                   certificate={k: data[k] for k in cls._CERTIFICATE if k in data},
                   events={k: v for k, v in data.items() if k not in cls._FIELDS and k not in cls._CERTIFICATE})

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, attr) for key, attr in self._FIELDS.items()}
        data = {k: v for k, v in data.items() if v is not None or k in ("intermediateSerial", "pfxSecret")}
        if self.previous is not None:
            data["previousCertificates"] = [dict(entry) for entry in self.previous]
        if self.issued_by is not None:
            data["issuedBy"] = self.issued_by.value
        return {**self.certificate, **data, "status": self.status.value, "keySource": self.key_source.value,
                "outputs": dict(self.outputs), **self.events}

    @property
    def entry(self) -> dict[str, Any]:
        """This record's certificate as a history entry."""
        entry = {"serial": self.serial, "notAfter": self.not_after, "issuedAt": self.issued_at,
                 "thumbprintSha256": self.certificate.get("thumbprintSha256"),
                 "issuedBy": (self.issued_by or IssuedBy.BATCH).value, "batch": self.batch}
        return {k: v for k, v in entry.items() if v is not None}

    @property
    def certificates(self) -> list[dict[str, Any]]:
        """Every certificate issued to the device, the current one first (``current: true``)."""
        return [{**self.entry, "current": True}, *(dict(entry) for entry in self.previous or ())]

    def replacing(self, recorded: Mapping[str, Any]) -> DeviceRecord:
        """This record in place of ``recorded`` (the stored JSON; a reissue or a renewal): the certificates it
        replaces become its history."""
        old = DeviceRecord.from_json(recorded)
        return dataclasses.replace(self, previous=(old.entry, *(old.previous or ()))[:HISTORY_KEPT])

    @property
    def document(self) -> str:
        return device_document(self.device_id)

    @property
    def tags(self) -> dict[str, str]:
        """Index tags the expiry sweep, renewals and the CLI query (notAfter as YYYYMMDD sorts as text)."""
        tags = {"kind": "device", "customer": self.customer_id, "status": self.status.value,
                "notAfter": self.not_after[:10].replace("-", "")}
        if self.intermediate_serial:  # which devices a renewal would cut off (handlers/intermediates.py)
            tags["issuer"] = self.intermediate_serial
        return tags

    @property
    def output(self) -> str | None:
        """The device's output blob: its PFX or PEM (older records: the PFX or key, else the chain)."""
        outputs = self.outputs
        return outputs.get("pfx") or outputs.get("pem") or outputs.get("key") or outputs.get("chain")

    def certificate_pem_in(self, files: Any) -> str:
        """The device certificate's PEM: in the record, or, for records written before it was, in the certificate
        file ``files`` (an ``InputFiles``) holds."""
        return self.certificate_pem or files.get(self.outputs["certificate"]).decode()

    def expired_by(self, now: str) -> bool:
        """Past its notAfter at ``now`` (a UTC stamp, as ``leases.stamp`` writes it). The certificate is valid through
        notAfter, inclusive (RFC 5280 section 4.1.2.5)."""
        return self.not_after < now


def device_document(device_id: str) -> str:
    """One record per device id, whatever the customer: DPS registration ids are shared by every group of an instance
    and hub device ids by everyone on a hub, so an id is held by the first customer whose certificate for it is
    recorded (a create-if-absent), and no other customer can be issued, or act on, that id."""
    return f"devices/{device_id}.json"


def read_device(store: DocumentStore, customer_id: str, device_id: str) -> Document | None:
    """The device record if ``customer_id`` holds the device; ``None`` otherwise (another customer's device is
    answered exactly like a device nobody holds, so no input learns who holds it)."""
    doc = store.get(device_document(device_id))
    return doc if doc is not None and doc.data.get("customerId") == customer_id else None


def device_tags(data: Mapping[str, Any]) -> dict[str, str]:
    """The index tags of a device record's JSON (``DeviceRecord.tags``)."""
    return DeviceRecord.from_json(data).tags
