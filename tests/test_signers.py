"""The shared Key Vault sign budget: how many processes sign against one vault, counted through blob storage
(clients/signers.py), and the bucket that divides the budget by that count (clients/retry.AdaptiveBucket)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from types import SimpleNamespace

import pytest
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError

from clients.retry import AdaptiveBucket
from clients.signers import SigningPeers

VAULT = "https://pki-ca.vault.azure.net"
T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


class Container:
    """The three ``ContainerClient`` calls ``SigningPeers`` makes, with Last-Modified from a settable clock."""

    def __init__(self) -> None:
        self.now = T0
        self.blobs: dict[str, dt.datetime] = {}
        self.down = False

    def upload_blob(self, name: str, data: bytes, overwrite: bool = False) -> None:
        if self.down:
            raise ServiceRequestError("storage is unreachable")
        self.blobs[name] = self.now

    def list_blobs(self, name_starts_with: str):
        return [SimpleNamespace(name=name, last_modified=modified) for name, modified in self.blobs.items()
                if name.startswith(name_starts_with)]

    def delete_blob(self, name: str) -> None:
        if self.blobs.pop(name, None) is None:
            raise ResourceNotFoundError("BlobNotFound")


def test_processes_written_within_stale_s_of_the_newest_are_counted_and_long_dead_ones_forgotten():
    container = Container()
    others = {f"signers/pki-ca.vault.azure.net/{name}": T0 - dt.timedelta(seconds=age)
              for name, age in (("fresh", 2), ("stale", 10), ("dead", 600))}
    container.blobs.update(others)
    container.blobs["signers/other-vault.vault.azure.net/fresh"] = T0  # another vault's budget: not counted
    peers = SigningPeers(container, VAULT, process="me", stale_s=3.0, forget_s=300.0)
    assert peers.refresh() == 2  # me and "fresh"
    assert "signers/pki-ca.vault.azure.net/dead" not in container.blobs
    assert "signers/pki-ca.vault.azure.net/stale" in container.blobs  # kept until forget_s
    assert peers.name == "signers/pki-ca.vault.azure.net/me"


def test_the_count_is_none_until_two_counts_then_a_storage_error_keeps_the_last_one():
    container = Container()
    container.blobs["signers/pki-ca.vault.azure.net/other"] = T0
    peers = SigningPeers(container, VAULT)
    assert peers() is None
    peers.refresh()
    assert peers() is None  # a process that started at the same moment may not be listed yet
    peers.refresh()
    assert peers() == 2
    container.down = True
    assert peers.refresh() == 2  # logged, not raised: signing never waits on the count


def test_a_process_counts_while_it_signs_and_leaves_the_count_when_it_stops():
    container = Container()
    peers = SigningPeers(container, VAULT, process="me", interval_s=0.02)
    peers.begin()
    deadline = time.monotonic() + 5
    while peers() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peers() == 1 and peers.name in container.blobs
    peers.end()
    while peers.name in container.blobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peers.name not in container.blobs  # the others' next count no longer includes it
    peers.begin()  # signing again starts a new counting thread
    while peers.name not in container.blobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peers.name in container.blobs
    peers.end()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_bucket_starts_at_a_quarter_then_takes_its_share_and_follows_the_count():
    clock, count = Clock(), [None]
    bucket = AdaptiveBucket(40, share=lambda: count[0], clock=clock, sleep=clock.sleep)
    bucket.acquire()
    assert bucket.rate == 10  # no count yet
    count[0] = 2
    bucket.acquire()
    assert bucket.rate == 20  # the first count: its share at once
    count[0] = 4
    bucket.acquire()
    assert bucket.rate == 10 and bucket.ceiling == 10  # more sharers: cut at once
    count[0] = 1
    bucket.acquire()
    assert bucket.rate == 10 and bucket.ceiling == 40  # fewer: only the ceiling; the rate climbs
    bucket.succeeded()
    rate = bucket.rate
    clock.now += 2.0
    bucket.succeeded()
    assert bucket.rate == pytest.approx(rate + 40 / 5 * 2.0)


def test_a_bucket_change_of_rate_applies_within_its_horizon():
    """Waiting callers hold slots at most ``horizon_s`` ahead, so a cut applies to everyone after that."""
    bucket = AdaptiveBucket(100, horizon_s=0.05)
    starts: list[float] = []
    lock = threading.Lock()

    def sign() -> None:
        bucket.acquire()
        with lock:
            starts.append(time.monotonic())

    threads = [threading.Thread(target=sign) for _ in range(40)]
    for thread in threads:
        thread.start()
    while len(starts) < 3:  # the queue is moving at 100/s
        time.sleep(0.001)
    bucket.rate = 20  # as a 429 or a new sharer would
    cut = time.monotonic()
    for thread in threads:
        thread.join()
    after = sorted(t for t in starts if t > cut + 0.06)
    assert len(after) >= 8  # however late this thread was to cut the rate, most callers were still waiting
    # at the new rate (0.05 s apart on average), not at the old one's queue (0.01 s)
    assert (after[-1] - after[0]) / (len(after) - 1) >= 0.04


@pytest.mark.integration
def test_two_processes_on_azurite_count_each_other(blob_service):
    """Real Last-Modified values from Azurite, compared with each other (never with this machine's clock)."""
    container = blob_service.get_container_client("signers-count")
    container.create_container()
    first, second = SigningPeers(container, VAULT), SigningPeers(container, VAULT)
    first.refresh()
    assert second.refresh() == 2 and first.refresh() == 2
