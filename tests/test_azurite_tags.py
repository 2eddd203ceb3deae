"""Azurite 3.35.0 answered a blob index tag query from the first 5,000 blobs of a container only (it paged
before filtering); patches/azurite+3.35.0.patch, applied by ``npm ci``, fixes that. Every tag query of the
service (customers, devices, the audit log, the sweep) depends on it once the state passes 5,000 blobs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def test_a_tag_query_finds_matches_beyond_the_first_5000_blobs(state_store):
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: state_store.create(f"a/{i:05d}.json", {}, tags={"kind": "filler"}), range(5100)))
    state_store.create("z/last.json", {}, tags={"kind": "wanted"})
    assert list(state_store.find("\"kind\" = 'wanted'")) == ["z/last.json"]
    assert len(list(state_store.find("\"kind\" = 'filler'"))) == 5100  # a full page, then the next one
