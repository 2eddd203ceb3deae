"""A small threaded HTTPS server for the emulators: routing, JSON, fault injection, optional mutual TLS.

TLS is pyOpenSSL rather than the ``ssl`` module because DPS's attestation needs the chain the
device *presented* (leaf and intermediates, unverified), which Python 3.11's ``ssl`` does not
expose publicly, and because a server that accepts any client certificate for later checks
needs a verify callback.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import random
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .tls import ServerIdentity

log = logging.getLogger("emulators")
ADMIN_PREFIX = "/_emulator/"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer_chain: list[x509.Certificate] = field(default_factory=list)  # leaf first, as presented; mTLS only

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise HttpError(400, {"error": {"code": "BadRequest", "message": "body is not JSON"}}) from None


@dataclass
class Response:
    status: int
    body: Any = None  # dict/list -> JSON; bytes -> as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """Raise from a route to answer with ``status`` and a JSON ``body``."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.response = Response(status, body, headers or {})


Route = tuple[str, re.Pattern, Callable[..., Response]]


def route(method: str, pattern: str, handler: Callable[..., Response]) -> Route:
    """``pattern`` is a regex over the path with named groups passed to ``handler`` as keywords."""
    return method, re.compile(pattern + r"/?"), handler


@dataclass
class Faults:
    """Injected misbehaviour: latency, a rate cap (429 beyond it), and a fraction of 503s.

    How the cap counts (``window_s``):

    - ``0`` (the default, the burst reading): ``rate_per_s / 10`` per 100 ms window for caps of 10/s and more,
      ``rate_per_s`` per 1 s window below. Stricter than any quota Azure documents, none of which is sub-second:
      a client's scheduling jitter alone draws 429s at a rate under the cap.
    - ``> 0``: at most ``rate_per_s * window_s`` admitted in *any* ``window_s`` seconds, a sliding window. Key
      Vault documents its limits as "transactions allowed in 10 seconds, per vault per region"
      (learn.microsoft.com/azure/key-vault/general/service-limits); any 10 s rather than 10 s windows aligned to
      a clock is the stricter reading of that. "Failed requests that return a 429 do not count towards the
      throttle limits" (key-vault/general/overview-throttling): only admitted requests are counted.
    """

    latency_ms: float = 0.0
    rate_per_s: float | None = None
    retry_after: bool = True
    error_503_fraction: float = 0.0
    window_s: float = 0.0

    def as_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "rate_per_s": self.rate_per_s, "retry_after": self.retry_after,
                "error_503_fraction": self.error_503_fraction, "window_s": self.window_s}

    @classmethod
    def from_dict(cls, data: dict) -> Faults:
        unknown = set(data) - set(cls().as_dict())
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        return cls(**{**cls().as_dict(), **data})


def key_vault_refusal(status: int, message: str) -> Response:
    """Key Vault's error shape (also ARM's): {"error": {"code", "message"}}; 429 is "Throttled"
    (learn.microsoft.com/azure/key-vault/general/overview-throttling)."""
    code = {429: "Throttled", 503: "ServiceUnavailable"}.get(status, "Error")
    return Response(status, {"error": {"code": code, "message": message}})


Refusal = Callable[[int, str], Response]


