"""The Key Vault sign budget shared by every instance without knowing how many there are (clients/retry.py,
``AdaptiveBucket``: additive increase, multiplicative decrease on 429)."""

from __future__ import annotations

from clients.retry import AdaptiveBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_429_cuts_the_rate_once_per_cooldown_and_never_below_the_floor():
    clock = Clock()
    bucket = AdaptiveBucket(40, floor=4, decrease=0.5, cooldown_s=1.0, clock=clock)
    bucket.throttled()
    bucket.throttled()  # the same burst: one signal
    assert bucket.rate == 20
    for _ in range(5):
        clock.now += 1.5
        bucket.throttled()
    assert bucket.rate == 4 and bucket.throttles == 7


def test_successes_win_the_rate_back_linearly_up_to_the_ceiling():
    clock = Clock()
    bucket = AdaptiveBucket(40, ramp_s=10, decrease=0.5, cooldown_s=0, clock=clock)
    bucket.throttled()
    clock.now += 2.0
    bucket.succeeded()
    assert bucket.rate == 20 + 4 * 2.0  # ceiling / ramp_s per second
    clock.now += 60
    bucket.succeeded()
    assert bucket.rate == 40


def test_four_instances_each_given_the_whole_budget_share_it_and_use_most_of_it():
    """A fluid simulation, 10 ms steps: four instances each configured with the vault's full 50 signs/s send at
    their bucket's rate against a vault admitting 50/s (429 beyond, in 100 ms windows as the emulator counts)."""
    clock, limit, step = Clock(), 50.0, 0.01
    buckets = [AdaptiveBucket(limit, clock=clock) for _ in range(4)]
    owed = [i * 0.3 for i in range(4)]  # not in lockstep
    admitted_by_second: dict[int, int] = {}
    attempts = window_count = 0
    window_start = 0.0
    for tick in range(int(120 / step)):
        clock.now = tick * step
        if clock.now - window_start >= 0.1:
            window_start, window_count = clock.now, 0
        for i, bucket in enumerate(buckets):
            owed[i] += bucket.rate * step
            while owed[i] >= 1:
                owed[i] -= 1
                attempts += 1
                if window_count < limit * 0.1:
                    window_count += 1
                    admitted_by_second[int(clock.now)] = admitted_by_second.get(int(clock.now), 0) + 1
                    bucket.succeeded()
                else:
                    bucket.throttled()
    steady = [admitted_by_second.get(s, 0) for s in range(20, 120)]
    assert sum(steady) / len(steady) >= 0.85 * limit  # most of the vault's budget used
    assert max(sum(steady[i:i + 10]) / 10 for i in range(len(steady) - 9)) <= 1.1 * limit
    assert attempts / 120 <= 1.25 * limit  # throttled attempts stay a fraction, not a storm


def test_four_instances_dividing_the_budget_by_their_count_use_it_and_stay_under_the_vaults_10s_limit():
    """The shared budget (clients/signers.py): four instances, each configured with the vault's whole 50 signs/s
    and told there are four of them, against a vault admitting 500 in any 10 s (Key Vault's documented unit,
    emulators/core.Faults.window_s), with timing jitter up to 30 ms."""
    import collections
    import random

    clock, limit, step = Clock(), 50.0, 0.005
    rnd = random.Random(7)
    buckets = [AdaptiveBucket(limit, share=lambda: 4, clock=clock) for _ in range(4)]
    for bucket in buckets:
        bucket.acquire()  # the first acquisition takes the count (and does not wait); then the rate paces
    owed = [i * 0.3 for i in range(4)]
    window: collections.deque[float] = collections.deque()
    admitted_by_second: dict[int, int] = {}
    attempts = 0
    for tick in range(int(120 / step)):
        clock.now = tick * step
        for i, bucket in enumerate(buckets):
            owed[i] += bucket.rate * step
            while owed[i] >= 1:
                owed[i] -= 1
                attempts += 1
                at = clock.now + rnd.random() * 0.03
                while window and window[0] <= at - 10:
                    window.popleft()
                if len(window) < limit * 10:
                    window.append(at)
                    admitted_by_second[int(at)] = admitted_by_second.get(int(at), 0) + 1
                    bucket.succeeded()
                else:
                    bucket.throttled()
    steady = [admitted_by_second.get(s, 0) for s in range(20, 119)]
    assert sum(steady) / len(steady) >= 0.95 * limit
    assert max(sum(steady[i:i + 10]) / 10 for i in range(len(steady) - 9)) <= limit
    assert attempts / 120 <= 1.05 * limit  # next to no 429s: the count, not the refusals, sets the pace
