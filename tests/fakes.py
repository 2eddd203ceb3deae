"""Small in-memory fakes of the ports, passed in where tests need no real storage."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from handlers.errors import AlreadyExists, Conflict, NotFound
from handlers.ports import Document

_TERM = re.compile(r"""\s*"([^"]+)"\s*(=|<|>|<=|>=)\s*'([^']*)'\s*""")


class MemoryDocumentStore:
    """DocumentStore with the same conditional-write semantics as blob storage."""

    def __init__(self) -> None:
        self._docs: dict[str, tuple[dict, str, dict]] = {}
        self._etags = itertools.count(1)
        self._lock = threading.Lock()
        self.writes = 0

    def get(self, name: str) -> Document | None:
        with self._lock:
            if name not in self._docs:
                return None
            data, etag, _ = self._docs[name]
            return Document(name, copy.deepcopy(data), etag)

    def create(self, name: str, data: Mapping[str, Any], *, tags: Mapping[str, str] | None = None) -> Document:
        with self._lock:
            if name in self._docs:
                raise AlreadyExists(f"document {name}: already exists")
            etag = f'"{next(self._etags)}"'
            self._docs[name] = (copy.deepcopy(dict(data)), etag, dict(tags or {}))
            self.writes += 1
            return Document(name, copy.deepcopy(dict(data)), etag)

    def replace(self, current: Document, data: Mapping[str, Any], *,
                tags: Mapping[str, str] | None = None) -> Document:
        with self._lock:
            if name_etag(self._docs, current.name) != current.etag:
                raise Conflict(f"document {current.name}: changed by someone else (ETag mismatch)")
            etag = f'"{next(self._etags)}"'
            self._docs[current.name] = (copy.deepcopy(dict(data)), etag, dict(tags or {}))
            self.writes += 1
            return Document(current.name, copy.deepcopy(dict(data)), etag)

    def find(self, tag_filter: str) -> Iterator[str]:
        terms = [_TERM.fullmatch(t) for t in re.split(r"\s+AND\s+", tag_filter)]
        if not all(terms):
            raise ValueError(f"unsupported tag filter {tag_filter!r}")
        ops = {"=": str.__eq__, "<": str.__lt__, ">": str.__gt__, "<=": str.__le__, ">=": str.__ge__}
        with self._lock:
            items = list(self._docs.items())
        for name, (_, _, tags) in sorted(items):
            if all(t[1] in tags and ops[t[2]](tags[t[1]], t[3]) for t in terms):
                yield name


def name_etag(docs: dict, name: str) -> str | None:
    return docs[name][1] if name in docs else None


class ListAuditLog:
    """AuditLog that keeps events in a list."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def append(self, event) -> None:
        with self._lock:
            self.events.append(dict(event))


class FakeEnrollmentGroups:
    """EnrollmentGroups with DPS's semantics that matter here: 409 on create, etags, a group quota,
    and the certificate returned as ``info`` with its thumbprint."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.groups: dict[str, dict[str, dict]] = {}
        self.creates = 0
        self._etags = itertools.count(1)
        self._lock = threading.Lock()

    def _view(self, body: dict):
        from cryptography import x509

        from handlers.ports import Enrollment
        from pki.export import thumbprints

        view = copy.deepcopy(body)
        for slot in view["attestation"]["x509"]["signingCertificates"].values():
            cert = x509.load_pem_x509_certificate(slot.pop("certificate").encode())
            slot["info"] = {"sha1Thumbprint": thumbprints(cert)["sha1"], "subjectName": cert.subject.rfc4514_string()}
        return Enrollment(view, view["etag"])

    def get_group(self, dps: str, group_id: str):
        with self._lock:
            body = self.groups.get(dps, {}).get(group_id)
            return self._view(body) if body else None

    def create_group(self, dps: str, group: dict):
        with self._lock:
            groups = self.groups.setdefault(dps, {})
            if group["enrollmentGroupId"] in groups:
                raise AlreadyExists(f"group {group['enrollmentGroupId']} exists")
            if len(groups) >= self.capacity:
                from handlers.errors import CapacityExhausted

                raise CapacityExhausted(f"{dps} is full")
            self.creates += 1
            groups[group["enrollmentGroupId"]] = {**copy.deepcopy(group), "etag": f'"{next(self._etags)}"'}
            return self._view(groups[group["enrollmentGroupId"]])


    def replace_group(self, dps: str, group: dict, etag: str):
        with self._lock:
            groups = self.groups.setdefault(dps, {})
            current = groups.get(group["enrollmentGroupId"])
            if current is None or current["etag"] != etag:
                raise Conflict(f"group {group['enrollmentGroupId']}: etag mismatch")
            self.replaces = getattr(self, "replaces", 0) + 1
            groups[group["enrollmentGroupId"]] = {**copy.deepcopy(group), "etag": f'"{next(self._etags)}"'}
            return self._view(groups[group["enrollmentGroupId"]])


