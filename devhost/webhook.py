"""The host's HTTP endpoint: its HTTP triggers and the blob extension's webhook.

HTTP triggers: ``/api/{route}`` (``routePrefix`` defaults to ``api``: learn.microsoft.com/azure/azure-functions/
functions-bindings-http-webhook#hostjson-settings), only the methods the trigger lists (all when it lists none; devhost
serves GET and POST). A trigger of ``authLevel`` function takes the function key in the ``code`` query parameter or
the ``x-functions-key`` header, else 401 (learn.microsoft.com/azure/azure-functions/function-keys-how-to); devhost's
one key is ``DEVHOST_FUNCTION_KEY`` (random, and so unknown, when unset). A function that raises answers 500.

The blob extension webhook, as Event Grid calls it and Core Tools serves it:
``POST /runtime/webhooks/blobs?functionName=Host.Functions.NAME`` with header ``aeg-event-type``
(``SubscriptionValidation``: answer the code; ``Notification``: the events; ``Unsubscribe``: 202) and an Event Grid
event array (or one CloudEvent-style object). Source: the EventGrid extension's ``HttpRequestProcessor`` and
learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger. Events are checked against the
documented BlobCreated schema (``host.event_problem``) and become messages on the host's blob event queue.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import azure.functions as func

PATH = "/runtime/webhooks/blobs"
HTTP_PREFIX = "/api/"


def serve(host, port: int) -> ThreadingHTTPServer:
    """Serve ``host``'s HTTP triggers and blob webhook on 127.0.0.1:``port`` (0: a free port) in a daemon thread."""
    key = host.env.get("DEVHOST_FUNCTION_KEY") or secrets.token_urlsafe(32)

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

        def _http_trigger(self, split) -> None:
            function, route_params = host.http_function(split.path[len(HTTP_PREFIX):]) or (None, {})
            methods = [m.upper() for m in (function.trigger.get("methods") or ["GET", "POST"])] if function else []
            if function is None or self.command not in methods:
                return self._answer(404, {"error": f"no function at {split.path} for {self.command}"})
            query = {k: v[0] for k, v in parse_qs(split.query).items()}
            if str(function.trigger.get("authLevel", "function")).lower() != "anonymous":
                given = query.get("code") or self.headers.get("x-functions-key") or ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    return self._answer(401)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = func.HttpRequest(self.command, f"http://127.0.0.1:{server.server_address[1]}{self.path}",
                                       headers=dict(self.headers.items()), params=query, route_params=route_params,
                                       body=body)
            response = host.invoke_http(function, request)
            payload = response.get_body() or b""
            self.send_response(response.status_code)
            self.send_header("Content-Type", response.mimetype or "text/plain")
            for name, value in response.headers.items():
                if name.lower() not in ("content-type", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            split = urlsplit(self.path)
            if split.path.startswith(HTTP_PREFIX):
                return self._http_trigger(split)
            return self._answer(404, {"error": f"no function at {split.path}"})

        def do_POST(self):
            split = urlsplit(self.path)
            if split.path.startswith(HTTP_PREFIX):
                return self._http_trigger(split)
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
