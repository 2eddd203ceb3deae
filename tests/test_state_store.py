"""BlobDocumentStore against real Azurite: conditional writes and index-tag queries."""

import threading

import pytest

from handlers.errors import AlreadyExists, Conflict

pytestmark = pytest.mark.integration


def test_create_get_replace_round_trip(state_store):
    created = state_store.create("customers/acme.json", {"status": "pending", "n": 1})
    got = state_store.get("customers/acme.json")
    assert got.data == {"status": "pending", "n": 1}
    assert got.etag == created.etag
    replaced = state_store.replace(got, {"status": "active", "n": 2})
    assert replaced.etag != got.etag
    assert state_store.get("customers/acme.json").data == {"status": "active", "n": 2}


def test_missing_document_is_none(state_store):
    assert state_store.get("nothing/here.json") is None


def test_create_is_if_none_match(state_store):
    state_store.create("a.json", {"v": 1})
    with pytest.raises(AlreadyExists):
        state_store.create("a.json", {"v": 2})
    assert state_store.get("a.json").data == {"v": 1}


def test_replace_with_a_stale_etag_is_a_conflict(state_store):
    first = state_store.create("a.json", {"v": 1})
    state_store.replace(first, {"v": 2})
    with pytest.raises(Conflict, match="ETag"):
        state_store.replace(first, {"v": 3})
    assert state_store.get("a.json").data == {"v": 2}


def test_concurrent_creates_have_exactly_one_winner(state_store):
    outcomes = []

    def create(i):
        try:
            state_store.create("race.json", {"winner": i})
            outcomes.append("won")
        except AlreadyExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]


def test_index_tags_are_queried_server_side(state_store):
    state_store.create("devices/acme/d1.json", {},
                       tags={"customer": "acme", "status": "issued", "notAfter": "20270101"})
    state_store.create("devices/acme/d2.json", {},
                       tags={"customer": "acme", "status": "issued", "notAfter": "20280101"})
    state_store.create("devices/beta/d3.json", {},
                       tags={"customer": "beta", "status": "issued", "notAfter": "20270101"})
    doc = state_store.get("devices/acme/d1.json")
    state_store.replace(doc, {"disabled": True},
                        tags={"customer": "acme", "status": "disabled", "notAfter": "20270101"})
    assert sorted(state_store.find("\"customer\" = 'acme' AND \"status\" = 'issued'")) == ["devices/acme/d2.json"]
    assert sorted(state_store.find("\"notAfter\" < '20271231'")) == ["devices/acme/d1.json", "devices/beta/d3.json"]


def test_too_many_tags_are_refused_before_the_call(state_store):
    with pytest.raises(ValueError, match="at most 10"):
        state_store.create("t.json", {}, tags={f"k{i}": "v" for i in range(11)})