class FakeDps(FakeEnrollmentGroups):
    """The DPS pool for operator commands: groups, individual enrollments and registration states."""

    def __init__(self, capacity: int = 100) -> None:
        super().__init__(capacity)
        self.enrollments: dict[str, dict] = {}
        self.registered: dict[str, dict] = {}  # registrationId -> state (assignedHub, deviceId, group)

    def get_enrollment(self, dps: str, registration_id: str):
        from handlers.ports import Enrollment

        with self._lock:
            body = self.enrollments.get(registration_id)
            return Enrollment(copy.deepcopy(body), body["etag"]) if body else None

    def put_enrollment(self, dps: str, enrollment: dict, etag):
        from handlers.ports import Enrollment

        with self._lock:
            current = self.enrollments.get(enrollment["registrationId"])
            if etag is None and current is not None:
                raise AlreadyExists("enrollment exists")
            if etag is not None and (current is None or current["etag"] != etag):
                raise Conflict("enrollment etag mismatch")
            body = {**copy.deepcopy(enrollment), "etag": f'"{next(self._etags)}"'}
            self.enrollments[enrollment["registrationId"]] = body
            return Enrollment(copy.deepcopy(body), body["etag"])

    def delete_enrollment(self, dps: str, registration_id: str, etag: str) -> None:
        with self._lock:
            current = self.enrollments.get(registration_id)
            if current is not None and current["etag"] != etag:
                raise Conflict("enrollment etag mismatch")
            self.enrollments.pop(registration_id, None)

    def registration(self, dps: str, registration_id: str):
        return copy.deepcopy(self.registered.get(registration_id))

    def registrations(self, dps: str, group_id: str):
        return iter([copy.deepcopy(s) for s in self.registered.values() if s.get("group") == group_id])


