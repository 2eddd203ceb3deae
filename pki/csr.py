"""Accepting a device's certificate signing request.

The CSR only proves possession of a key and names the device; the profile decides every
extension, so requested extensions are ignored (never copied).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import InvalidCsr, InvalidInput
from .keys import MIN_RSA_BITS, KeyType, PublicKey, describe
from .pem import load_csr

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
        allowed = "EC P-256/P-384 or RSA >= %d bits" % MIN_RSA_BITS
        raise InvalidCsr(field, f"key {describe(public_key)} is not allowed ({exc.reason}); use {allowed}") from None
    if not csr.is_signature_valid:
        raise InvalidCsr(field, "signature does not verify: the request was altered or not signed by its key")
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        raise InvalidCsr(field, f"subject must have exactly one CN, found {len(common_names)}")
    common_name = common_names[0].value
    if common_name != device_id:
        raise InvalidCsr(field, f"subject CN {common_name!r} does not match deviceId {device_id!r}")
    return public_key
