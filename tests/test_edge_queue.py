"""edge/queue.py with fake messages: each verdict (done, rejected and recorded, failed and raised for the host's retry)
and what it leaves in state."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from edge.queue import run_blob, run_queue_message, run_timer
from handlers.errors import InvalidMessage, TransientError

from .fakes import Blob, MemoryDocumentStore, Message


def services():
    wired = SimpleNamespace(store=MemoryDocumentStore())
    return wired, (lambda: wired)


def documents(wired, kind: str) -> list[dict]:
    return [wired.store.get(n).data for n in wired.store.find(f"\"kind\" = '{kind}'")]


def test_a_handled_message_leaves_nothing_behind():
    wired, factory = services()
    seen = []
    run_queue_message(Message(b'{"requestId": "r-1"}', "m1"), queue="q", services=factory,
                      handle=lambda body, w, delivery: seen.append((body, delivery.message_id)) or "done")
    assert seen == [(b'{"requestId": "r-1"}', "m1")]
    assert documents(wired, "rejection") == [] and documents(wired, "failure") == []


def test_a_rejected_message_is_recorded_with_its_field_reason_payload_and_request_id_and_consumed():
    wired, factory = services()

    def reject(body, w, delivery):
        raise InvalidMessage("customerId", "is required")

    for _ in range(2):  # a redelivery is recorded once
        run_queue_message(Message(b'{"requestId": "r-2"}', "m2"), queue="q", services=factory, handle=reject)
    [recorded] = documents(wired, "rejection")
    assert recorded == {**recorded, "queue": "q", "messageId": "m2", "requestId": "r-2", "field": "customerId",
                        "reason": "is required", "payload": '{"requestId": "r-2"}'}


def test_a_failing_message_is_raised_for_the_host_and_each_attempt_is_recorded():
    wired, factory = services()

    def fail(body, w, delivery):
        raise TransientError("Key Vault throttled")

    for attempt in (1, 2):
        with pytest.raises(TransientError):
            run_queue_message(Message(b"not json", "m3", dequeue_count=attempt), queue="q", services=factory,
                              handle=fail)
    [failure] = documents(wired, "failure")
    assert [a["dequeueCount"] for a in failure["attempts"]] == [1, 2]
    assert failure["attempts"][-1]["reason"] == "TransientError: Key Vault throttled"
    assert failure["payload"] == "not json" and documents(wired, "rejection") == []


def test_a_rejected_blob_is_recorded_per_upload_and_a_failing_one_raised():
    wired, factory = services()

    def reject(path, w):
        raise InvalidMessage("batchName", "has a '..' segment")

    run_blob(Blob("device-batches/acme/../x.csv", {"ETag": "v1"}), services=factory, handle=reject)
    run_blob(Blob("device-batches/acme/../x.csv", {"ETag": "v2"}), services=factory, handle=reject)
    assert len(documents(wired, "rejection")) == 2  # a re-upload is a new rejection

    def fail(path, w):
        raise TransientError("storage 503")

    with pytest.raises(TransientError):
        run_blob(Blob("device-batches/acme/y.csv"), services=factory, handle=fail)
    assert documents(wired, "failure")[0]["attempts"][0]["reason"] == "TransientError: storage 503"


def test_a_failing_timer_is_raised_for_its_retry_policy():
    _, factory = services()
    timer = SimpleNamespace(past_due=False)
    run_timer(timer, name="sweep", services=factory, handle=lambda w: "ok")

    def fail(w):
        raise TransientError(f"sweep incomplete at {dt.date.today()}")

    with pytest.raises(TransientError, match="sweep incomplete"):
        run_timer(timer, name="sweep", services=factory, handle=fail)