class FakeHubs:
    """HubRegistry: device statuses with etags; counts calls (bulk calls count once)."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], dict] = {}
        self.calls = 0
        self._etags = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, hub: str, device_id: str, status: str = "enabled") -> None:
        self.devices[(hub, device_id)] = {"deviceId": device_id, "status": status, "etag": str(next(self._etags)),
                                          "iotEdge": False}

    def device(self, hub: str, device_id: str):
        with self._lock:
            self.calls += 1
            found = self.devices.get((hub, device_id))
            return dict(found) if found else None

    def set_status(self, hub: str, device: dict, status: str, reason: str) -> None:
        with self._lock:
            self.calls += 1
            current = self.devices[(hub, device["deviceId"])]
            if current["etag"] != device["etag"]:
                raise Conflict("device etag mismatch")
            current.update(status=status, etag=str(next(self._etags)))

    def set_desired(self, hub: str, device_id: str, desired) -> None:
        with self._lock:
            self.calls += 1
            current = self.devices.get((hub, device_id))
            if current is None:
                raise NotFound(f"device {device_id} on {hub}")
            current["desired"] = {**current.get("desired", {}), **copy.deepcopy(dict(desired))}

    def set_statuses(self, hub: str, device_ids, status: str, reason: str, *, iot_edge: bool = False):
        from handlers.ports import BulkOutcome

        absent = []
        with self._lock:
            for start in range(0, len(device_ids), 100):
                self.calls += 1
                for device_id in device_ids[start:start + 100]:
                    if (hub, device_id) not in self.devices:  # bulk "update" never creates (DeviceNotFound)
                        absent.append(device_id)
                        continue
                    self.devices[(hub, device_id)].update(status=status, etag=str(next(self._etags)))
        return BulkOutcome(absent=tuple(absent))


def run_concurrently(action, times: int, expected: tuple[type[BaseException], ...] = (Exception,)):
    """Run ``action`` in ``times`` threads at once; returns (results, expected exceptions raised)."""
    results, errors = [], []

    def run():
        try:
            results.append(action())
        except expected as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


class MemoryFiles:
    """InputFiles and OutputFiles in memory: an upload id per write (an overwrite is a new upload), byte ranges
    pinned to the upload, lower-case metadata."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self._uploads = itertools.count(1)
        self._lock = threading.Lock()
        self.writes = 0

    def upload(self, path: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self.writes += 1
            self.blobs[path] = (bytes(data), f"upload-{next(self._uploads)}",
                                {k.lower(): v for k, v in (metadata or {}).items()})

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        """As Set Blob Metadata does: new metadata on the same upload (its creation time stays)."""
        with self._lock:
            data, upload, _ = self.blobs[path]
            self.blobs[path] = (data, upload, {k.lower(): v for k, v in metadata.items()})

    def _current(self, path: str, upload: str | None) -> bytes:
        from handlers.errors import NotFound

        if path not in self.blobs:
            raise NotFound(f"{path}: no such file")
        data, current, _ = self.blobs[path]
        if upload is not None and upload != current:
            raise Conflict(f"{path}: overwritten since upload {upload}")
        return data

    def properties(self, path: str) -> tuple[int, str, dict[str, str]]:
        self._current(path, None)
        data, upload, metadata = self.blobs[path]
        return len(data), upload, dict(metadata)

    def stream(self, path: str, upload: str | None = None) -> Iterator[bytes]:
        data = self._current(path, upload)
        for start in range(0, len(data), 64 * 1024):
            yield data[start:start + 64 * 1024]

    def read_range(self, path: str, start: int, end: int, upload: str | None = None) -> bytes:
        return self._current(path, upload)[start:end]

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.upload(path, data)

    def get(self, path: str) -> bytes:
        return self._current(path, None)

    def delete(self, path: str) -> None:
        with self._lock:
            self.blobs.pop(path, None)

    def assemble(self, path: str, parts, content_type: str) -> None:
        self.upload(path, b"".join(parts))


class MemoryQueue:
    """MessageQueue that keeps what was sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, queue: str, message: Mapping[str, Any]) -> None:
        self.sent.append((queue, dict(message)))


class MemorySecrets:
    """Secrets with versions, in memory."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str] = {}
        self.latest: dict[str, str] = {}
        self._versions = itertools.count(1)

    def set_secret(self, name: str, value: str) -> str:
        version = f"v{next(self._versions)}"
        self.values[(name, version)] = value
        self.latest[name] = version
        return version

    def get_secret(self, name: str, version: str | None = None) -> str:
        return self.values[(name, version or self.latest[name])]


@dataclass
class Message:
    """What the Functions host hands a queue trigger (azure.functions.QueueMessage's reading side)."""

    body: bytes
    id: str
    dequeue_count: int = 1
    insertion_time: dt.datetime | None = None

    def get_body(self) -> bytes:
        return self.body


@dataclass
class Blob:
    name: str
    blob_properties: dict | None = None
