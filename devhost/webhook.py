"""The Functions host's blob extension webhook, as Event Grid calls it and Core Tools serves it:
``POST /runtime/webhooks/blobs?functionName=Host.Functions.NAME`` with header ``aeg-event-type``
(``SubscriptionValidation``: answer the code; ``Notification``: the events; ``Unsubscribe``: 202) and an Event Grid
event array (or one CloudEvent-style object). Source: the EventGrid extension's ``HttpRequestProcessor`` and
learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger. Events are checked against the
documented BlobCreated schema (``host.event_problem``) and become messages on the host's blob event queue.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATH = "/runtime/webhooks/blobs"


def serve(host, port: int) -> ThreadingHTTPServer:
    """Serve ``host``'s blob webhook on 127.0.0.1:``port`` (0: a free port) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def _answer(self, status: int, body: dict | None = None) -> None:
            payload = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):
            split = urlsplit(self.path)
            if split.path.rstrip("/") != PATH:
                return self._answer(404, {"error": f"no webhook {split.path}"})
            name = (parse_qs(split.query).get("functionName") or [""])[0]
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                return self._answer(400, {"error": "the body is not JSON"})
            kind = self.headers.get("aeg-event-type", "")
            events = body if isinstance(body, list) else [body]
            if kind == "SubscriptionValidation":
                code = ((events[0] or {}).get("data") or {}).get("validationCode") if events else None
                return self._answer(200, {"validationResponse": code}) if code else self._answer(400)
            if kind == "Unsubscribe":
                return self._answer(202)
            if kind != "Notification":
                return self._answer(400, {"error": "header aeg-event-type must be Notification, "
                                                   "SubscriptionValidation or Unsubscribe"})
            try:
                host.deliver_events(name.removeprefix("Host.Functions."), events)
            except LookupError as exc:
                return self._answer(404, {"error": str(exc)})
            except ValueError as exc:
                return self._answer(400, {"error": str(exc)})
            return self._answer(202)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
    return server
