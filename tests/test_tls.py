"""A real TLS 1.2/1.3 handshake: a server trusting only the root must accept device + intermediate
and refuse the device certificate alone - what DPS does with X.509 group attestation."""

import socket
import ssl
import threading

import pytest

from pki import export, profiles
from pki.keys import KeyType, generate_key

from .x509_helpers import make_chain, remote


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    import datetime as dt

    now = dt.datetime.now(dt.UTC)  # the TLS stack checks validity against the real clock
    chain = make_chain(now=now)
    d = tmp_path_factory.mktemp("tls")
    server_key = generate_key(KeyType.EC_P256)
    server = profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                                   public_key=server_key.public_key(), device_id="localhost", now=now,
                                   validity_days=1).certificate
    (d / "root.pem").write_bytes(export.cert_pem(chain.root))
    (d / "server.pem").write_bytes(export.chain_pem([server, chain.intermediate]))
    (d / "server.key").write_bytes(export.key_pem(server_key))
    (d / "device-chain.pem").write_bytes(export.chain_pem([chain.device, chain.intermediate]))
    (d / "device-only.pem").write_bytes(export.cert_pem(chain.device))
    (d / "device.key").write_bytes(export.key_pem(chain.device_key))
    return d


def _handshake(d, client_cert: str) -> tuple[str | None, str | None]:
    """Returns (client CN seen by the server, server-side error)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "server.pem", d / "server.key")
    server_ctx.load_verify_locations(cafile=d / "root.pem")  # trusts only the root
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False  # what is under test is the server's verdict on the client
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.load_cert_chain(d / client_cert, d / "device.key")
    result: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                subject = dict(x[0] for x in tls.getpeercert()["subject"])
                result["cn"] = subject["commonName"]
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            result["error"] = str(exc)
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(2)
    except (ssl.SSLError, OSError):
        pass
    thread.join(timeout=5)
    listener.close()
    return result.get("cn"), result.get("error")


def test_device_with_intermediate_is_accepted_by_a_server_trusting_only_the_root(pki_files):
    cn, error = _handshake(pki_files, "device-chain.pem")
    assert error is None
    assert cn == "device-001"


def test_device_certificate_alone_is_refused(pki_files):
    cn, error = _handshake(pki_files, "device-only.pem")
    assert cn is None
    assert "certificate verify failed" in error or "unable to get local issuer" in error


