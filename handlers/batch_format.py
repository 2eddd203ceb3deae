"""Device batch files: CSV (header ``deviceId[,csr]``) or JSONL (``{"deviceId", "csr"?}`` per line).

Parsed as a stream of rows with the byte offset where each row ends, so a batch of any size is
read once without being held in memory and split into chunks that each re-read only their byte
range. Tolerates a UTF-8 BOM and CRLF line ends; CSR PEMs in CSV are quoted multi-line cells.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import InvalidMessage
from .messages import JsonProblem, load_json

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
COLUMNS = ("deviceId", "csr")
MAX_ROW_BYTES = 16 * 1024  # a PEM CSR of an RSA-4096 key is about 2 KiB; anything far larger is not a row
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Row:
    index: int  # 1-based data row (the header is not a row)
    device_id: str | None
    csr: str | None
    error: str | None = None
    end: int = 0  # byte offset just after this row


def batch_format(name: str) -> str:
    for suffix, kind in FORMATS.items():
        if name.lower().endswith(suffix):
            return kind
    raise InvalidMessage("batchName", f"{name!r} must end in .csv or .jsonl")


def _lines(chunks: Iterable[bytes], start: int) -> Iterator[tuple[bytes, int]]:
    """Lines with their end offset (newline kept). Linear: each piece is scanned once from a moving index."""
    offset, pending = start, b""
    for chunk in chunks:
        buffer, position = pending + chunk, 0
        while (cut := buffer.find(b"\n", position)) >= 0:
            line = buffer[position:cut + 1]
            position = cut + 1
            offset += len(line)
            yield line, offset
        pending = buffer[position:]
    if pending:
        offset += len(pending)
        yield pending, offset


def _text(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("file", f"{where} is not UTF-8 text") from None


@dataclass(frozen=True)
class Header:
    columns: tuple[str, ...]
    data_start: int  # byte offset of the first data row
    first_line: int = 2  # the file's line number where data starts (named by quoting errors, found at intake)


def read_header(chunks: Iterable[bytes], kind: str) -> tuple[Header, Iterator[tuple[bytes, int]]]:
    """The header (CSV) and the remaining lines; ``InvalidMessage`` for a file that is no batch at all."""
    lines = _lines(chunks, 0)
    first = next(lines, None)
    while kind == "jsonl" and first is not None and not first[0].strip(_BOM + b" \t\r\n"):
        first = next(lines, None)  # blank lines before the first object
    if first is None or not first[0].strip(_BOM + b" \t\r\n"):
        raise InvalidMessage("file", "is empty: expected a header row 'deviceId[,csr]'" if kind == "csv"
                             else "is empty: expected one JSON object per line")
    line, end = first
    if kind == "jsonl":
        def again() -> Iterator[tuple[bytes, int]]:
            yield line.removeprefix(_BOM), end
            yield from lines
        return Header(columns=COLUMNS, data_start=len(_BOM) if line.startswith(_BOM) else 0), again()
    if len(line) > MAX_ROW_BYTES:
        raise InvalidMessage("header", f"line 1 is {len(line)} bytes long; a header is at most {MAX_ROW_BYTES} "
                             "(expected 'deviceId[,csr]')")
    text = _text(line.removeprefix(_BOM), "the header")
    try:
        columns = tuple(c.strip() for c in next(csv.reader([text], strict=True)))
    except csv.Error as exc:
        raise InvalidMessage("header", f"line 1 is not valid CSV ({exc}); expected 'deviceId[,csr]'") from None
    if "deviceId" not in columns:
        found = ", ".join(repr(c) for c in columns)
        raise InvalidMessage("header", f"must name a deviceId column (and optionally csr); found {found}"
                             + (" - a header row is required" if columns and columns[0] and
                                not columns[0].replace("-", "").isalpha() else ""))
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or len(set(columns)) != len(columns):
        raise InvalidMessage("header", f"columns must be deviceId and optionally csr, each once; found "
                             f"{', '.join(repr(c) for c in columns)}")
    return Header(columns=columns, data_start=end), lines


def parse_rows(lines: Iterator[tuple[bytes, int]], header: Header, kind: str, first_index: int = 1) -> Iterator[Row]:
    """Rows in order; a row that cannot be read carries ``error`` (the batch goes on)."""
    index = first_index
    if kind == "jsonl":
        for line, end in lines:
            if not line.strip():
                continue
            if len(line) > MAX_ROW_BYTES:
                yield Row(index, None, None, f"line is longer than {MAX_ROW_BYTES} bytes", end)
            else:
                yield _json_row(line, index, end)
            index += 1
        return
    record_lines: list[bytes] = []
    line_number = header.first_line  # the file's line number of the next line read
    opened = line_number
    for line, end in lines:
        if not record_lines:
            opened = line_number
        line_number += 1
        record_lines.append(line)
        text = b"".join(record_lines)
        if len(text) > MAX_ROW_BYTES:
            if len(record_lines) == 1:
                yield Row(index, None, None, f"is longer than {MAX_ROW_BYTES} bytes", end)
                record_lines, index = [], index + 1
                continue
            # Reading on would swallow the rows after it into one cell, and report a file that is not the one sent.
            raise InvalidMessage("file", f"line {opened}: a quoted cell opens there and is not closed within "
                                 f"{MAX_ROW_BYTES} bytes (an unclosed quote?); nothing of the batch was issued")
        if _open_quote(text):  # inside a quoted cell (a PEM CSR spans lines): read on
            continue
        record_lines = []
        if not text.strip():
            continue
        yield _csv_row(text, header, index, end)
        index += 1
    if record_lines:
        raise InvalidMessage("file", f"line {opened}: a quoted cell opens there and is never closed (the file ends "
                             "inside it); nothing of the batch was issued")


def _open_quote(text: bytes) -> bool:
    """Whether a CSV record is still inside a quoted cell, by CSV's own rules (a quote only opens a quoted
    cell at the start of a cell; elsewhere it is a plain character)."""
    try:
        next(csv.reader(io.StringIO(text.decode("utf-8", "replace"), newline=""), strict=True), None)
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _csv_row(raw: bytes, header: Header, index: int, end: int) -> Row:
    try:
        cells = next(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    except UnicodeDecodeError:
        return Row(index, None, None, "is not UTF-8 text", end)
    except csv.Error as exc:
        return Row(index, None, None, f"is not valid CSV ({exc})", end)
    if len(cells) != len(header.columns):
        return Row(index, None, None, f"has {len(cells)} cells, the header has {len(header.columns)}", end)
    values = dict(zip(header.columns, cells, strict=True))  # (the counts were compared above)
    csr = (values.get("csr") or "").strip() or None
    return Row(index, values["deviceId"].strip(), csr, None, end)


def _json_row(raw: bytes, index: int, end: int) -> Row:
    try:
        document = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Row(index, None, None, "is not UTF-8 text", end)
    except JsonProblem as exc:
        return Row(index, None, None, f"is not a JSON object this service accepts: it {exc}", end)
    if not isinstance(document, dict):
        return Row(index, None, None, "is not a JSON object", end)
    unknown = sorted(set(document) - set(COLUMNS))
    if unknown:
        return Row(index, _str(document.get("deviceId")), None,
                   f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: deviceId, csr", end)
    device_id, csr = document.get("deviceId"), document.get("csr")
    if not isinstance(device_id, str):
        return Row(index, None, None, "deviceId is missing or not a string", end)
    if csr is not None and not isinstance(csr, str):
        return Row(index, device_id, None, "csr must be a PEM string", end)
    return Row(index, device_id, csr or None, None, end)


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


def rows_in_range(data: bytes, start: int, header: Header, kind: str, first_index: int) -> Iterator[Row]:
    """Re-read one chunk's byte range (it starts and ends on row boundaries)."""
    return parse_rows(_lines([data], start), header, kind, first_index)
