"""``AuditLog`` as one immutable JSON blob per event, tagged for server-side queries.

One blob per event (created with If-None-Match, never rewritten) is append-only by construction,
has no 50,000-block ceiling like an append blob, and its index tags (customer, device, action, date)
let ``pkictl audit`` find a customer's or a device's history without reading the whole log.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from typing import Any

from handlers.ports import DocumentStore


class StoreAuditLog:
    def __init__(self, store: DocumentStore):
        self._store = store

    def append(self, event: Mapping[str, Any]) -> None:
        at = str(event.get("at") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        day = at[:10]
        name = f"audit/{day.replace('-', '/')}/{at.replace(':', '')}-{secrets.token_hex(6)}.json"
        tags = {"kind": "audit", "date": day.replace("-", ""), "action": str(event.get("action", ""))}
        for key in ("customer", "device"):
            if event.get(key):
                tags[key] = str(event[key])
        # "at" is the use case's clock (fixed for a run); "recordedAt" orders events written in one second.
        recorded = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self._store.create(name, {**event, "at": at, "recordedAt": recorded}, tags=tags)
