"""Reading certificates and CSRs from untrusted bytes, with errors that say what is wrong."""

from __future__ import annotations

from cryptography import x509

from .errors import InvalidCsr, InvalidPem

_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_CSR_BEGINS = (b"-----BEGIN CERTIFICATE REQUEST-----", b"-----BEGIN NEW CERTIFICATE REQUEST-----")


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8", "replace") if isinstance(data, str) else data


def load_certificates(data: bytes | str, *, field: str = "certificate") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, or the one certificate of a DER file (in order)."""
    raw = _as_bytes(data)
    if not raw.strip():
        raise InvalidPem(field, "is empty; expected a PEM or DER certificate")
    if _CERT_BEGIN in raw:
        try:
            return x509.load_pem_x509_certificates(raw)
        except ValueError as exc:
            raise InvalidPem(field, f"malformed PEM certificate ({exc})") from None
    if raw.lstrip().startswith(b"-----BEGIN"):
        label = raw.lstrip().split(b"\n", 1)[0].decode("ascii", "replace").strip()
        raise InvalidPem(field, f"expected '-----BEGIN CERTIFICATE-----', found '{label}'")
    try:
        return [x509.load_der_x509_certificate(raw)]
    except ValueError:
        raise InvalidPem(field, "is neither a PEM nor a DER certificate") from None


def load_certificate(data: bytes | str, *, field: str = "certificate") -> x509.Certificate:
    """Exactly one certificate."""
    certs = load_certificates(data, field=field)
    if len(certs) != 1:
        raise InvalidPem(field, f"expected one certificate, found {len(certs)}")
    return certs[0]


def load_csr(data: bytes | str, *, field: str = "csr") -> x509.CertificateSigningRequest:
    """A PKCS#10 request in PEM (or DER); does not check its signature (see ``pki.csr``)."""
    raw = _as_bytes(data)
    if not raw.strip():
        raise InvalidCsr(field, "is empty; expected a PEM certificate request")
    try:
        if any(begin in raw for begin in _CSR_BEGINS):
            return x509.load_pem_x509_csr(raw.replace(b"NEW CERTIFICATE REQUEST", b"CERTIFICATE REQUEST"))
        if raw.lstrip().startswith(b"-----BEGIN"):
            raise InvalidCsr(field, "expected '-----BEGIN CERTIFICATE REQUEST-----'")
        return x509.load_der_x509_csr(raw)
    except ValueError as exc:
        if isinstance(exc, InvalidCsr):
            raise
        raise InvalidCsr(field, f"malformed certificate request ({exc})") from None
