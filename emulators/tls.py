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
    ca_key: PrivateKey  # kept to certify other loopback addresses (for_address); never written anywhere

    @property
    def ca_pem(self) -> bytes:
        return export.cert_pem(self.ca)

    def for_address(self, address: str) -> ServerIdentity:
        """The same CA's certificate for one more loopback address (the DPS MQTT endpoint's own 127.x.y.z)."""
        key = generate_key(KeyType.EC_P256)
        return ServerIdentity(self.ca, _server_certificate(self.ca, self.ca_key, key, address), key, self.ca_key)


def make_server_identity(now: dt.datetime | None = None) -> ServerIdentity:
    """A throwaway CA and a TLS server certificate for 127.0.0.1 / localhost signed by it."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key = generate_key(KeyType.EC_P256)
    ca = profiles.issue_root(key=ca_key, common_name="IoT PKI local emulators CA", now=now, validity_days=30)
    key = generate_key(KeyType.EC_P256)
    return ServerIdentity(ca=ca, certificate=_server_certificate(ca, ca_key, key, "127.0.0.1", now), key=key,
                          ca_key=ca_key)


def _server_certificate(ca: x509.Certificate, ca_key: PrivateKey, key: PrivateKey, address: str,
                        now: dt.datetime | None = None) -> x509.Certificate:
    now = now or dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(profiles.new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(address))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
