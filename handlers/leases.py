"""Timestamps, leases and optimistic updates of state records: the one place for each, shared by every use case.

A lease is ``{"owner", "until"}`` in the record: the run that wrote it does the slow, side-effecting
steps; others wait or come back later. Times are UTC ISO strings, which compare correctly as text.

``update`` is the one read-change-replace loop: read the record, let ``change`` compute the new data, write it
only if nobody wrote in between (If-Match), and read again when someone did, up to ``ATTEMPTS`` times.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from .errors import AlreadyExists, Conflict, TransientError
from .ports import Document, DocumentStore

ATTEMPTS = 20  # the one retry policy for optimistic updates: enough for every concurrent writer a record has here


def stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lease_for(owner: str, until: dt.datetime) -> dict[str, str]:
    return {"owner": owner, "until": stamp(until)}


def expired(lease: Mapping[str, Any] | None, now: dt.datetime) -> bool:
    """No lease, or one whose time is up (a crashed holder's)."""
    return not lease or lease.get("until", "") <= stamp(now)


def held_by_other(lease: Mapping[str, Any] | None, owner: str, now: dt.datetime) -> bool:
    """A live lease of another run: wait for it, or let the host retry later."""
    return bool(lease) and lease.get("owner") not in (None, owner) and not expired(lease, now)


def update(store: DocumentStore, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None], *,
           tags: Callable[[dict[str, Any]], Mapping[str, str] | None] | None = None,
           attempts: int = ATTEMPTS) -> Document | None:
    """Apply ``change`` to the record ``name`` until it sticks; returns what was written, or the record as it is.

    ``change(data)`` gets the current data (``None`` when there is no record) and returns the new data, or
    ``None`` to leave the record as it is (then the current document is returned). A missing record is created
    (If-None-Match), an existing one replaced (If-Match); a lost race reads again. ``TransientError`` when the
    record kept changing ``attempts`` times: the caller's host retries."""
    for _ in range(attempts):
        doc = store.get(name)
        data = change(doc.data if doc is not None else None)
        if data is None:
            return doc
        labels = dict(tags(data) or {}) if tags else None
        try:
            if doc is None:
                return store.create(name, data, **({"tags": labels} if labels is not None else {}))
            return store.replace(doc, data, **({"tags": labels} if labels is not None else {}))
        except (AlreadyExists, Conflict):
            continue
    raise TransientError(f"{name}: kept changing while it was updated; retry")


def release(store: DocumentStore, name: str, owner: str, tags: Callable[[dict], dict] | None = None) -> None:
    """Drop ``owner``'s lease on ``name`` after a failure, so the next delivery resumes at once. Never raises:
    the failure being handled is what the caller must see (a missed release only lets the lease run out)."""

    def drop(data: dict | None) -> dict | None:
        if data is None or (data.get("lease") or {}).get("owner") != owner:
            return None
        return {**data, "lease": None}

    try:
        update(store, name, drop, tags=tags, attempts=1)
    except Exception:  # noqa: BLE001, S110 - see above
        pass
