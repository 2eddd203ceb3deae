"""Use case: a device batch uploaded to ``device-batches/{customerId}/{batchName}`` -> validated,
recorded and fanned out as chunk messages; nothing is issued here.

The batch is read once, streaming: header and structure checked, rows counted against the limit,
duplicates found (8-byte hashes, so 100,000 ids cost a few MiB), chunk boundaries taken as byte
offsets. A whole-batch problem (unknown or inactive customer, bad options, no header, wrong columns,
too big) rejects the batch with a report saying so; row problems are left to the chunks, which
report them per row. The batch record ``batches/{customerId}/{batchName}.json`` makes a second
trigger of the same blob version a no-op.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pki.csr import key_digest
from pki.keys import DEVICE_KEY_TYPES, KeyType

from . import batch_format
from .errors import AlreadyExists, Conflict, InvalidMessage, NotFound, Rejected, TransientError
from .leases import held_by_other, lease_for, release, stamp, update
from .messages import REQUEST_ID, REQUEST_ID_RULE
from .ports import AuditLog, DocumentStore, InputFiles, MessageQueue, OutputFiles, Secrets
from .records import BatchRef, BatchSettings, CustomerRecord, CustomerStatus, customer_document
from .reports import write_rejection_report

CHUNK_QUEUE = "batch-chunks"
LEASE = dt.timedelta(minutes=5)
# Metadata Azure tools add on their own; anything else unknown is a typo and rejected.
_FOREIGN_METADATA = frozenset({"hdi_isfolder"})
OPTION_KEYS = ("keytype", "validitydays", "output", "register", "reissue", "requestid")
_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only
@dataclass(frozen=True)
class BatchOptions:
    key_type: KeyType
    validity_days: int
    output: str = "pfx"  # "pfx": PKCS#12 with chain; "pem": PEM files, the key PKCS#8-encrypted
    register: int | str = 0  # test-register the first N devices, or "all"
    reissue: bool = False
    request_id: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], settings: BatchSettings) -> BatchOptions:
        unknown = sorted(set(metadata) - set(OPTION_KEYS) - _FOREIGN_METADATA)
        if unknown:
            raise InvalidMessage(f"metadata.{unknown[0]}", f"unknown batch option; options: {', '.join(OPTION_KEYS)}")
        try:
            key_type = KeyType.parse(metadata.get("keytype") or settings.default_key_type.value,
                                     field="metadata.keytype", allowed=DEVICE_KEY_TYPES)
        except ValueError as exc:
            raise InvalidMessage("metadata.keytype", str(exc).split(": ", 1)[-1]) from None
        days = metadata.get("validitydays") or str(settings.default_validity_days)
        if not _WHOLE.fullmatch(days) or not 1 <= int(days) <= 30 * 365:  # (str.isdigit takes '³', int() does not)
            raise InvalidMessage("metadata.validitydays", f"{days!r} must be a whole number of days, 1-10950")
        output = (metadata.get("output") or "pfx").lower()
        if output not in ("pfx", "pem"):
            raise InvalidMessage("metadata.output", f"{output!r} must be pfx or pem")
        register = (metadata.get("register") or "0").lower()
        if register != "all" and not _WHOLE.fullmatch(register):
            raise InvalidMessage("metadata.register", f"{register!r} must be a number of devices or 'all'")
        reissue = (metadata.get("reissue") or "false").lower()
        if reissue not in ("true", "false"):
            raise InvalidMessage("metadata.reissue", f"{reissue!r} must be true or false")
        request_id = metadata.get("requestid") or None
        if request_id is not None and not REQUEST_ID.fullmatch(request_id):
            raise InvalidMessage("metadata.requestid", f"{request_id!r} {REQUEST_ID_RULE}")
        return cls(key_type=key_type, validity_days=int(days), output=output,
                   register=register if register == "all" else int(register), reissue=reissue == "true",
                   request_id=request_id)

    def as_dict(self) -> dict[str, Any]:
        return {"keyType": self.key_type.value, "validityDays": self.validity_days, "output": self.output,
                "register": self.register, "reissue": self.reissue, "requestId": self.request_id}


@dataclass
class _Scan:
    chunks: list[dict] = field(default_factory=list)
    rows: int = 0
    generated_keys: int = 0


def _tags(data: dict) -> dict[str, str]:
    return {"kind": "batch", "customer": data["customerId"], "status": data["status"]}


def _scan(files: InputFiles, path: str, upload: str, kind: str,
          settings: BatchSettings) -> tuple[batch_format.Header, _Scan]:
    header, lines = batch_format.read_header(files.stream(path, upload), kind)
    scan, seen, keys = _Scan(), {}, {}
    current: dict | None = None
    start = header.data_start
    for row in batch_format.parse_rows(lines, header, kind):
        scan.rows += 1
        if scan.rows > settings.max_rows:
            raise InvalidMessage("file", f"has more than {settings.max_rows} rows (BATCH_MAX_ROWS); split it")
        if current is None:
            current = {"n": len(scan.chunks), "start": start, "firstRow": row.index, "rows": 0, "duplicates": {},
                       "sameKey": {}}
        current["rows"] += 1
        current["end"] = start = row.end
        if row.device_id is not None and row.error is None:
            digest = hashlib.blake2b(row.device_id.encode("utf-8", "replace"), digest_size=8).digest()
            if digest in seen:
                current["duplicates"][str(row.index)] = seen[digest]
            else:
                seen[digest] = row.index
        if not row.csr:
            scan.generated_keys += 1
        elif row.error is None and (digest := key_digest(row.csr)) is not None:
            if digest in keys:  # two devices, one key: whoever holds the key is both
                current["sameKey"][str(row.index)] = keys[digest]
            else:
                keys[digest] = row.index
        if current["rows"] >= settings.chunk_rows:
            scan.chunks.append(current)
            current = None
    if current is not None:
        scan.chunks.append(current)
    if not scan.rows:
        raise InvalidMessage("file", "has a header but no device rows")
    return header, scan


def intake_batch(path: str, *, files: InputFiles, outputs: OutputFiles, store: DocumentStore, queue: MessageQueue,
                 secrets_store: Secrets, audit: AuditLog, settings: BatchSettings, now: dt.datetime,
                 owner: str | None = None) -> str:
    """Validate and fan out one uploaded batch; returns what happened, raises Rejected/TransientError."""
    ref = BatchRef.from_path(path, settings)
    owner = owner or secrets.token_hex(8)
    try:
        size, upload, metadata = files.properties(path)
    except NotFound:
        return f"batch {ref.customer_id}/{ref.batch_name}: the blob is gone; nothing to do"
    for _ in range(5):
        doc = store.get(ref.document)
        if doc is not None:
            data = doc.data
            if data["upload"] != upload:  # (metadata or tags changed since are the same upload)
                raise Rejected(f"batch name {ref.batch_name!r} was used already (for another upload on "
                               f"{data['createdAt']}); upload this one under a new name", field="batchName")
            if data["status"] in ("issuing", "assembling", "complete", "rejected"):
                if not data.get("chunksEnqueued", True):
                    # A run died between recording the chunks and sending them all: send them again (a chunk
                    # that ran already answers "done"); never rescan, which would reset the counts.
                    _send_chunks(ref, data["chunks"], queue)
                    _mark_enqueued(ref, store)
                    return f"batch {ref.customer_id}/{ref.batch_name}: chunk messages sent again"
                audit.append({"at": stamp(now), "action": "batch.intake", "effect": "no-op",
                              "customer": ref.customer_id, "batch": ref.batch_name,
                              "reason": f"already {data['status']}"})
                return f"batch {ref.customer_id}/{ref.batch_name}: already {data['status']} (no-op)"
            lease = data.get("lease") or {}
            if held_by_other(lease, owner, now):
                raise TransientError(f"batch {ref.batch_name}: intake in progress elsewhere; retry later")
        record = {"customerId": ref.customer_id, "batchName": ref.batch_name, "input": path, "upload": upload,
                  "size": size, "status": "validating", "createdAt": doc.data["createdAt"] if doc else stamp(now),
                  "updatedAt": stamp(now), "lease": lease_for(owner, now + LEASE)}
        try:
            doc = store.create(ref.document, record, tags=_tags(record)) if doc is None else \
                store.replace(doc, {**doc.data, **record}, tags=_tags(record))
        except (AlreadyExists, Conflict):
            continue
        break
    else:
        raise TransientError(f"batch {ref.batch_name}: its record kept changing; retry")
    try:
        result = _validate_and_fan_out(ref, doc, size, upload, metadata, files=files, store=store, queue=queue,
                                       secrets_store=secrets_store, settings=settings, now=now)
    except InvalidMessage as exc:
        return _reject(ref, doc, exc.reason, exc.field, outputs=outputs, store=store, audit=audit, settings=settings,
                       now=now)
    except BaseException:
        release(store, ref.document, owner, _tags)  # the host's retry must not find this run's lease in its way
        raise
    audit.append({"at": stamp(now), "action": "batch.intake", "effect": "changed", "customer": ref.customer_id,
                  "batch": ref.batch_name, "before": None, "after": "issuing", "rows": result["rows"],
                  "chunks": len(result["chunks"]), "requestId": result["options"]["requestId"]})
    return f"batch {ref.customer_id}/{ref.batch_name}: {result['rows']} rows in {len(result['chunks'])} chunks"


def _reject(ref: BatchRef, doc, reason: str, field_name: str | None, *, outputs: OutputFiles, store: DocumentStore,
            audit: AuditLog, settings: BatchSettings, now: dt.datetime) -> str:
    write_rejection_report(ref, reason, field_name, outputs, settings, now)
    data = {**doc.data, "status": "rejected", "reason": reason, "field": field_name, "lease": None,
            "updatedAt": stamp(now), "chunksEnqueued": True}
    store.replace(doc, data, tags=_tags(data))
    audit.append({"at": stamp(now), "action": "batch.intake", "effect": "rejected", "customer": ref.customer_id,
                  "batch": ref.batch_name, "reason": reason, "field": field_name})
    return f"batch {ref.customer_id}/{ref.batch_name}: rejected: {field_name + ': ' if field_name else ''}{reason}"


def _validate_and_fan_out(ref: BatchRef, doc, size: int, upload: str, metadata: dict[str, str], *, files: InputFiles,
                          store: DocumentStore, queue: MessageQueue, secrets_store: Secrets, settings: BatchSettings,
                          now: dt.datetime) -> dict:
    found = store.get(customer_document(ref.customer_id))
    if found is None:
        raise InvalidMessage("customerId", f"no customer {ref.customer_id!r}: onboard it first")
    customer = CustomerRecord.from_json(found.data)
    if customer.status is not CustomerStatus.ACTIVE:
        raise InvalidMessage("customerId", f"customer {ref.customer_id!r} is {customer.status.value}, "
                             "not active: its devices cannot be issued")
    options = BatchOptions.from_metadata(metadata, settings)
    if size > settings.max_bytes:
        raise InvalidMessage("file", f"is {size} bytes, more than {settings.max_bytes} (BATCH_MAX_BYTES); split it")
    kind = batch_format.batch_format(ref.batch_name)
    header, scan = _scan(files, ref.input_path(settings), upload, kind, settings)
    secret = doc.data.get("pfxSecret")
    if scan.generated_keys and secret is None:
        # 192 random bits: the PFX / key password of this batch, only ever in Key Vault.
        version = secrets_store.set_secret(ref.secret_name, secrets.token_urlsafe(24))
        secret = {"name": ref.secret_name, "version": version}
    data = {**doc.data, "status": "issuing", "format": kind, "columns": list(header.columns),
            "options": options.as_dict(), "rows": scan.rows, "chunks": scan.chunks, "completedChunks": [],
            "counts": {"issued": 0, "already_issued": 0, "failed": 0}, "pfxSecret": secret,
            "intermediateSerial": customer.intermediate["serial"], "updatedAt": stamp(now),
            "chunksEnqueued": False}
    store.replace(doc, data, tags=_tags(data))
    _send_chunks(ref, scan.chunks, queue)
    _mark_enqueued(ref, store)
    return data


def _send_chunks(ref: BatchRef, chunks: list[dict], queue: MessageQueue) -> None:
    for chunk in chunks:
        queue.send(CHUNK_QUEUE, {"customerId": ref.customer_id, "batchName": ref.batch_name, "chunk": chunk["n"]})


def _mark_enqueued(ref: BatchRef, store: DocumentStore) -> None:
    """Set only ``chunksEnqueued`` (and drop the lease) on fresh data: chunks may be completing meanwhile."""
    update(store, ref.document, lambda data: {**data, "chunksEnqueued": True, "lease": None}, tags=_tags)

