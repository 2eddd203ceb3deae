"""A chunk's lease: one run issues a chunk at a time (``claim_chunk``), and keeps it while it runs (``Heartbeat``);
a crashed worker's chunk is free ``chunk_lease_s`` after its last beat."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

from .errors import AlreadyExists, Conflict, TransientError
from .leases import expired, lease_for, stamp, update
from .ports import DocumentStore
from .records import BatchRef


class Heartbeat:
    """Renews a chunk's lease while it is being issued, so a long chunk keeps it and a crashed worker's
    chunk is free ``chunk_lease_s`` after its last beat."""

    def __init__(self, store: DocumentStore, name: str, owner: str, lease_s: float, now: dt.datetime):
        self.store, self.name, self.owner, self.lease_s = store, name, owner, lease_s
        self.started, self.base = time.monotonic(), now
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="chunk-heartbeat")

    def until(self) -> str:
        elapsed = dt.timedelta(seconds=time.monotonic() - self.started + self.lease_s)
        return stamp(self.base + elapsed)

    def _run(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                update(self.store, self.name, self._beat, attempts=1)
            except Exception:  # noqa: BLE001, S110 - a missed beat only shortens the lease
                pass

    def _beat(self, data: dict | None) -> dict | None:
        if data is None or (data.get("lease") or {}).get("owner") != self.owner:
            return None  # the chunk is done, or another run took it over: nothing of ours to renew
        return {**data, "lease": {"owner": self.owner, "until": self.until()}}

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def claim_chunk(ref: BatchRef, n: int, owner: str, store: DocumentStore, now: dt.datetime, lease_s: float,
                 sleep) -> Any:
    waited = 0.0
    while True:
        doc = store.get(ref.chunk_document(n))
        lease = lease_for(owner, now + dt.timedelta(seconds=lease_s + waited))
        try:
            if doc is None:
                return store.create(ref.chunk_document(n), {"status": "issuing", "lease": lease, "attempts": 1})
            if doc.data["status"] == "done":
                return doc
            held = doc.data.get("lease") or {}
            if held.get("owner") == owner or expired(held, now + dt.timedelta(seconds=waited)):
                return store.replace(doc, {**doc.data, "lease": lease, "attempts": doc.data.get("attempts", 1) + 1})
        except (AlreadyExists, Conflict):
            continue
        if waited >= 20:
            raise TransientError(f"chunk {n} of {ref.batch_name} is being issued elsewhere; retry later")
        sleep(0.5)
        waited += 0.5
