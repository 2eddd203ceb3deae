"""Export formats: PEM certificate and chain, PKCS#8 key, PKCS#12 (PFX) with the chain."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .errors import InvalidInput
from .keys import PrivateKey

# The PFX password is random (>= 128 bits) per batch, so PBKDF2 rounds add no security against
# guessing; 2,048 rounds opens about 5x faster than BestAvailableEncryption's 20,000 (DESIGN.md 3).
PFX_KDF_ROUNDS = 2048
MIN_PFX_PASSWORD_LENGTH = 16


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def chain_pem(certs: list[x509.Certificate]) -> bytes:
    """Concatenated PEM, in the given order: leaf first, then each issuer (RFC 8446 4.4.2)."""
    return b"".join(cert_pem(c) for c in certs)


def key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a password is given."""
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def pfx(key: PrivateKey, cert: x509.Certificate, chain: list[x509.Certificate], password: bytes,
        *, friendly_name: str | None = None) -> bytes:
    """PKCS#12 with key, certificate and chain: PBES2 (PBKDF2-SHA256, AES-256-CBC), HMAC-SHA256."""
    if not isinstance(password, bytes):
        raise TypeError(f"password must be bytes, not {type(password).__name__}")
    if len(password) < MIN_PFX_PASSWORD_LENGTH:
        raise InvalidInput("password", f"must be at least {MIN_PFX_PASSWORD_LENGTH} bytes (a random one)")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(PFX_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    name = (friendly_name or cert.subject.rfc4514_string()).encode()
    return pkcs12.serialize_key_and_certificates(name, key, cert, chain or None, encryption)


def thumbprints(cert: x509.Certificate) -> dict[str, str]:
    """SHA-1 (what Azure portals show) and SHA-256 thumbprints of the DER encoding, upper-case hex."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"sha1": hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - a thumbprint, as Azure shows it
            "sha256": hashlib.sha256(der).hexdigest().upper()}


def summary(cert: x509.Certificate) -> dict[str, str]:
    """The facts an operator asks about a certificate, as JSON-ready strings."""
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "X"),
        "notBefore": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thumbprintSha1": thumbprints(cert)["sha1"],
        "thumbprintSha256": thumbprints(cert)["sha256"],
    }
