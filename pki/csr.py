"""Accepting a device's certificate signing request.

The CSR only proves possession of a key and names the device; the profile decides every
extension, so requested extensions are ignored (never copied).
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from .errors import InvalidCsr, InvalidInput
from .keys import MIN_RSA_BITS, RSA_PUBLIC_EXPONENT, KeyType, PublicKey, describe
from .pem import load_csr

# SHA-1 signatures are refused (NIST SP 800-131A: disallowed for digital signature generation); MD5 long before.
_SIGNATURE_HASHES = frozenset({"sha256", "sha384", "sha512"})

CSR_KEY_TYPES = (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096)


def accept_csr(data: bytes | str | x509.CertificateSigningRequest, device_id: str, *, field: str = "csr") -> PublicKey:
    """The public key of a CSR that may be issued for ``device_id``; ``InvalidCsr`` saying why not."""
    csr = data if isinstance(data, x509.CertificateSigningRequest) else load_csr(data, field=field)
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidCsr(field, f"unsupported public key ({exc})") from None
    try:
        KeyType.of(public_key)
    except InvalidInput as exc:
        allowed = f"EC P-256/P-384 or RSA >= {MIN_RSA_BITS} bits"
        raise InvalidCsr(field, f"key {describe(public_key)} is not allowed ({exc.reason}); use {allowed}") from None
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.public_numbers().e != RSA_PUBLIC_EXPONENT:
        # CA/Browser Forum BR 6.1.6 and NIST SP 800-89 ask for an odd e >= 65537; 65537 is what every key here has
        raise InvalidCsr(field, f"RSA public exponent {public_key.public_numbers().e} is not allowed; only "
                         f"{RSA_PUBLIC_EXPONENT}")
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None or algorithm.name not in _SIGNATURE_HASHES:
        name = {"sha1": "SHA-1", "md5": "MD5"}.get(algorithm.name, algorithm.name.upper()) if algorithm else \
            "an unknown algorithm"
        raise InvalidCsr(field, f"is signed with {name}, which is refused as weak or unknown; sign it with "
                         "SHA-256, SHA-384 or SHA-512")
    if not csr.is_signature_valid:
        raise InvalidCsr(field, "signature does not verify: the request was altered or not signed by its key")
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        raise InvalidCsr(field, f"subject must have exactly one CN, found {len(common_names)}")
    common_name = common_names[0].value
    if common_name != device_id:
        raise InvalidCsr(field, f"subject CN {common_name!r} does not match deviceId {device_id!r}")
    return public_key


def key_digest(data: bytes | str) -> bytes | None:
    """A short digest of the CSR's public key (its SubjectPublicKeyInfo), to find two requests for one key; ``None``
    for a request that cannot be read (its row fails on its own, with the reason)."""
    try:
        spki = load_csr(data).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (InvalidInput, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return hashlib.blake2b(spki, digest_size=16).digest()


def device_csr(device_id: str, key) -> bytes:
    """A PKCS#10 request (DER) for ``device_id`` (the CN) with ``key``, signed with SHA-256 (the curve's hash for
    P-384): what a device sends to renew (``pkiRenewal.csr``)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    digest = hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384 \
        else hashes.SHA256()
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])).sign(key, digest).public_bytes(Encoding.DER)
