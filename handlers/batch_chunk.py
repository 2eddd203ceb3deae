"""Use case: one chunk of a device batch -> one certificate per device, then (for the last chunk) the batch report.

Per device, the record ``devices/{deviceId}.json`` (one per id, across customers) is created with If-None-Match
*after* the outputs are written under this batch's own prefix (a resumed chunk reads it first): recorded by this
batch is ``already_issued``, by another batch "already provisioned" (unless re-issue is asked), by another customer
"already provisioned for another customer" (always). A crash between outputs and record re-issues and overwrites
the outputs, so the recorded certificate is the one on file. The chunk's lease (``chunk_leases``, one owner per
run) keeps two deliveries from issuing it at once; completion (and the run's storage requests) counted once.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography import x509

from pki import export, profiles
from pki.csr import accept_csr
from pki.errors import InvalidInput
from pki.ids import registration_id_problem
from pki.keys import KeyType, generate_key

from . import batch_format
from .chunk_leases import Heartbeat, claim_chunk
from .enrollments import intermediate_signer
from .errors import AlreadyExists, Conflict, InvalidMessage, TransientError
from .leases import release, stamp, update
from .ports import (
    AuditLog,
    DocumentStore,
    InputFiles,
    KeyStore,
    OutputFiles,
    Registrar,
    Secrets,
)
from .records import (
    BatchRef,
    BatchSettings,
    ChunkMessage,
    CustomerRecord,
    CustomerStatus,
    DeviceRecord,
    DeviceStatus,
    IssuedBy,
    KeySource,
    customer_document,
    device_document,
)
from .reports import assemble_report, published_fields
from .root import load_root
from .tally import Tally


class _Issuer:
    """Everything one chunk needs to issue, shared by its worker threads."""

    def __init__(self, ref: BatchRef, batch: dict, customer: CustomerRecord, *, store: DocumentStore, keys: KeyStore,
                 outputs: OutputFiles, password: bytes | None, settings: BatchSettings, registrar: Registrar | None,
                 now: dt.datetime, first_attempt: bool):
        self.first_attempt = first_attempt
        self.ref, self.batch, self.customer, self.store, self.outputs = ref, batch, customer, store, outputs
        self.password, self.settings, self.registrar, self.now = password, settings, registrar, now
        options = batch["options"]
        self.key_type = KeyType(options["keyType"])
        self.validity_days = options["validityDays"]
        self.output = options["output"]
        self.reissue = options["reissue"]
        self.register = options["register"]
        self.intermediate = x509.load_pem_x509_certificate(customer.intermediate["certificatePem"].encode())
        # Devices ship their chain up to and including the root: DPS's docs have a device present it "up to and
        # including" the verified certificate, and a chain with the root passes under any reading of that.
        issuer_pem = customer.intermediate.get("issuerCertificatePem")
        root = x509.load_pem_x509_certificate(issuer_pem.encode()) if issuer_pem else load_root(store, keys).certificate
        self.cas = [self.intermediate, root]
        self.signer = intermediate_signer(customer, keys)

    def row(self, row: batch_format.Row, duplicate_of: int | None, same_key_as: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {"row": row.index, "deviceId": row.device_id}
        if row.error:
            return {**result, "status": "failed", "error": f"row {row.index}: {row.error}"}
        if duplicate_of is not None:
            return {**result, "status": "failed", "error": f"row {row.index}: duplicate of row {duplicate_of}"}
        if same_key_as is not None:
            return {**result, "status": "failed", "error": f"row {row.index}: csr: its public key is the one row "
                    f"{same_key_as} requests a certificate for; every device needs its own key"}
        problem = registration_id_problem(row.device_id)
        if problem:
            return {**result, "status": "failed", "error": f"row {row.index}: deviceId {row.device_id!r} {problem}"}
        name = device_document(row.device_id)
        # On a chunk's first attempt no device of it can be recorded for this batch yet (duplicates are caught at
        # intake), so the read is skipped and the conditional create decides; a resumed chunk reads first.
        existing = None if self.first_attempt else self.store.get(name)
        if existing is not None:
            verdict = self._recorded(row, DeviceRecord.from_json(existing.data), result)
            if verdict is not None:
                return verdict
        try:
            issued, private_key, outputs = self._issue(row)
        except InvalidInput as exc:
            return {**result, "status": "failed", "error": f"row {row.index}: {exc}"}
        record = self._record(row, issued, private_key, outputs)
        for _ in range(2):
            try:
                if existing is None:
                    self.store.create(name, record.to_json(), tags=record.tags)
                else:
                    self.store.replace(existing, record.replacing(existing.data).to_json(), tags=record.tags)
                break
            except (AlreadyExists, Conflict):
                existing = self.store.get(name)
                recorded = DeviceRecord.from_json(existing.data) if existing is not None else None
                verdict = self._recorded(row, recorded, result) if recorded is not None else None
                if verdict is not None or recorded is None:
                    if recorded is not None and not self._ours(recorded):
                        for path in record.outputs.values():
                            self.outputs.delete(path)  # ours, under this batch's prefix, and never recorded
                    return verdict or {**result, "status": "failed", "error": f"row {row.index}: changed meanwhile"}
        else:
            return {**result, "status": "failed", "error": f"row {row.index}: its record kept changing"}
        published = {**result, **published_fields(record), "status": "issued"}
        if issued.notice:
            published["notice"] = issued.notice
        if private_key is not None and self._should_register(row.index):
            published["assignedHub"] = self._register(row.device_id, issued.certificate, private_key)
        return published

    def _recorded(self, row: batch_format.Row, recorded: DeviceRecord, result: dict) -> dict[str, Any] | None:
        """The row's verdict when the device is already recorded; ``None`` when it may be (re-)issued."""
        if recorded.customer_id != self.ref.customer_id:  # names no customer: that is the other's business
            return {**result, "status": "failed", "error": f"row {row.index}: deviceId {row.device_id!r} is already "
                    "provisioned for another customer; device ids are shared by every customer of the DPS instances "
                    "and hubs, so choose another id"}
        if self._ours(recorded):
            return {**result, **published_fields(recorded), "status": "already_issued"}
        if not self.reissue:
            return {**result, "status": "failed",
                    "error": f"row {row.index}: already provisioned by batch {recorded.batch!r} "
                             f"(serial {recorded.serial}); set metadata reissue=true to re-issue"}
        return None

    def _ours(self, recorded: DeviceRecord) -> bool:
        """Recorded by this very batch (an earlier attempt of it)."""
        return recorded.batch == self.ref.batch_name and recorded.customer_id == self.ref.customer_id

    def _issue(self, row: batch_format.Row):
        """Issue the row's certificate and write its one output blob: the PFX (key, certificate, full chain), or one
        PEM (the encrypted key, if generated, then the full chain). Returns the certificate, key and outputs."""
        if row.csr:
            public_key, private_key = accept_csr(row.csr, row.device_id, field="csr"), None
        else:
            private_key = generate_key(self.key_type)
            public_key = private_key.public_key()
        issued = profiles.issue_device(issuer=self.intermediate, issuer_key=self.signer, public_key=public_key,
                                       device_id=row.device_id, now=self.now, validity_days=self.validity_days)
        certificate = issued.certificate
        if private_key is not None and self.output == "pfx":
            path = self.ref.output_path(self.settings, row.device_id, "pfx")
            self.outputs.put(path, export.pfx(private_key, certificate, self.cas, self.password,
                                              friendly_name=row.device_id), "application/x-pkcs12")
            return issued, private_key, {"pfx": path}
        path = self.ref.output_path(self.settings, row.device_id, "pem")
        key = export.key_pem(private_key, self.password) if private_key is not None else b""
        self.outputs.put(path, key + export.chain_pem([certificate, *self.cas]), "application/x-pem-file")
        return issued, private_key, {"pem": path}

    def _record(self, row: batch_format.Row, issued: profiles.Issued, private_key, outputs: dict) -> DeviceRecord:
        summary = export.summary(issued.certificate)
        return DeviceRecord(
            customer_id=self.ref.customer_id, device_id=row.device_id, status=DeviceStatus.ISSUED,
            serial=summary.pop("serial"), not_after=summary.pop("notAfter"), issued_at=stamp(self.now),
            issued_by=IssuedBy.BATCH, key_source=KeySource.GENERATED if private_key is not None else KeySource.CSR,
            outputs=outputs, certificate_pem=export.cert_pem(issued.certificate).decode(),
            intermediate_serial=self.customer.intermediate["serial"], batch=self.ref.batch_name, row=row.index,
            pfx_secret=self.batch.get("pfxSecret") if private_key is not None else None, certificate=summary)

    def _should_register(self, index: int) -> bool:
        if self.registrar is None or not self.register:
            return False
        return self.register == "all" or index <= int(self.register)

    def _register(self, device_id: str, certificate: x509.Certificate, private_key) -> str:
        try:
            return self.registrar.register(self.customer.dps["idScope"], device_id,
                                           export.chain_pem([certificate, *self.cas]), export.key_pem(private_key))
        except Exception as exc:  # noqa: BLE001 - a failed test registration is reported, the certificate stands
            return f"registration failed: {exc}"


