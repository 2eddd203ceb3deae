import base64
import secrets
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pki import InvalidInput, export

from .x509_helpers import make_chain


@pytest.fixture(scope="module")
def chain():
    return make_chain()


def test_pfx_round_trip_with_the_password_gives_key_cert_and_chain(chain):
    password = secrets.token_urlsafe(24).encode()
    blob = export.pfx(chain.device_key, chain.device, [chain.intermediate], password)
    key, cert, extra = pkcs12.load_key_and_certificates(blob, password)
    assert cert == chain.device
    assert extra == [chain.intermediate]
    assert key.private_numbers() == chain.device_key.private_numbers()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(blob, b"wrong-password-123")


def test_pfx_uses_pbes2_aes256_with_2048_rounds_as_openssl_reads_it(chain, tmp_path):
    password = secrets.token_urlsafe(24)
    (tmp_path / "d.pfx").write_bytes(export.pfx(chain.device_key, chain.device, [chain.intermediate],
                                                password.encode()))
    result = subprocess.run(["openssl", "pkcs12", "-info", "-noout", "-in", str(tmp_path / "d.pfx"),
                             "-passin", "env:PFXPASS"], capture_output=True, text=True,
                            env={"PFXPASS": password, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "PBES2, PBKDF2, AES-256-CBC, Iteration 2048" in result.stderr
    assert "MAC: sha256, Iteration 2048" in result.stderr


def test_pfx_refuses_a_short_password(chain):
    with pytest.raises(InvalidInput, match="password: must be at least 16 bytes"):
        export.pfx(chain.device_key, chain.device, [chain.intermediate], b"short")


def test_chain_pem_keeps_leaf_first(chain):
    certs = x509.load_pem_x509_certificates(export.chain_pem([chain.device, chain.intermediate]))
    assert certs == [chain.device, chain.intermediate]


def test_key_pem_is_pkcs8_and_encrypted_when_asked(chain):
    pkcs8 = chain.device_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    plain = export.key_pem(chain.device_key)
    assert base64.b64decode(b"".join(plain.splitlines()[1:-1])) == pkcs8  # PKCS#8, not the SEC1 "EC" form
    encrypted = export.key_pem(chain.device_key, b"correct horse battery")
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(encrypted, None)
    loaded = serialization.load_pem_private_key(encrypted, b"correct horse battery")
    assert loaded.private_numbers() == chain.device_key.private_numbers()


def test_thumbprints_match_openssl(chain):
    result = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha1"],
                            input=export.cert_pem(chain.device).decode(),
                            capture_output=True, check=True, text=True)
    assert result.stdout.strip().split("=", 1)[1].replace(":", "") == export.thumbprints(chain.device)["sha1"]
