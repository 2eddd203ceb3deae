"""Start and stop Azurite (the storage emulator from npm) on loopback, in memory, on free ports.

With ``tls`` (a server certificate of the local stack's CA) it serves HTTPS and accepts Microsoft Entra
bearer tokens (``--oauth basic``, which Azurite allows over HTTPS only): the app reaches it the way it
reaches Azure Storage, by service URI with a ``TokenCredential``. Azurite's basic level checks a token's
lifetime, issuer (``https://sts.windows.net/...``) and audience (``https://storage.azure.com`` or the
account's endpoint), not its signature or roles (Azurite ``src/blob/authentication/BlobTokenAuthenticator.ts``).

The account key is random per start, passed to Azurite through ``AZURITE_ACCOUNTS``: no storage
key is written in this repository, and a stray process cannot be reached with a well-known key. Key and
SAS access stay open (``connection_string``), for those who run that way and for tests that inspect state.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "pkilocal"
START_TIMEOUT_S = 60


class AzuriteError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AzuriteError(f"azurite exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AzuriteError(f"azurite did not listen on port {port} within {START_TIMEOUT_S}s")


def azurite_binary() -> Path:
    binary = REPO / "node_modules" / ".bin" / "azurite"
    if not binary.exists():
        raise AzuriteError(f"{binary} is missing: run `npm ci` in {REPO} (the Makefile does)")
    return binary


class Azurite:
    """``with Azurite(tls, ca_path) as azurite: azurite.blob_service_uri`` - blob and queue services."""

    def __init__(self, tls=None, ca_path: Path | None = None) -> None:
        """``tls``: an ``emulators.tls.ServerIdentity`` (HTTPS + OAuth); ``ca_path``: its CA, for ``clients``."""
        self.blob_port = self.queue_port = 0
        self.tls, self.ca_path = tls, ca_path
        self._key = base64.b64encode(secrets.token_bytes(64)).decode()
        self._process: subprocess.Popen | None = None
        self._workdir: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def blob_service_uri(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.blob_port}/{ACCOUNT}"

    @property
    def queue_service_uri(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.queue_port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        """Account-key access: not what the app uses (it has a token credential), kept for those who run that way."""
        return (f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};AccountKey={self._key};"
                f"BlobEndpoint={self.blob_service_uri};QueueEndpoint={self.queue_service_uri};")

    def _client_options(self) -> dict:
        return {"connection_verify": str(self.ca_path)} if self.ca_path else {}

    def blob_service(self):
        """A key-authorized client for tests and tools that inspect state (not the app's way in)."""
        from azure.storage.blob import BlobServiceClient

        from clients.storage import pooled_transport

        return BlobServiceClient.from_connection_string(
            self.connection_string, transport=pooled_transport(str(self.ca_path) if self.ca_path else None))

    def queue_client(self, name: str):
        """A key-authorized client of queue ``name`` (created if absent), for tests and tools."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.queue import QueueClient

        client = QueueClient.from_connection_string(self.connection_string, name, **self._client_options())
        with contextlib.suppress(ResourceExistsError):
            client.create_queue()
        return client

    def _tls_arguments(self) -> list[str]:
        if not self.tls:
            return []
        from pki import export

        cert, key = Path(self._workdir) / "azurite-cert.pem", Path(self._workdir) / "azurite-key.pem"
        cert.write_bytes(export.chain_pem([self.tls.certificate, self.tls.ca]))
        # The TLS server's throwaway key, made at start: Azurite reads it from a file, private to this run.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(export.key_pem(self.tls.key))
        return ["--cert", str(cert), "--key", str(key), "--oauth", "basic"]

    def start(self) -> Azurite:
        binary = azurite_binary()
        self._workdir = tempfile.mkdtemp(prefix="azurite-")
        tls_arguments = self._tls_arguments()
        for _ in range(3):  # a free port can be taken between the probe and Azurite's bind
            self.blob_port, self.queue_port, table_port = free_port(), free_port(), free_port()
            env = {**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{self._key}"}
            self._process = subprocess.Popen(
                [str(binary), "--silent", "--inMemoryPersistence", "--skipApiVersionCheck", "--disableProductStyleUrl",
                 "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
                 "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
                 "--tableHost", "127.0.0.1", "--tablePort", str(table_port), *tls_arguments],
                cwd=self._workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            try:
                _wait_for_port(self.blob_port, self._process, deadline)
                _wait_for_port(self.queue_port, self._process, deadline)
                return self
            except AzuriteError as exc:
                error = exc
                output = (self._process.stderr.read().decode(errors="replace")
                          if self._process.poll() is not None else "")
                self.stop(keep_workdir=True)
                if "EADDRINUSE" not in output:
                    raise AzuriteError(f"{exc}: {output.strip()[-2000:]}") from None
        raise AzuriteError(f"azurite could not be started: {error}")

    def stop(self, keep_workdir: bool = False) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        if process is not None and process.stderr is not None:
            process.stderr.close()
        if self._workdir and not keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