def process_chunk(message: ChunkMessage, *, files: InputFiles, outputs: OutputFiles, store: DocumentStore,
                  keys: KeyStore, secrets_store: Secrets, audit: AuditLog, settings: BatchSettings, now: dt.datetime,
                  registrar: Registrar | None = None, sleep: Callable[[float], None] = time.sleep) -> str:
    ref = BatchRef(message.customer_id, message.batch_name)
    owner = secrets.token_hex(8)  # one per run, never per message: two deliveries must not both hold the chunk
    tally = Tally()  # this run's storage requests
    store, files, outputs = tally.wrap(store), tally.wrap(files), tally.wrap(outputs)
    batch_doc = store.get(ref.document)
    if batch_doc is None:  # the intake records a batch before it sends any chunk: this message is not from it
        raise InvalidMessage("batchName", f"customer {ref.customer_id} has no batch {ref.batch_name!r}")
    if batch_doc.data["status"] not in ("issuing", "assembling", "complete"):
        raise TransientError(f"batch {ref.batch_name}: not ready for chunks yet")  # intake still writing
    batch = batch_doc.data
    if message.chunk >= len(batch["chunks"]):
        raise InvalidMessage("chunk", f"batch {ref.batch_name} has {len(batch['chunks'])} chunks")
    chunk_doc = claim_chunk(ref, message.chunk, owner, store, now, settings.chunk_lease_s, sleep)
    if chunk_doc.data["status"] != "done":
        try:
            chunk_doc = _issue_chunk(ref, message.chunk, batch, chunk_doc, owner, files=files, outputs=outputs,
                                     store=store, keys=keys, secrets_store=secrets_store, audit=audit,
                                     settings=settings, registrar=registrar, now=now)
        except BaseException:
            release(store, ref.chunk_document(message.chunk), owner)  # the retry must not wait out this run's lease
            raise
    return _complete(ref, message.chunk, chunk_doc.data["results"], store=store, outputs=outputs, settings=settings,
                     now=now, tally=tally, audit=audit)


