"""Timestamps and leases on state records, shared by every use case that advances a record.

A lease is ``{"owner", "until"}`` in the record: the run that wrote it does the slow, side-effecting
steps; others wait or come back later. Times are UTC ISO strings, which compare correctly as text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from .ports import DocumentStore


def stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def release(store: DocumentStore, name: str, owner: str, tags: Callable[[dict], dict] | None = None) -> None:
    """Drop ``owner``'s lease on ``name`` after a failure, so the next delivery resumes at once. Never raises:
    the failure being handled is what the caller must see (a missed release only lets the lease run out)."""
    try:
        doc = store.get(name)
        if doc is not None and (doc.data.get("lease") or {}).get("owner") == owner:
            data = {**doc.data, "lease": None}
            store.replace(doc, data, **({"tags": tags(data)} if tags else {}))
    except Exception:  # noqa: BLE001, S110 - see above
        pass
