"""Nothing is lost: a message that cannot be accepted is recorded with its reason and payload, and a
message that keeps failing leaves its reasons behind before the host moves it to the poison queue."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from .errors import AlreadyExists, TransientError
from .leases import update
from .ports import DocumentStore

MAX_PAYLOAD_CHARS = 64 * 1024
MAX_FAILURES_KEPT = 10


def _payload(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text[:MAX_PAYLOAD_CHARS]


def _message_key(message_id: str | None, body: bytes | str) -> str:
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
    return message_id or hashlib.sha256(raw).hexdigest()[:32]


def record_rejection(store: DocumentStore, *, queue: str, message_id: str | None, body: bytes | str, reason: str,
                     field: str | None, now: dt.datetime, request_id: str | None = None) -> str:
    """``rejections/{queue}/{date}/{message}.json``; a redelivered message is recorded once."""
    name = f"rejections/{queue}/{now:%Y-%m-%d}/{_message_key(message_id, body)}.json"
    record: dict[str, Any] = {"queue": queue, "messageId": message_id, "requestId": request_id, "reason": reason,
                              "field": field, "payload": _payload(body), "at": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        store.create(name, record, tags={"kind": "rejection", "queue": queue, "date": f"{now:%Y%m%d}"})
    except AlreadyExists:
        pass
    return name


def record_failure(store: DocumentStore, *, queue: str, message_id: str | None, body: bytes | str, reason: str,
                   dequeue_count: int | None, now: dt.datetime) -> str:
    """``failures/{queue}/{message}.json``: each failed attempt's reason, so a poisoned message says why."""
    name = f"failures/{queue}/{_message_key(message_id, body)}.json"
    attempt = {"at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "dequeueCount": dequeue_count, "reason": reason[:2000]}

    def append(data: dict | None) -> dict:
        if data is None:
            return {"queue": queue, "messageId": message_id, "payload": _payload(body), "attempts": [attempt]}
        return {**data, "attempts": [*data.get("attempts", []), attempt][-MAX_FAILURES_KEPT:]}

    try:
        update(store, name, append, tags=lambda _: {"kind": "failure", "queue": queue}, attempts=3)
    except TransientError:
        pass  # the failure being handled is what the host must see; its reason is in the log too
    return name