class FaultGate:
    """Applies ``Faults`` to each request, answering in the emulated service's own error shape (``refusal``);
    counts what it did."""

    def __init__(self, faults: Faults | None = None, seed: int | None = None, refusal: Refusal = key_vault_refusal):
        self.refusal = refusal
        self.faults = faults or Faults()
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._window_count = 0
        self._admitted: collections.deque[float] = collections.deque()  # admission times, for a sliding window
        self._random = random.Random(seed)
        self.stats = {"requests": 0, "throttled": 0, "failed_503": 0}
        self.admitted_by_second: dict[int, int] = {}  # what got through, per whole second (benchmarks' peak rates)

    def check(self) -> Response | None:
        faults = self.faults
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        with self._lock:
            self.stats["requests"] += 1
            if faults.rate_per_s and not self._admit(faults, time.monotonic()):
                self.stats["throttled"] += 1
                refused = self.refusal(429, "Rate limit is exceeded.")
                if faults.retry_after:
                    refused.headers.setdefault("Retry-After", "1")
                return refused
            if faults.error_503_fraction and self._random.random() < faults.error_503_fraction:
                self.stats["failed_503"] += 1
                return self.refusal(503, "injected 503")
            second = int(time.monotonic())
            self.admitted_by_second[second] = self.admitted_by_second.get(second, 0) + 1
        return None

    def _admit(self, faults: Faults, now: float) -> bool:
        """Whether the cap lets one more request in now (``Faults.window_s``); counts it if so. Under the lock."""
        if faults.window_s > 0:
            while self._admitted and self._admitted[0] <= now - faults.window_s:
                self._admitted.popleft()
            if len(self._admitted) >= max(1.0, faults.rate_per_s * faults.window_s):
                return False
            self._admitted.append(now)
            return True
        # The burst reading: a tumbling window of 100 ms for caps of 10/s and more (R/10 per window), else 1 s.
        window = 0.1 if faults.rate_per_s >= 10 else 1.0
        if now - self._window_start >= window:
            self._window_start, self._window_count = now, 0
        if self._window_count >= max(1.0, faults.rate_per_s * window):
            return False
        self._window_count += 1
        return True

    def peak_rate(self, window_s: int = 10) -> float:
        """The most requests admitted in any ``window_s`` whole seconds, per second."""
        with self._lock:
            counts = dict(self.admitted_by_second)
        if not counts:
            return 0.0
        first, last = min(counts), max(counts)
        series = [counts.get(s, 0) for s in range(first, last + 1)]
        return max(sum(series[i:i + window_s]) for i in range(max(1, len(series) - window_s + 1))) / window_s


class _TlsIO(io.RawIOBase):
    """File-like view of a pyOpenSSL connection for ``http.server``."""

    def __init__(self, conn: SSL.Connection):
        self._conn = conn

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._conn.recv_into(buffer)
        except SSL.ZeroReturnError:
            return 0
        except (SSL.SysCallError, SSL.Error):
            return 0

    def write(self, data) -> int:
        self._conn.sendall(bytes(data))
        return len(data)


