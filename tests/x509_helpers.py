"""What a good certificate of each profile is, said once; plus a chain factory and openssl checks."""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import export, profiles
from pki.keys import KeyType, PrivateKey, generate_key
from pki.signing import remote_key, software_signer

NOW = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _assert_ski_aki(cert: x509.Certificate, issuer: x509.Certificate | None) -> None:
    ski = ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    if issuer is not None:
        aki = ext(cert, x509.AuthorityKeyIdentifier)
        assert not aki.critical
        assert aki.value.key_identifier == ext(issuer, x509.SubjectKeyIdentifier).value.digest


def _assert_serial(cert: x509.Certificate) -> None:
    assert 0 < cert.serial_number < 2 ** 159
    assert len(cert.serial_number.to_bytes(20, "big").lstrip(b"\0")) <= 20


def assert_ca_cert(cert: x509.Certificate, *, issuer: x509.Certificate | None, path_length: int | None) -> None:
    """A CA certificate: CA:true (pathLen as given) and keyCertSign+cRLSign, both critical; SKI (AKI if issued)."""
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == path_length
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    _assert_ski_aki(cert, issuer)
    _assert_serial(cert)
    cert.verify_directly_issued_by(issuer or cert)


def assert_device_cert(cert: x509.Certificate, *, device_id: str, issuer: x509.Certificate) -> None:
    """A device certificate: CN = id, CA:false, digitalSignature (critical), clientAuth, SKI, AKI, within issuer."""
    assert cn(cert) == device_id
    assert len(cert.subject) == 1
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _assert_ski_aki(cert, issuer)
    _assert_serial(cert)
    assert cert.issuer == issuer.subject
    assert cert.not_valid_after_utc <= issuer.not_valid_after_utc
    assert cert.not_valid_before_utc >= issuer.not_valid_before_utc
    cert.verify_directly_issued_by(issuer)


@dataclass
class Chain:
    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    intermediate_key: PrivateKey
    device: x509.Certificate
    device_key: PrivateKey


def remote(key: PrivateKey) -> PrivateKey:
    """The stand-in for a software key: every CA signature in tests goes through the Key Vault path."""
    return remote_key(key.public_key(), software_signer(key))


def make_chain(*, device_id: str = "device-001", now: dt.datetime = NOW, root_type: KeyType = KeyType.EC_P384,
               intermediate_type: KeyType = KeyType.EC_P256, device_type: KeyType = KeyType.EC_P256,
               device_days: int = 365, intermediate_days: int = 1825, pss: bool = False,
               customer_id: str = "contoso") -> Chain:
    root_key = generate_key(root_type)
    root = profiles.issue_root(key=remote(root_key), common_name="Test Root CA", now=now, validity_days=3650,
                               pss=pss and not root_type.is_ec)
    intermediate_key = generate_key(intermediate_type)
    intermediate = profiles.issue_intermediate(
        issuer=root, issuer_key=remote(root_key), public_key=intermediate_key.public_key(), customer_id=customer_id,
        organization="Contoso Ltd", country="DE", now=now, validity_days=intermediate_days,
        pss=pss and not root_type.is_ec).certificate
    device_key = generate_key(device_type)
    device = profiles.issue_device(issuer=intermediate, issuer_key=remote(intermediate_key),
                                   public_key=device_key.public_key(), device_id=device_id, now=now,
                                   validity_days=device_days, pss=pss and not intermediate_type.is_ec).certificate
    return Chain(root, root_key, intermediate, intermediate_key, device, device_key)


def write_pem(directory: Path, name: str, *certs: x509.Certificate) -> Path:
    path = directory / name
    path.write_bytes(export.chain_pem(list(certs)))
    return path


def openssl_verify(root: x509.Certificate, leaf: x509.Certificate, *untrusted: x509.Certificate,
                   at: dt.datetime = NOW, purpose: str | None = "sslclient") -> subprocess.CompletedProcess:
    """``openssl verify -x509_strict`` of ``leaf`` against ``root`` with intermediates, at a fixed time."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        args = ["openssl", "verify", "-x509_strict", "-attime", str(int(at.timestamp())),
                "-CAfile", str(write_pem(d, "root.pem", root))]
        if purpose:
            args += ["-purpose", purpose]
        if untrusted:
            args += ["-untrusted", str(write_pem(d, "untrusted.pem", *untrusted))]
        args.append(str(write_pem(d, "leaf.pem", leaf)))
        return subprocess.run(args, capture_output=True, text=True, check=False)


def make_csr(device_id="device-001", key=None, extensions=(), names=None) -> bytes:
    key = key or generate_key(KeyType.EC_P256)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(names if names is not None else [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def break_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature BIT STRING
    return bytes(der)
