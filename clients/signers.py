"""How many processes sign against one Key Vault now, counted through blob storage: the shared sign budget.

Key Vault's limits are per vault ("transactions allowed in 10 seconds, per vault per region",
learn.microsoft.com/azure/key-vault/general/service-limits), and on Flex Consumption the app runs on as many
instances as the load asks for, each with its own Python worker processes, none knowing how many others
there are. Each process that signs keeps one empty blob, ``signers/{vault host}/{process id}`` in the state
container, and rewrites it every ``interval_s`` while it signs; a blob written within ``stale_s`` of the newest
is a signer. ``clients.retry.AdaptiveBucket`` divides the budget (``KEY_VAULT_SIGN_RATE_PER_S``) by that count.

- Times are the service's own ``Last-Modified`` values compared with each other, so instances' clocks do not
  matter.
- A process that stops signing deletes its blob after an idle interval; one that died drops out of the
  count within ``stale_s``, and blobs stale for ``forget_s`` are deleted by whoever sees them.
- A storage error keeps the last count (logged): signing never waits on this (a thread of its own counts), and
  the bucket's answer to 429s still bounds the rate.
- Cost: one write and one listing per ``interval_s`` per signing process, none per sign.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy

log = logging.getLogger(__name__)

PREFIX = "signers/"


class SigningPeers:
    """``peers()`` -> how many processes sign against ``vault_url`` now (this one included), without I/O.

    ``begin()`` / ``end()`` bracket each sign, retries and their waits included (``SignInProgress``). While one
    is in progress a daemon thread rewrites this process's blob and recounts every ``interval_s``; after an
    idle interval it deletes the blob (the others' next count drops it) and stops, and the next ``begin()``
    starts it again. ``container``: a ``ContainerClient`` of the state container.
    """

    def __init__(self, container, vault_url: str, *, process: str | None = None, interval_s: float = 1.0,
                 stale_s: float = 3.0, forget_s: float = 300.0):
        self._container = container
        self._prefix = f"{PREFIX}{urlsplit(vault_url).netloc or vault_url}/"
        self.name = self._prefix + (process or uuid.uuid4().hex)
        self._interval_s, self._stale_s, self._forget_s = interval_s, stale_s, forget_s
        self._count = 1
        self._counts = 0  # since the thread started
        self._active = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self) -> int | None:
        """The count, or None until this process has counted twice since it began signing: its first listing
        may miss processes that started at the same moment."""
        return self._count if self._counts >= 2 else None

    def begin(self) -> None:
        with self._lock:
            self._active += 1
            if self._thread is None:
                self._counts = 0
                self._thread = threading.Thread(target=self._run, name="signing-peers", daemon=True)
                self._thread.start()

    def end(self) -> None:
        with self._lock:
            self._active -= 1

    def _run(self) -> None:
        idle = 0
        while True:
            with self._lock:
                idle = 0 if self._active else idle + 1
                if idle > 1:
                    self._thread = None  # under the lock: a begin() from now on starts a new thread
                    self._leave()
                    return
            if not idle:
                self.refresh()
            time.sleep(self._interval_s)

    def refresh(self) -> int:
        """Write this process's blob, and count the signers. A storage error keeps the last count (logged)."""
        try:
            self._count = self._counted()
            self._counts += 1
        except AzureError as exc:
            log.warning("could not count the processes signing against this vault; keeping %d: %s",
                        self._count, exc)
        return self._count

    def _leave(self) -> None:
        try:
            self._container.delete_blob(self.name)
        except AzureError:
            pass  # not there, or storage is down: it goes stale in stale_s either way

    def _counted(self) -> int:
        self._container.upload_blob(self.name, b"", overwrite=True)
        seen = [(blob.name, blob.last_modified) for blob in self._container.list_blobs(name_starts_with=self._prefix)]
        newest = max((modified for _, modified in seen), default=None)
        if newest is None:  # a listing that does not show our own write yet
            return 1
        signers = 0
        for name, modified in seen:
            age = (newest - modified).total_seconds()
            if age <= self._stale_s:
                signers += 1
            elif age > self._forget_s and name != self.name:
                try:
                    self._container.delete_blob(name)
                except ResourceNotFoundError:
                    pass  # another process forgot it first
        return max(1, signers)


class SignInProgress(SansIOHTTPPolicy):
    """A per-call policy (outside the retries): a sign is in progress from its first attempt to its final answer,
    backoff waits included, so a process whose signs all wait out 429s still counts as a signer."""

    def __init__(self, peers: SigningPeers):
        self._peers = peers

    def on_request(self, request: PipelineRequest) -> None:
        self._peers.begin()

    def on_response(self, request: PipelineRequest, response) -> None:
        self._peers.end()

    def on_exception(self, request: PipelineRequest) -> None:
        self._peers.end()
