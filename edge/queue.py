"""Run one queue message through a handler and decide its fate, as the table of contents asks:

- done: the handler returned;
- rejected: the handler raised ``Rejected`` (bad input, a conflict with recorded state, no capacity):
  the reason and payload are recorded under ``rejections/`` and the message is consumed;
- retry: anything else is raised to the host after its reason is recorded under ``failures/``; the host
  retries and, after ``maxDequeueCount`` attempts, moves the message to ``<queue>-poison``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import azure.functions as func

from clients.metrics import rejected
from handlers.errors import Rejected
from handlers.messages import Delivery
from handlers.rejections import record_failure, record_rejection

from .services import Services
from .telemetry import log_context, peek

log = logging.getLogger("pki")


def run_blob(blob: func.InputStream, *, services: Callable[[], Services],
             handle: Callable[[str, Services], str]) -> None:
    """A blob trigger: the handler reads the blob itself (streaming), by its path ``container/name``."""
    _, customer, batch = [*(blob.name or "").split("/", 2), "", ""][:3]
    with log_context(customerId=customer, batch=batch):
        _run_blob(blob, services, handle)


def _run_blob(blob: func.InputStream, services: Callable[[], Services], handle: Callable[[str, Services], str]) -> None:
    context = {"blob": blob.name}
    now = dt.datetime.now(dt.UTC)
    wired = services()
    try:
        outcome = handle(blob.name, wired)
    except Rejected as exc:
        # keyed by blob version: a re-upload of the same name is a new rejection, not a duplicate of the old one
        version = (blob.blob_properties or {}).get("ETag", "") if hasattr(blob, "blob_properties") else ""
        where = record_rejection(wired.store, queue="device-batches", message_id=None, body=f"{blob.name} {version}",
                                 reason=exc.reason, field=exc.field, now=now)
        rejected("device-batches", exc.field)
        log.warning("rejected blob %s: %s (recorded in %s)", blob.name, exc, where, extra={**context, "rejections": 1})
        return
    except Exception as exc:
        record_failure(wired.store, queue="device-batches", message_id=None, body=blob.name,
                       reason=f"{type(exc).__name__}: {exc}", dequeue_count=None, now=now)
        log.warning("blob %s failed, the host will retry: %s: %s", blob.name, type(exc).__name__, exc, extra=context)
        raise
    log.info("blob %s: %s", blob.name, outcome, extra=context)


def run_queue_message(msg: func.QueueMessage, *, queue: str, services: Callable[[], Services],
                      handle: Callable[[bytes, Services, Delivery], str]) -> None:
    body = msg.get_body()
    carried = peek(body)
    with log_context(messageId=msg.id, **carried):
        _run_queue_message(msg, body, queue, services, handle, carried.get("requestId"))


def _run_queue_message(msg: func.QueueMessage, body: bytes, queue: str, services: Callable[[], Services],
                       handle: Callable[[bytes, Services, Delivery], str], request_id: str | None) -> None:
    # messageId, requestId, customerId...: from log_context, on every record (edge/telemetry.py)
    context = {"queue": queue, "dequeueCount": msg.dequeue_count}
    now = dt.datetime.now(dt.UTC)
    try:
        wired = services()
    except Exception:
        log.exception("cannot start: settings or clients are broken", extra=context)
        raise
    try:
        outcome = handle(body, wired, Delivery(msg.id, getattr(msg, "insertion_time", None)))
    except Rejected as exc:
        where = record_rejection(wired.store, queue=queue, message_id=msg.id, body=body, reason=exc.reason,
                                 field=exc.field, now=now, request_id=request_id)
        rejected(queue, exc.field)
        log.warning("rejected message %s from %s: %s (recorded in %s)", msg.id, queue, exc, where,
                    extra={**context, "rejections": 1})
        return
    except Exception as exc:
        record_failure(wired.store, queue=queue, message_id=msg.id, body=body,
                       reason=f"{type(exc).__name__}: {exc}", dequeue_count=msg.dequeue_count, now=now)
        log.warning("message %s from %s failed (attempt %s), the host will retry: %s: %s", msg.id, queue,
                    msg.dequeue_count, type(exc).__name__, exc, extra=context)
        raise
    log.info("message %s from %s (requestId %s): %s", msg.id, queue, request_id, outcome, extra=context)


def run_timer(timer: func.TimerRequest, *, name: str, services: Callable[[], Services],
              handle: Callable[[Services], str]) -> None:
    """A timer trigger: the handler's outcome is logged; a failure is logged and raised for the retry policy."""
    context = {"timer": name, "pastDue": timer.past_due}
    try:
        outcome = handle(services())
    except Exception as exc:
        log.warning("%s failed, the retry policy will run it again: %s: %s", name, type(exc).__name__, exc,
                    extra=context)
        raise
    log.info("%s%s: %s", name, " (past due)" if timer.past_due else "", outcome, extra=context)
