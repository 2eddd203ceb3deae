"""The state records, one home each: their document names, index tags, statuses and identity rules.

- customer ``customers/{id}.json`` (``customer_document``): statuses ``pending -> key_created ->
  certificate_issued -> group_created -> active`` (``onboarding``), ``disabled`` by a command, ``rejected``
  when no DPS instance had room; tags ``kind=customer``, ``customer``, ``status``, ``dps``;
- device ``devices/{deviceId}.json`` (``device_document``), one per id across customers: ``issued``,
  ``disabled``, ``expired``; tags ``kind=device``, ``customer``, ``status``, ``notAfter``, ``issuer``;
- batch ``batches/{customerId}/{batchName}.json`` and its chunks (``BatchRef``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from pki.keys import KeyType

from . import batch_format
from .errors import InvalidMessage
from .messages import Fields, decode_json_message
from .ports import Document, DocumentStore

# Lowercase letters, digits and '-', not at either end: it is the group id, the Key Vault key name
# suffix and the intermediate's CN (X.520 ub-common-name 64).
CUSTOMER_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_customer_id(value: str, *, where: str = "") -> str:
    """The one customer-id rule and its one wording (``InvalidMessage`` on ``customerId``); ``where`` says where the
    value was found ("in the path")."""
    if CUSTOMER_ID.fullmatch(value):
        return value
    hint = "; it must be lowercase" if CUSTOMER_ID.fullmatch(value.lower()) else ""
    raise InvalidMessage("customerId", f"{value!r}{where} is not a customer id (1-63 of a-z, 0-9 and '-', starting "
                         f"and ending with a letter or digit){hint}")


ONBOARDED = ("active", "disabled")  # disabled by an operator command: onboarded all the same


def customer_document(customer_id: str) -> str:
    return f"customers/{customer_id}.json"


def key_name(customer_id: str) -> str:
    return f"customer-{customer_id}"


def customer_tags(data: dict) -> dict[str, str]:
    return {"kind": "customer", "customer": data["customerId"], "status": data["status"],
            "dps": data.get("dps", {}).get("name", "")}


def list_customers(store: DocumentStore) -> Sequence[str]:
    return sorted(name.removeprefix("customers/").removesuffix(".json")
                  for name in store.find("\"kind\" = 'customer'"))


class DeviceStatus(StrEnum):
    ISSUED = "issued"
    DISABLED = "disabled"  # by disable-device; enable-device sets it back (or to expired, if it is)
    EXPIRED = "expired"  # by the expiry sweep or enable-device, once notAfter has passed


class KeySource(StrEnum):
    GENERATED = "generated"  # the service made the key: it is in the PFX / encrypted key output
    CSR = "csr"  # the device kept its key and sent a CSR


@dataclass(frozen=True)
class DeviceRecord:
    """``devices/{deviceId}.json``: the certificate this service issued to a device, where its outputs are, and what
    commands and the sweep learned about it since. ``certificate`` holds the rest of ``pki.export.summary`` (subject,
    issuer, notBefore, thumbprints); ``events`` what commands and the sweep added (``disabledReason``, ``expiredAt``,
    ``expiryNotice``...), kept as they wrote it."""

    customer_id: str
    device_id: str
    status: DeviceStatus
    serial: str
    not_after: str
    key_source: KeySource
    outputs: Mapping[str, str]  # certificate, chain, and pfx or key (generated keys): container/name paths
    issued_at: str | None = None
    intermediate_serial: str | None = None
    batch: str | None = None
    row: int | None = None
    pfx_secret: Mapping[str, str] | None = None  # the batch's password secret (name, version); generated keys only
    hub: Mapping[str, str] | None = None  # where a command last found the device in IoT Hub
    certificate: Mapping[str, str] = field(default_factory=dict)
    events: Mapping[str, Any] = field(default_factory=dict)

    _FIELDS: ClassVar[dict[str, str]] = {
        "customerId": "customer_id", "deviceId": "device_id", "status": "status", "serial": "serial",
        "notAfter": "not_after", "issuedAt": "issued_at", "keySource": "key_source", "outputs": "outputs",
        "intermediateSerial": "intermediate_serial", "batch": "batch", "row": "row", "pfxSecret": "pfx_secret",
        "hub": "hub"}
    _CERTIFICATE: ClassVar[tuple[str, ...]] = ("subject", "issuer", "notBefore", "thumbprintSha1", "thumbprintSha256")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceRecord:
        known = {attr: data[key] for key, attr in cls._FIELDS.items() if key in data}
        return cls(**{**known, "status": DeviceStatus(data["status"]),
                      "key_source": KeySource(data.get("keySource") or KeySource.GENERATED)},
                   certificate={k: data[k] for k in cls._CERTIFICATE if k in data},
                   events={k: v for k, v in data.items() if k not in cls._FIELDS and k not in cls._CERTIFICATE})

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, attr) for key, attr in self._FIELDS.items()}
        data = {k: v for k, v in data.items() if v is not None or k in ("intermediateSerial", "pfxSecret")}
        return {**self.certificate, **data, "status": self.status.value, "keySource": self.key_source.value,
                "outputs": dict(self.outputs), **self.events}

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


MAX_BATCH_NAME = 200


@dataclass(frozen=True)
class BatchSettings:
    input_container: str = "device-batches"
    results_container: str = "device-batches-results"
    output_container: str = "device-certificates"
    chunk_rows: int = 500
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    default_key_type: KeyType = KeyType.EC_P256
    default_validity_days: int = 365
    inflight: int = 16
    chunk_lease_s: float = 120.0  # renewed while a chunk runs; a crashed worker's chunk is free this long after


@dataclass(frozen=True)
class BatchRef:
    customer_id: str
    batch_name: str

    @classmethod
    def from_path(cls, path: str, settings: BatchSettings) -> BatchRef:
        """The batch a blob path names, checked before any storage call: the path decides where the batch's records,
        outputs and reports go, so it must name exactly one customer's folder."""
        container, _, rest = path.partition("/")
        customer_id, _, batch_name = rest.partition("/")
        if container != settings.input_container or not customer_id or not batch_name:
            raise InvalidMessage("path", f"{path!r} must be {settings.input_container}/{{customerId}}/{{batchName}}")
        return cls.checked(customer_id, batch_name)

    @classmethod
    def checked(cls, customer_id: str, batch_name: str) -> BatchRef:
        """``InvalidMessage`` unless the customer id is one and the name is a plain relative name: no empty, ``.`` or
        ``..`` segment (SDKs and proxies normalise those, and the result could land in another customer's folder),
        no ``\\ ? #`` or control characters."""
        check_customer_id(customer_id, where=" in the path")
        if len(batch_name) > MAX_BATCH_NAME or any(c in batch_name for c in "\\?#") or not batch_name.isprintable():
            raise InvalidMessage("batchName", f"must be at most {MAX_BATCH_NAME} printable characters, without \\ ? #")
        if any(segment in ("", ".", "..") for segment in batch_name.split("/")):
            raise InvalidMessage("batchName", f"{batch_name!r} has an empty, '.' or '..' path segment")
        batch_format.batch_format(batch_name)
        return cls(customer_id, batch_name)

    @property
    def document(self) -> str:
        return f"batches/{self.customer_id}/{self.batch_name}.json"

    def input_path(self, settings: BatchSettings) -> str:
        return f"{settings.input_container}/{self.customer_id}/{self.batch_name}"

    def report_path(self, settings: BatchSettings, suffix: str) -> str:
        return f"{settings.results_container}/{self.customer_id}/{self.batch_name}.{suffix}"

    def chunk_document(self, n: int) -> str:
        return f"batches/{self.customer_id}/{self.batch_name}/chunks/{n:06d}.json"

    @property
    def secret_name(self) -> str:
        digest = hashlib.sha256(f"{self.customer_id}/{self.batch_name}".encode()).hexdigest()[:16]
        return f"batch-{self.customer_id}-{digest}"[:127]


@dataclass(frozen=True)
class ChunkMessage:
    customer_id: str
    batch_name: str
    chunk: int

    @classmethod
    def parse(cls, raw: bytes | str) -> ChunkMessage:
        """A ``batch-chunks`` message (the intake sends them; a forged one names no other customer's path)."""
        fields = Fields(decode_json_message(raw))
        customer_id = fields.text("customerId", required=True, max_length=63)
        batch_name = fields.text("batchName", required=True, max_length=200)
        chunk = fields.integer("chunk", required=True, minimum=0)
        fields.reject_unknown()
        BatchRef.checked(customer_id, batch_name)  # a forged message names no path outside one customer's folder
        return cls(customer_id, batch_name, chunk)
