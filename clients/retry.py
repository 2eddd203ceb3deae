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

    A bucket of one token, so no bursts: Key Vault counts over 10 s, the budget is shared with other
    instances, and a burst after an idle spell (or after workers wake from a Retry-After) is exactly
    what gets throttled. A caller reserves its slot under the lock and sleeps outside it, so waiting
    callers queue in arrival order without holding the lock.
    """

    def __init__(self, rate_per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s: must be more than 0, got {rate_per_s}")
        self.rate = float(rate_per_s)
        self._clock, self._sleep = clock, sleep
        self._tokens = 1.0
        self._stamp = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take the token, waiting for the next free slot; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(1.0, self._tokens + (now - self._stamp) * self.rate) - 1
            self._stamp = now
            wait = -self._tokens / self.rate
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)

    def throttled(self) -> None:
        """The service refused an attempt as throttled (429). A fixed bucket keeps its rate."""

    def succeeded(self) -> None:
        """The service took an attempt. A fixed bucket keeps its rate."""


class AdaptiveBucket(TokenBucket):
    """A token bucket whose rate follows the service's answers: additive increase, multiplicative decrease (AIMD).

    Every Functions instance signs against one vault, whose limit is per vault: a fixed per-process rate either
    wastes the budget (split by a guessed instance count) or overruns it (each instance taking it all). Here each
    instance starts at ``ceiling`` (``KEY_VAULT_SIGN_RATE_PER_S``, the vault's budget) and:

    - on a 429, takes its rate down to ``decrease`` of it (at most once per ``cooldown_s``: one burst's refusals are
      one signal), never below ``floor``;
    - on each success, adds ``ceiling / ramp_s`` signs/s per second since its last change, up to ``ceiling``, except
      within ``cooldown_s`` of a decrease (while it takes effect).

    The defaults (0.8, 5 s, 0.5 s) were chosen on a simulation of 1, 2, 4 and 8 instances against one vault
    (``tests/test_adaptive_rate.py``): 4 instances use about 0.9 of the vault with about 1.1 attempts per admitted
    sign.

    N instances so share the vault without knowing N: together they hover at its limit, each backing off on the
    429s its own excess caused (as TCP flows share a link)."""

    def __init__(self, ceiling: float, *, floor: float = 1.0, ramp_s: float = 5.0, cooldown_s: float = 0.5,
                 decrease: float = 0.8, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(ceiling, clock=clock, sleep=sleep)
        self.ceiling, self.floor = float(ceiling), min(float(floor), float(ceiling))
        self._increase_per_s = self.ceiling / ramp_s
        self._cooldown_s, self._decrease = cooldown_s, decrease
        self._changed = clock()
        self._decreased = float("-inf")
        self.throttles = 0

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
            self.rate = min(self.ceiling, self.rate + self._increase_per_s * (now - self._changed))
            self._changed = now


class RateLimitPolicy(SansIOHTTPPolicy):
    """Takes a token from ``bucket`` before each attempt (placed after the retry policy), and tells it each
    attempt's answer (an ``AdaptiveBucket`` adapts to it)."""

    def __init__(self, bucket: TokenBucket):
        self._bucket = bucket

    def on_request(self, request: PipelineRequest) -> None:
        self._bucket.acquire()

    def on_response(self, request: PipelineRequest, response) -> None:
        status = response.http_response.status_code
        if status == 429:
            self._bucket.throttled()
        elif status < 400:
            self._bucket.succeeded()
