"""Ports shared by several handlers. Use-case specific ports live next to their handler."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pki.keys import KeyType, PublicKey
from pki.signing import SignFn

from .dps_pool import OnboardingSettings


@dataclass(frozen=True)
class Document:
    """A JSON record and the ETag it was read or written at."""

    name: str
    data: dict[str, Any]
    etag: str


class DocumentStore(Protocol):
    """JSON documents with optimistic concurrency and index tags (blob storage in production)."""

    def get(self, name: str) -> Document | None:
        """The document, or ``None`` when there is none."""

    def create(self, name: str, data: Mapping[str, Any], *, tags: Mapping[str, str] | None = None) -> Document:
        """Write only if absent; ``AlreadyExists`` otherwise."""

    def replace(self, current: Document, data: Mapping[str, Any], *,
                tags: Mapping[str, str] | None = None) -> Document:
        """Write only if unchanged since ``current`` was read; ``Conflict`` otherwise."""

    def find(self, tag_filter: str) -> Iterator[str]:
        """Names of documents whose index tags match a filter such as ``"status" = 'active'``."""


@dataclass(frozen=True)
class KeyRef:
    """One version of a key held by a key store. The private half never leaves the store."""

    name: str
    version: str
    key_type: KeyType
    public_key: PublicKey = field(repr=False, compare=False)


class KeyStore(Protocol):
    """Where CA keys live (Azure Key Vault in production) and sign."""

    def create_key(self, name: str, key_type: KeyType) -> KeyRef:
        """A new version of key ``name``."""

    def get_key(self, name: str, version: str | None = None) -> KeyRef:
        """A version of key ``name`` (the latest when ``version`` is None); ``NotFound`` if absent."""

    def signer(self, key: KeyRef) -> SignFn:
        """``sign(algorithm, digest)`` with Key Vault semantics for that exact version."""


class AuditLog(Protocol):
    """Append-only record of every state change and issuance."""

    def append(self, event: Mapping[str, Any]) -> None:
        """Store one event (``at``, ``action``, ``effect``, the subject ids, before/after...)."""


class InputFiles(Protocol):
    """Uploaded files (``container/name`` paths), read as a stream or by byte range."""

    def properties(self, path: str) -> tuple[int, str, dict[str, str]]:
        """Size, upload and metadata (lower-case keys); ``NotFound`` if absent. The upload names which upload
        the file is: new on every overwrite, unchanged by metadata or tag changes."""

    def stream(self, path: str, upload: str | None = None) -> Iterator[bytes]:
        """The file's bytes; ``Conflict`` if it is no longer the upload ``upload``."""

    def read_range(self, path: str, start: int, end: int, upload: str | None = None) -> bytes:
        """Bytes of the upload ``upload``; ``Conflict`` if the file was overwritten since."""


class OutputFiles(Protocol):
    """Files the service writes (``container/name`` paths)."""

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, path: str) -> bytes: ...

    def delete(self, path: str) -> None: ...

    def assemble(self, path: str, parts: Iterable[bytes], content_type: str) -> None:
        """Write ``path`` as the concatenation of ``parts`` without holding them all in memory."""


class MessageQueue(Protocol):
    def send(self, queue: str, message: Mapping[str, Any]) -> None: ...


class Secrets(Protocol):
    """Key Vault secrets (PFX passwords). Values never go to logs, blobs or messages."""

    def set_secret(self, name: str, value: str) -> str:
        """Store a new version; returns the version."""

    def get_secret(self, name: str, version: str | None = None) -> str: ...


@dataclass(frozen=True)
class Enrollment:
    """An enrollment group or an individual enrollment as DPS returns it, and its ETag."""

    data: dict
    etag: str


class EnrollmentGroups(Protocol):
    """Enrollment groups across the DPS pool (``dps`` names the instance)."""

    def get_group(self, dps: str, group_id: str) -> Enrollment | None: ...

    def create_group(self, dps: str, group: dict) -> Enrollment:
        """Create only if absent: ``AlreadyExists`` if it exists, ``CapacityExhausted`` if DPS is full."""


@dataclass(frozen=True)
class CaCertificate:
    """A CA certificate as a DPS instance holds it (its management resource)."""

    name: str
    thumbprint: str  # SHA-1, upper-case hex, as DPS reports it
    verified: bool
    etag: str
    pem: bytes | None = None  # the certificate as uploaded (PEM or DER), where DPS returns it


class Provisioning(Protocol):
    """What the commands need of the DPS pool (``dps`` names the instance)."""

    def get_group(self, dps: str, group_id: str) -> Enrollment | None: ...

    def replace_group(self, dps: str, group: dict, etag: str) -> Enrollment: ...

    def get_enrollment(self, dps: str, registration_id: str) -> Enrollment | None: ...

    def put_enrollment(self, dps: str, enrollment: dict, etag: str | None) -> Enrollment: ...

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

    def set_desired(self, hub: str, device_id: str, desired: Mapping[str, Any]) -> None:
        """Merge ``desired`` into the device twin's desired properties; ``NotFound`` if the hub lacks the device."""


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


class Registrar(Protocol):
    """Test registration of a device with DPS over mutual TLS (the batch option ``register``)."""

    def register(self, id_scope: str, device_id: str, chain_pem: bytes, key_pem: bytes) -> str:
        """The assigned hub; raises with DPS's reason when refused."""