def _issue_chunk(ref: BatchRef, n: int, batch: dict, chunk_doc, owner: str, *, files: InputFiles,
                 outputs: OutputFiles, store: DocumentStore, keys: KeyStore, secrets_store: Secrets, audit: AuditLog,
                 settings: BatchSettings, registrar: Registrar | None, now: dt.datetime):
    chunk = batch["chunks"][n]
    found = store.get(customer_document(ref.customer_id))
    customer = CustomerRecord.from_json(found.data) if found is not None else None
    try:
        data = files.read_range(batch["input"], chunk["start"], chunk["end"], upload=batch["upload"])
    except Conflict:
        data = None
    header = batch_format.Header(tuple(batch["columns"]), chunk["start"])
    if data is None or customer is None or customer.status is not CustomerStatus.ACTIVE:
        # Permanent for this batch: every row of the chunk fails with the reason, so the batch still completes.
        reason = ("the batch file was overwritten after it was accepted" if data is None else
                  f"customer {ref.customer_id} is {customer.status.value if customer else 'gone'}, not active")
        results = [{"row": i, "deviceId": None, "status": "failed", "error": f"row {i}: {reason}"}
                   for i in range(chunk["firstRow"], chunk["firstRow"] + chunk["rows"])]
    else:
        secret = batch.get("pfxSecret")
        password = secrets_store.get_secret(secret["name"], secret["version"]).encode() if secret else None
        issuer = _Issuer(ref, batch, customer, store=store, keys=keys, outputs=outputs, password=password,
                         settings=settings, registrar=registrar, now=now,
                         first_attempt=chunk_doc.data.get("attempts", 1) == 1)
        rows = list(batch_format.rows_in_range(data, chunk["start"], header, batch["format"], chunk["firstRow"]))
        with Heartbeat(store, ref.chunk_document(n), owner, settings.chunk_lease_s, now), \
                ThreadPoolExecutor(max_workers=settings.inflight, thread_name_prefix="issue") as pool:
            results = list(pool.map(lambda r: issuer.row(r, chunk["duplicates"].get(str(r.index)),
                                                         chunk.get("sameKey", {}).get(str(r.index))), rows))
    current = store.get(ref.chunk_document(n))
    if (current.data.get("lease") or {}).get("owner") != owner:
        raise TransientError(f"chunk {n} of {ref.batch_name}: lost its lease while issuing; retry")
    done = store.replace(current, {**current.data, "status": "done", "results": results, "lease": None,
                                   "doneAt": stamp(now)})
    # Every certificate this batch recorded for the chunk's devices, including those an earlier, crashed attempt
    # recorded (reported "already_issued" now): none goes unaudited.
    issued = [{"device": r["deviceId"], "serial": r["serial"], "keySource": r.get("keySource")}
              for r in results if r["status"] == "issued"]
    earlier = [{"device": r["deviceId"], "serial": r["serial"]} for r in results if r["status"] == "already_issued"]
    audit.append({"at": stamp(now), "action": "batch.issue", "effect": "changed" if issued else "no-op",
                  "customer": ref.customer_id, "batch": ref.batch_name, "chunk": n, "issued": issued,
                  "alreadyIssued": earlier, "requestId": batch["options"].get("requestId")})
    return done


