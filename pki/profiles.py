"""Certificate profiles: root CA, customer intermediate, device, verification (proof of possession).

Everything here is pure: callers pass ``now``, the issuer's certificate and a signer (any
``cryptography`` private key, including the stand-ins of ``pki.signing``). The extension set of
each profile follows DESIGN.md section 3 and RFC 5280 section 4.2.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .countries import ISO_3166_ALPHA2
from .errors import InvalidInput
from .ids import check_registration_id
from .keys import PrivateKey, PublicKey
from .signing import signature_hash

# Backdate notBefore a little so a device whose clock runs behind still accepts a fresh
# certificate (the usual CA practice; Let's Encrypt backdates by one hour).
CLOCK_SKEW = dt.timedelta(minutes=5)
# A proof-of-possession certificate is uploaded within minutes of being made; DPS and IoT Hub
# only check its CN and signature, so it should not outlive the verification code.
VERIFICATION_VALIDITY = dt.timedelta(days=2)
# X.520 ub-common-name / ub-organization-name.
MAX_NAME_LENGTH = 64


@dataclass(frozen=True)
class Issued:
    """A certificate and what was asked of it: a validity cut at the issuer's notAfter is said, never silent."""

    certificate: x509.Certificate
    requested_not_after: dt.datetime

    @property
    def truncated(self) -> bool:
        return self.certificate.not_valid_after_utc < self.requested_not_after

    @property
    def notice(self) -> str | None:
        if not self.truncated:
            return None
        return (
            f"validity shortened to {self.certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"(requested {self.requested_not_after:%Y-%m-%dT%H:%M:%SZ}): a certificate cannot outlive its issuer"
        )


def new_serial() -> int:
    """A positive serial of up to 159 random bits from the OS CSPRNG (RFC 5280 4.1.2.2: <= 20 octets;
    CA/B Forum: >= 64 bits of entropy). Never time-based: bulk batches would collide."""
    return x509.random_serial_number()


def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def _check_days(validity_days: int, field: str) -> dt.timedelta:
    if not isinstance(validity_days, int) or isinstance(validity_days, bool):
        raise TypeError(f"{field} must be an int, not {type(validity_days).__name__}")
    if validity_days < 1:
        raise InvalidInput(field, f"must be at least 1 day, got {validity_days}")
    return dt.timedelta(days=validity_days)


def _text(value: str, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value:
        raise InvalidInput(field, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(field, f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    if any(ord(c) < 0x20 for c in value):
        raise InvalidInput(field, "must not contain control characters")
    return value


def build_name(common_name: str, *, organization: str | None = None, country: str | None = None,
               field: str = "commonName") -> x509.Name:
    """Subject name ``C, O, CN`` (most significant first), each part checked."""
    attributes = []
    if country is not None:
        if not isinstance(country, str) or country not in ISO_3166_ALPHA2:
            raise InvalidInput("country", f"{country!r} is not an ISO 3166 alpha-2 code such as 'DE'")
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, _text(organization, "organization")))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, _text(common_name, field)))
    return x509.Name(attributes)


def _validity(issuer: x509.Certificate | None, now: dt.datetime,
              lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    not_before = now - CLOCK_SKEW
    requested = now + lifetime
    not_after = requested
    if issuer is not None:
        if issuer.not_valid_after_utc <= now:
            raise InvalidInput("issuer", f"expired on {issuer.not_valid_after_utc:%Y-%m-%d}; renew it before issuing")
        if issuer.not_valid_before_utc > now:
            raise InvalidInput("issuer", f"not valid before {issuer.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
        not_before = max(not_before, issuer.not_valid_before_utc)
        not_after = min(requested, issuer.not_valid_after_utc)
    return not_before, not_after, requested


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _sign(builder: x509.CertificateBuilder, key: PrivateKey, pss: bool) -> x509.Certificate:
    """Sign with the hash tied to the key; RSA-PSS declares salt = digest length (Key Vault's PS256)."""
    hash_algorithm = signature_hash(key.public_key())
    if pss:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InvalidInput("pss", "RSA-PSS needs an RSA issuer key")
        return builder.sign(key, hash_algorithm, rsa_padding=padding.PSS(
            mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.DIGEST_LENGTH))
    return builder.sign(key, hash_algorithm)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _end_entity_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def issue_root(*, key: PrivateKey, common_name: str, now: dt.datetime, validity_days: int,
               organization: str | None = None, country: str | None = None, pss: bool = False) -> x509.Certificate:
    """Self-signed root: CA:true (no path length), keyCertSign+cRLSign, both critical; SKI."""
    now = _check_now(now)
    not_before, not_after, _ = _validity(None, now, _check_days(validity_days, "validityDays"))
    name = build_name(common_name, organization=organization, country=country)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public_key).serial_number(new_serial())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
    )
    return _sign(builder, key, pss)


def issue_intermediate(*, issuer: x509.Certificate, issuer_key: PrivateKey, public_key: PublicKey,
                       customer_id: str, now: dt.datetime, validity_days: int,
                       organization: str | None = None, country: str | None = None, pss: bool = False) -> Issued:
    """Customer intermediate: CA:true with pathLen 0 (it signs devices only), keyCertSign+cRLSign, SKI, AKI."""
    now = _check_now(now)
    not_before, not_after, requested = _validity(issuer, now, _check_days(validity_days, "validityDays"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(build_name(customer_id, organization=organization, country=country, field="customerId"))
        .issuer_name(issuer.subject).public_key(public_key).serial_number(new_serial())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    return Issued(_sign(builder, issuer_key, pss), requested)


def issue_device(*, issuer: x509.Certificate, issuer_key: PrivateKey, public_key: PublicKey, device_id: str,
                 now: dt.datetime, validity_days: int, pss: bool = False) -> Issued:
    """Device: CA:false, digitalSignature (critical), clientAuth, SKI, AKI, CN = registration id."""
    now = _check_now(now)
    check_registration_id(device_id)
    not_before, not_after, requested = _validity(issuer, now, _check_days(validity_days, "validityDays"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(issuer.subject).public_key(public_key).serial_number(new_serial())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_end_entity_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    return Issued(_sign(builder, issuer_key, pss), requested)


def issue_verification(*, ca: x509.Certificate, ca_key: PrivateKey, public_key: PublicKey, code: str,
                       now: dt.datetime, pss: bool = False) -> x509.Certificate:
    """Proof of possession for DPS / IoT Hub CA upload: CN = verification code, signed by the CA, short-lived."""
    now = _check_now(now)
    code = _text(code, "code")
    if not code.isprintable() or " " in code:
        raise InvalidInput("code", "must be the verification code shown by DPS, without spaces")
    not_before, not_after, _ = _validity(ca, now, VERIFICATION_VALIDITY)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]))
        .issuer_name(ca.subject).public_key(public_key).serial_number(new_serial())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_end_entity_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    return _sign(builder, ca_key, pss)