def presented_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The certificates the client presented in the handshake, leaf first, unverified."""
    leaf = conn.get_peer_certificate(as_cryptography=True)
    chain = conn.get_peer_cert_chain(as_cryptography=True) or []
    return ([leaf] if leaf is not None else []) + [c for c in chain if c != leaf]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorServer

    def setup(self) -> None:
        self.connection = self.request
        self.peer_chain: list[x509.Certificate] = []
        if not isinstance(self.connection, SSL.Connection):  # a plain-HTTP server (the identity endpoint)
            self.rfile = self.connection.makefile("rb")
            self.wfile = self.connection.makefile("wb", buffering=0)
            return
        try:
            self.connection.do_handshake()
        except (SSL.Error, OSError):
            self.close_connection = True
            self.rfile = io.BytesIO()
            self.wfile = io.BytesIO()
            return
        if self.server.client_auth:
            self.peer_chain = presented_chain(self.connection)
        self.rfile = io.BufferedReader(_TlsIO(self.connection))
        self.wfile = _TlsIO(self.connection)

    def finish(self) -> None:
        pass

    def log_message(self, format: str, *args: Any) -> None:  # (BaseHTTPRequestHandler's parameter name)
        log.debug("%s %s", self.server.name, format % args)

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(method=self.command, path=split.path, query=dict(parse_qsl(split.query)),
                          headers={k.lower(): v for k, v in self.headers.items()}, body=body,
                          peer_chain=self.peer_chain)
        response = self.server.dispatch(request)
        if self.server.recorder is not None and not request.path.startswith(ADMIN_PREFIX):
            self.server.recorder.append(_exchange(self.server.name, request, response))
        payload = response.body
        content_type = "application/json; charset=utf-8"
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        elif payload is None:
            payload = b""
        elif isinstance(payload, str):
            payload, content_type = payload.encode(), "text/plain; charset=utf-8"
        self.send_response(response.status)
        headers = {"Content-Type": content_type, **response.headers, "Content-Length": str(len(payload))}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _serve


def _exchange(server: str, request: Request, response: Response) -> dict:
    """One request and its answer, as the contract checks read them (tests/contract_check.py)."""
    try:
        sent = json.loads(request.body) if request.body else None
    except ValueError:
        sent = request.body.decode(errors="replace")
    body = response.body if isinstance(response.body, (dict, list)) or response.body is None else str(response.body)
    return {"server": server, "method": request.method, "path": request.path, "query": sorted(request.query),
            "requestBody": sent, "status": response.status, "responseBody": body}


class EmulatorServer(socketserver.ThreadingTCPServer):
    """One emulated service on one loopback port."""

    daemon_threads = True
    block_on_close = False  # keep-alive handler threads die with their sockets; do not wait for each to notice
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, name: str, routes: list[Route], identity: ServerIdentity | None, *, client_auth: bool = False,
                 port: int = 0, faults: Faults | None = None, recorder: list | None = None,
                 refusal: Refusal = key_vault_refusal, host: str = "127.0.0.1",
                 handler: type[socketserver.BaseRequestHandler] = _Handler):
        """``identity`` None serves plain HTTP: only for the managed identity endpoint, which is plain HTTP on
        loopback on Azure as well (``IDENTITY_ENDPOINT`` is ``http://localhost:.../msi/token``). ``handler``: another
        protocol on the same TLS (the DPS MQTT endpoint, emulators/dps_mqtt.py)."""
        self.name = name
        self.routes = routes
        self.client_auth = client_auth
        self.recorder = recorder  # a list that gets every exchange (contract tests), or None
        self.gate = FaultGate(faults, refusal=refusal)
        self._connections: set[SSL.Connection] = set()
        self._lock = threading.Lock()
        self._context = self._make_context(identity, client_auth) if identity is not None else None
        super().__init__((host, port), handler)
        self.port = self.server_address[1]
        self._thread: threading.Thread | None = None

    @staticmethod
    def _make_context(identity: ServerIdentity, client_auth: bool) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(identity.certificate)
        context.add_extra_chain_cert(identity.ca)
        context.use_privatekey(identity.key)
        if client_auth:
            # Accept any client certificate in the handshake; the service checks the chain itself and
            # answers like DPS does (401002) instead of failing the handshake.
            context.set_verify(SSL.VERIFY_PEER, lambda *_: True)
        return context

    @property
    def url(self) -> str:
        return f"{'https' if self._context is not None else 'http'}://127.0.0.1:{self.port}"

    def get_request(self):
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is None:
            with self._lock:
                self._connections.add(sock)
            return sock, address
        conn = SSL.Connection(self._context, sock)
        conn.set_accept_state()
        with self._lock:
            self._connections.add(conn)
        return conn, address

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.discard(request)
        if not isinstance(request, SSL.Connection):
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            request.close()
            return
        try:
            request.shutdown()
        except (SSL.Error, OSError):
            pass
        try:
            request.sock_shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        request.close()

    def handle_error(self, request, client_address) -> None:
        # socketserver calls this from inside its except clause, so the exception is the one being handled
        log.debug("%s: connection from %s ended with an error", self.name, client_address,
                  exc_info=True)  # noqa: LOG014

    def dispatch(self, request: Request) -> Response:
        try:
            if request.path.startswith(ADMIN_PREFIX):
                return self._admin(request)
            refused = self.gate.check()
            if refused is not None:
                return refused
            for method, pattern, handler in self.routes:
                match = pattern.fullmatch(request.path)
                if match and method == request.method:
                    return handler(request, **match.groupdict())
            return Response(404, {"error": {"code": "NotFound",
                                            "message": f"no route {request.method} {request.path}"}})
        except HttpError as exc:
            return exc.response
        except Exception as exc:  # an emulator bug must answer 500, not hang the client (logged)
            log.exception("%s: %s %s failed", self.name, request.method, request.path)
            return Response(500, {"error": {"code": "InternalError", "message": f"{type(exc).__name__}: {exc}"}})

    def _admin(self, request: Request) -> Response:
        if request.path == ADMIN_PREFIX + "faults":
            if request.method == "PUT":
                try:
                    self.gate.faults = Faults.from_dict(request.json() or {})
                except (TypeError, ValueError) as exc:
                    return Response(400, {"error": str(exc)})
            return Response(200, self.gate.faults.as_dict())
        if request.path == ADMIN_PREFIX + "stats":
            return Response(200, dict(self.gate.stats))
        return Response(404, {"error": "unknown admin path"})

    def start(self) -> EmulatorServer:
        # a short poll: shutdown() waits up to one interval, and a stack stops several servers in turn
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"emulator-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:  # keep-alive connections block their threads in recv
            try:
                if isinstance(conn, SSL.Connection):
                    conn.sock_shutdown(socket.SHUT_RDWR)
                else:
                    conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
