"""The one optimistic-update loop and the lease rules, on the in-memory store."""

from __future__ import annotations

import datetime as dt

import pytest

from handlers.errors import TransientError
from handlers.leases import expired, held_by_other, lease_for, update

from .fakes import MemoryDocumentStore, run_concurrently

NOW = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)


def test_update_creates_replaces_and_leaves_alone():
    store = MemoryDocumentStore()
    created = update(store, "r.json", lambda data: {"n": 1} if data is None else None, tags=lambda d: {"kind": "r"})
    assert created.data == {"n": 1} and list(store.find("\"kind\" = 'r'")) == ["r.json"]
    replaced = update(store, "r.json", lambda data: {**data, "n": data["n"] + 1})
    assert replaced.data == {"n": 2}
    writes = store.writes
    assert update(store, "r.json", lambda data: None).data == {"n": 2} and store.writes == writes


def test_concurrent_updates_all_land_once_each():
    store = MemoryDocumentStore()
    store.create("c.json", {"n": 0})
    run_concurrently(lambda: update(store, "c.json", lambda data: {"n": data["n"] + 1}, attempts=50), 8)
    assert store.get("c.json").data == {"n": 8}


def test_a_record_that_keeps_changing_is_a_transient_error():
    store = MemoryDocumentStore()
    store.create("x.json", {"n": 0})

    def meddle(data):  # someone else writes between every read and write of ours
        current = store.get("x.json")
        store.replace(current, {"n": current.data["n"] + 100})
        return {"n": -1}

    with pytest.raises(TransientError, match=r"x\.json: kept changing"):
        update(store, "x.json", meddle, attempts=3)


def test_lease_rules():
    mine, other = lease_for("me", NOW + dt.timedelta(minutes=1)), lease_for("you", NOW + dt.timedelta(minutes=1))
    assert expired(None, NOW) and expired({}, NOW) and expired(lease_for("you", NOW), NOW)
    assert not expired(other, NOW) and held_by_other(other, "me", NOW)
    assert not held_by_other(mine, "me", NOW) and not held_by_other(lease_for("you", NOW - dt.timedelta(1)), "me", NOW)
    assert not held_by_other(None, "me", NOW)
