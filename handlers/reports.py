"""The batch reports (``device-batches-results/{customerId}/{batchName}.json`` and ``.csv``): assembled from the
chunk records, or written for a rejected batch; CSV cells a spreadsheet cannot run, UTF-8 whatever the text holds."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from .leases import stamp
from .ports import DocumentStore, OutputFiles
from .records import BatchRef, BatchSettings, CustomerRecord, DeviceRecord, customer_document
from .root import ROOT_DOCUMENT


def csv_bytes(text: str) -> bytes:
    """UTF-8 of report text, whatever it holds: a reason quoting bad input still writes (as a backslash escape)."""
    return text.encode("utf-8", "backslashreplace")


def csv_cell(value: object) -> str:
    """One CSV cell; text that a spreadsheet would run as a formula is prefixed with ' (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    if any(c in text for c in ',"\r\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


REPORT_COLUMNS = ("row", "deviceId", "status", "serial", "thumbprintSha1", "thumbprintSha256", "notAfter",
                  "output", "issuerSerial", "assignedHub", "notice", "error")


def assemble_report(ref: BatchRef, batch: dict, *, store: DocumentStore, outputs: OutputFiles, settings: BatchSettings,
              now: dt.datetime) -> None:
    """JSON and CSV reports from the chunk records, one staged block per chunk (bounded memory)."""
    totals = {"rows": batch["rows"], **{k: batch["counts"].get(k, 0) for k in ("issued", "already_issued", "failed")}}

    def chunk_results(n: int) -> list[dict]:
        return store.get(ref.chunk_document(n)).data["results"]

    def json_parts() -> Iterator[bytes]:
        head = {"customerId": ref.customer_id, "batchName": ref.batch_name, "status": "complete",
                "completedAt": stamp(now), "totals": totals, "pfxPasswordSecret": batch.get("pfxSecret"),
                "options": batch["options"], "issuers": _issuers(store, ref.customer_id)}
        yield json.dumps(head)[:-1].encode() + b', "rows": ['
        separator = "\n"
        for n in range(len(batch["chunks"])):
            rows = ",\n".join(json.dumps(r) for r in chunk_results(n))
            if rows:
                yield (separator + rows).encode()
                separator = ",\n"
        yield b"\n]}\n"

    def csv_parts() -> Iterator[bytes]:
        yield csv_bytes(",".join(REPORT_COLUMNS) + "\r\n")
        for n in range(len(batch["chunks"])):
            yield csv_bytes("".join(",".join(csv_cell(r.get(c)) for c in REPORT_COLUMNS) + "\r\n"
                                    for r in chunk_results(n)))

    outputs.assemble(ref.report_path(settings, "json"), json_parts(), "application/json")
    outputs.assemble(ref.report_path(settings, "csv"), csv_parts(), "text/csv")


def _issuers(store: DocumentStore, customer_id: str) -> dict[str, list[str]]:
    """The chain above each row's certificate, by its issuer's serial (``issuerSerial``): the intermediate's PEM, then
    its issuer's (the root). Every intermediate the customer had, so rows issued across a renewal find theirs."""
    found = store.get(customer_document(customer_id))
    if found is None:
        return {}
    customer = CustomerRecord.from_json(found.data)
    root = store.get(ROOT_DOCUMENT)
    root_pem = root.data.get("certificatePem") if root else None
    return {i["serial"]: customer.chain_above(i["serial"], root_pem) for i in customer.intermediates}


def write_rejection_report(ref: BatchRef, reason: str, field_name: str | None, outputs: OutputFiles,
                           settings: BatchSettings, now: dt.datetime) -> None:
    report = {"customerId": ref.customer_id, "batchName": ref.batch_name, "status": "rejected",
              "reason": reason, "field": field_name, "at": stamp(now),
              "totals": {"rows": 0, "issued": 0, "already_issued": 0, "failed": 0}, "rows": []}
    outputs.put(ref.report_path(settings, "json"), json.dumps(report, indent=2).encode(), "application/json")
    outputs.put(ref.report_path(settings, "csv"), csv_bytes(f"status,reason\r\nrejected,{csv_cell(reason)}\r\n"),
                "text/csv")


def published_fields(record: DeviceRecord) -> dict[str, Any]:
    """What a batch report says of an issued device."""
    return {"serial": record.serial, "thumbprintSha1": record.certificate.get("thumbprintSha1"),
            "thumbprintSha256": record.certificate.get("thumbprintSha256"), "notAfter": record.not_after,
            "output": record.output, "issuerSerial": record.intermediate_serial,
            "keySource": record.key_source.value if record.key_source else None,
            "certificatePem": record.certificate_pem}