def _complete(ref: BatchRef, n: int, results: list[dict], *, store: DocumentStore, outputs: OutputFiles,
              settings: BatchSettings, now: dt.datetime, tally: Tally, audit: AuditLog) -> str:
    """Count chunk ``n`` once; whoever completes the last chunk assembles the report."""

    def count(data: dict) -> dict | None:
        if n in data["completedChunks"]:
            return None  # counted by an earlier delivery of this chunk
        counts = dict(data["counts"])
        for result in results:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        spent = tally.as_dict(extra_writes=1)  # this very update included
        storage = {k: (data.get("storage") or {}).get(k, 0) + v for k, v in spent.items()}
        data = {**data, "completedChunks": sorted([*data["completedChunks"], n]), "counts": counts,
                "storage": storage, "updatedAt": stamp(now)}
        if len(data["completedChunks"]) == len(data["chunks"]):
            data["status"] = "assembling"
        return data

    # every chunk of a batch may finish at the same moment: more attempts than the policy's default
    doc = update(store, ref.document, count, attempts=50,
                 tags=lambda data: {"kind": "batch", "customer": ref.customer_id, "status": data["status"]})
    data = doc.data
    if data["status"] != "assembling":
        return (f"batch {ref.customer_id}/{ref.batch_name}: chunk {n} done ({len(data['completedChunks'])}/"
                f"{len(data['chunks'])})")
    assemble_report(ref, data, store=store, outputs=outputs, settings=settings, now=now)
    final = {**data, "status": "complete", "completedAt": stamp(now),
             "report": {"json": ref.report_path(settings, "json"), "csv": ref.report_path(settings, "csv")}}
    try:
        store.replace(doc, final, tags={"kind": "batch", "customer": ref.customer_id, "status": "complete"})
    except Conflict:
        # a concurrent assembler of the same (deterministic) report finished first, and audited it
        return f"batch {ref.customer_id}/{ref.batch_name}: complete ({data['counts']})"
    # from the upload's intake to this report (the record's times, stamped by the use cases' clocks)
    seconds = (now - dt.datetime.fromisoformat(data["createdAt"])).total_seconds() if data.get("createdAt") else None
    audit.append({"at": stamp(now), "action": "batch.complete", "effect": "changed", "customer": ref.customer_id,
                  "batch": ref.batch_name, "rows": data.get("rows"), "counts": data["counts"], "seconds": seconds,
                  "requestId": (data.get("options") or {}).get("requestId")})
    return f"batch {ref.customer_id}/{ref.batch_name}: complete ({data['counts']})"


