"""``AuditLog`` as one immutable JSON blob per event, tagged for server-side queries.

One blob per event (created with If-None-Match, never rewritten) is append-only by construction,
has no 50,000-block ceiling like an append blob, and its index tags (customer, device, action, date)
let ``pkictl audit`` find a customer's or a device's history without reading the whole log.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from handlers.ports import DocumentStore


class StoreAuditLog:
    def __init__(self, store: DocumentStore):
        self._store = store

    def append(self, event: Mapping[str, Any]) -> None:
        at = str(event.get("at") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        day = at[:10]
        name = f"audit/{day.replace('-', '/')}/{at.replace(':', '')}-{secrets.token_hex(6)}.json"
        tags = {"kind": "audit", "date": day.replace("-", ""), "action": str(event.get("action", ""))}
        for key in ("customer", "device"):
            if event.get(key):
                tags[key] = str(event[key])
        # "at" is the use case's clock (fixed for a run); "recordedAt" orders events written in one second.
        recorded = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self._store.create(name, {**event, "at": at, "recordedAt": recorded}, tags=tags)

    def query(self, *, customer: str | None = None, device: str | None = None,
              since: dt.date | None = None) -> Iterator[dict]:
        """Events by index tags (server-side), oldest first. A device's history includes the batch chunks
        that issued it (one event per chunk lists its devices)."""
        terms = ["\"kind\" = 'audit'"]
        if customer:
            terms.append(f"\"customer\" = '{customer}'")
        if since:
            terms.append(f"\"date\" >= '{since.strftime('%Y%m%d')}'")
        names = set(self._store.find(" AND ".join(terms + ([f"\"device\" = '{device}'"] if device else []))))
        if device:
            names |= set(self._store.find(" AND ".join([*terms, "\"action\" = 'batch.issue'"])))
        events = []
        for name in names:
            doc = self._store.get(name)
            if doc is None:
                continue
            event = doc.data
            if device and event.get("device") != device and not any(
                    item.get("device") == device for item in event.get("issued", []) + event.get("alreadyIssued", [])):
                continue
            events.append(event)
        yield from sorted(events, key=lambda e: (e.get("recordedAt", ""), e.get("at", "")))
