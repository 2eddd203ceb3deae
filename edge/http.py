"""Run one HTTP request through a handler, as ``edge.queue`` does for messages: the one place an HTTP trigger's
verdict is decided.

- done: the handler's JSON, 200;
- rejected: the handler raised ``Rejected`` (a body that is not what the caller's contract says): 400 with
  ``{"error", "field"}``, and the reason and payload recorded under ``rejections/{route}/``;
- anything else: 500 with a generic message (the cause is logged, never sent), so the caller retries. For DPS's
  custom allocation webhook, DPS fails that registration and the device registers again later.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable

import azure.functions as func

from clients.metrics import rejected
from handlers.errors import Rejected
from handlers.rejections import record_rejection

from .services import Services
from .telemetry import log_context, peek

log = logging.getLogger("pki")


def run_http(req: func.HttpRequest, *, route: str, services: Callable[[], Services],
             handle: Callable[[bytes, Services], dict]) -> func.HttpResponse:
    body = req.get_body() or b""
    request_id = req.headers.get("x-ms-request-id") or req.headers.get("x-ms-client-request-id") or str(uuid.uuid4())
    with log_context(**{**peek(body), "requestId": request_id}):
        return _run_http(body, request_id, route, services, handle)


def _run_http(body: bytes, request_id: str, route: str, services: Callable[[], Services],
              handle: Callable[[bytes, Services], dict]) -> func.HttpResponse:
    context = {"route": route}  # requestId and customerId: from log_context, on every record (edge/telemetry.py)
    now = dt.datetime.now(dt.UTC)
    try:
        wired = services()
    except Exception:
        log.exception("cannot start: settings or clients are broken", extra=context)
        return _failed(request_id)
    try:
        answer = handle(body, wired)
    except Rejected as exc:
        where = record_rejection(wired.store, queue=route, message_id=request_id, body=body, reason=exc.reason,
                                 field=exc.field, now=now, request_id=request_id)
        rejected(route, exc.field)
        log.warning("rejected request %s to %s: %s (recorded in %s)", request_id, route, exc, where,
                    extra={**context, "rejections": 1})
        return _json(400, {"error": exc.reason, "field": exc.field, "requestId": request_id})
    except Exception as exc:
        log.exception("request %s to %s failed: %s: %s", request_id, route, type(exc).__name__, exc, extra=context)
        return _failed(request_id)
    log.info("request %s to %s: done", request_id, route, extra=context)
    return _json(200, answer)


def _failed(request_id: str) -> func.HttpResponse:
    return _json(500, {"error": "the request could not be completed; try again", "requestId": request_id})


def _json(status: int, body: dict) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=status, mimetype="application/json")
