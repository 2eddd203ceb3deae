"""The emulators' own CA and server certificate, made fresh at every start (nothing on disk but ca.pem)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import export, profiles
from pki.keys import KeyType, PrivateKey, generate_key


@dataclass(frozen=True)
class ServerIdentity:
    ca: x509.Certificate
    certificate: x509.Certificate
    key: PrivateKey

    @property
    def ca_pem(self) -> bytes:
        return export.cert_pem(self.ca)


def make_server_identity(now: dt.datetime | None = None) -> ServerIdentity:
    """A throwaway CA and a TLS server certificate for 127.0.0.1 / localhost signed by it."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key = generate_key(KeyType.EC_P256)
    ca = profiles.issue_root(key=ca_key, common_name="IoT PKI local emulators CA", now=now, validity_days=30)
    key = generate_key(KeyType.EC_P256)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(profiles.new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ServerIdentity(ca=ca, certificate=certificate, key=key)
