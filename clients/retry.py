"""Retry and client-side rate limiting for throttled Azure services, through azure-core's public hooks.

Used by the Key Vault, DPS and IoT Hub clients: a ``RetryPolicy`` subclass passed as ``retry_policy=``
and a token-bucket ``per_retry_policies=`` policy, never by patching the SDKs.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import RetryPolicy, SansIOHTTPPolicy


class ThrottlingRetryPolicy(RetryPolicy):
    """azure-core's ``RetryPolicy`` plus what throttled Azure services need (Key Vault, DPS, IoT Hub).

    azure-core 1.41 retries a POST only on 500/503/504 or with Retry-After, waits 0 s before the first
    retry, has no jitter and allows 3 status retries; a 429 without Retry-After on a sign (a POST)
    would reach the caller.

    Overrides only the policy's public hooks: ``configure_retries`` (POST joins the retried methods
    when ``retry_post``), ``is_retry`` (429 always retried) and ``get_backoff_time`` (jittered
    exponential from the first retry). ``retry_total`` also bounds status retries, which
    azure-core otherwise caps at 3.
    """

    def __init__(self, *, retry_post: bool = False, retry_total: int = 8, retry_backoff_factor: float = 1.0,
                 retry_backoff_max: float = 30.0, **kwargs: Any):
        super().__init__(retry_total=retry_total, retry_status=retry_total, retry_backoff_factor=retry_backoff_factor,
                         retry_backoff_max=retry_backoff_max, **kwargs)
        self._retry_post = retry_post

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        if self._retry_post:
            settings["methods"] = frozenset(settings["methods"]) | {"POST"}
        return settings

    def is_retry(self, settings: dict[str, Any], response) -> bool:
        if response.http_response.status_code == 429:
            return settings["total"] > 0
        return bool(super().is_retry(settings, response))

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        ceiling = min(settings["max_backoff"], settings["backoff"] * 2 ** (len(settings["history"]) - 1))
        # "Equal jitter": never an immediate retry (Key Vault: "avoid immediate retries"), never in lockstep.
        return random.uniform(ceiling / 2, ceiling)


class TokenBucket:
    """Spaces acquisitions ``1 / rate_per_s`` apart; thread-safe.

    No bursts: after an idle spell the first caller goes at once and the next one ``1 / rate`` later. Key Vault
    counts over 10 s, the budget is shared with other processes, and a burst is exactly what gets throttled.

    A caller reserves the next free slot under the lock and sleeps outside it, so callers go in arrival order
    without holding the lock. Reservations reach at most ``horizon_s`` ahead; a caller beyond that waits and
    asks again. So a change of rate (``AdaptiveBucket``) applies within ``horizon_s``: slots handed out at an
    old rate are never more than that, and never interleave with a whole queue of slots at a new one.
    """

    def __init__(self, rate_per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, horizon_s: float = 0.25):
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s: must be more than 0, got {rate_per_s}")
        self.rate = float(rate_per_s)
        self._clock, self._sleep, self._horizon_s = clock, sleep, horizon_s
        self._next = float("-inf")  # the next free slot
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take the next slot, waiting for it; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                slot = max(now, self._next)
                if slot - now <= self._horizon_s:
                    self._next = slot + 1 / self.rate
                    break
            pause = slot - now - self._horizon_s / 2  # beyond the horizon: ask again when it is nearer
            self._sleep(pause)
            waited += pause
        if slot > now:
            self._sleep(slot - now)
        return waited + max(slot - now, 0.0)

    def throttled(self) -> None:
        """The service refused an attempt as throttled (429). A fixed bucket keeps its rate."""

    def succeeded(self) -> None:
        """The service took an attempt. A fixed bucket keeps its rate."""


class AdaptiveBucket(TokenBucket):
    """A token bucket whose rate follows the vault's budget and answers: a share of the budget, then additive
    increase, multiplicative decrease (AIMD) on the service's 429s.

    Every Functions instance signs against one vault, whose limit is per vault: a fixed per-process rate either
    wastes the budget (split by a guessed instance count) or overruns it (each instance taking it all). Here:

    - ``budget`` is what every process is configured with (``KEY_VAULT_SIGN_RATE_PER_S``: the app's budget at
      the vault). With ``share`` (``clients.signers.SigningPeers``: how many processes sign against this vault
      now, counted through blob storage) the ceiling is ``budget / share()``: more sharers cut the rate at
      once, fewer let it climb. Without it, the ceiling is the whole budget.
    - On a 429 the rate goes down to ``decrease`` of it (at most once per ``cooldown_s``: one burst's refusals
      are one signal), never below ``floor``: another consumer of the vault, or processes that have not yet
      seen each other.
    - On each success it adds ``ceiling / ramp_s`` signs/s per second since its last change, up to the ceiling,
      except within ``cooldown_s`` of a decrease (while it takes effect).

    The defaults (0.8, 5 s, 0.5 s) were chosen on simulations of 1, 2, 4 and 8 instances against one vault
    (``tests/test_adaptive_rate.py``)."""

    def __init__(self, budget: float, *, share: Callable[[], int | None] | None = None, floor: float = 1.0,
                 ramp_s: float = 5.0, cooldown_s: float = 0.5, decrease: float = 0.8, horizon_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        super().__init__(budget, clock=clock, sleep=sleep, horizon_s=horizon_s)
        self.budget, self._share, self._floor, self._ramp_s = float(budget), share, float(floor), ramp_s
        self.ceiling = self.budget
        self._counted = share is None
        if share is not None:
            # Until the first settled count (None before it), a process starts at a quarter of the budget: processes
            # that start together would otherwise each take the whole of it at once.
            self.rate = max(self.floor, self.budget / 4)
        self._cooldown_s, self._decrease = cooldown_s, decrease
        self._changed = clock()
        self._decreased = float("-inf")
        self.throttles = 0

    @property
    def floor(self) -> float:
        return min(self._floor, self.ceiling)

    def acquire(self) -> float:
        if self._share is not None:
            sharers = self._share()
            if sharers is not None:
                self._reshare(max(1, sharers))
        return super().acquire()

    def _reshare(self, sharers: int) -> None:
        """The first count sets the rate to this process's share (unless a 429 came first). After it, more
        sharers cut the rate at once, in proportion; fewer raise only the ceiling, and the rate climbs to it as
        after a 429 (a process between two chunks briefly drops out of the count: jumping back would overrun the
        vault when it returns)."""
        with self._lock:
            ceiling = self.budget / sharers
            if not self._counted:
                self._counted = True
                if self.throttles == 0:
                    self.rate = ceiling
            elif ceiling < self.ceiling:
                self.rate = max(min(self._floor, ceiling), self.rate * ceiling / self.ceiling)
            self.ceiling = ceiling
            self.rate = min(self.rate, ceiling)

    def throttled(self) -> None:
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if now - self._decreased < self._cooldown_s:
                return
            self.rate = max(self.floor, self.rate * self._decrease)
            self._decreased = self._changed = now

    def succeeded(self) -> None:
        with self._lock:
            now = self._clock()
            if self.rate >= self.ceiling or now - self._decreased < self._cooldown_s:
                self._changed = now  # no increase while the last decrease takes effect
                return
            self.rate = min(self.ceiling, self.rate + self.ceiling / self._ramp_s * (now - self._changed))
            self._changed = now


class RateLimitPolicy(SansIOHTTPPolicy):
    """Takes a token from ``bucket`` before each attempt (placed after the retry policy), and tells it each
    attempt's answer (an ``AdaptiveBucket`` adapts to it)."""

    def __init__(self, bucket: TokenBucket, on_throttled: Callable[[], None] | None = None):
        self._bucket = bucket
        self._on_throttled = on_throttled  # told of each 429 too (a metric)

    def on_request(self, request: PipelineRequest) -> None:
        self._bucket.acquire()

    def on_response(self, request: PipelineRequest, response) -> None:
        status = response.http_response.status_code
        if status == 429:
            self._bucket.throttled()
            if self._on_throttled is not None:
                self._on_throttled()
        elif status < 400:
            self._bucket.succeeded()
