import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pki import InvalidCsr, profiles
from pki.csr import accept_csr
from pki.keys import KeyType, generate_key

from .x509_helpers import NOW, assert_device_cert, make_chain, remote


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


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072])
def test_good_csrs_are_accepted(key_type):
    key = generate_key(key_type)
    public_key = accept_csr(make_csr(key=key), "device-001")
    assert public_key.public_numbers() == key.public_key().public_numbers()


def test_requested_extensions_are_ignored_the_profile_decides():
    csr = make_csr(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
    chain = make_chain()
    public_key = accept_csr(csr, "device-001")
    cert = profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                                 public_key=public_key, device_id="device-001", now=NOW, validity_days=30).certificate
    assert_device_cert(cert, device_id="device-001", issuer=chain.intermediate)


@pytest.mark.parametrize("make, message", [
    (lambda: break_signature(make_csr()), "signature does not verify"),
    (lambda: make_csr("device-002"), "subject CN 'device-002' does not match deviceId 'device-001'"),
    (lambda: make_csr(key=rsa.generate_private_key(65537, 1024)), "RSA-1024 is not allowed"),
    (lambda: make_csr(key=ec.generate_private_key(ec.SECP521R1())), "EC P-521 is not allowed"),
    (lambda: make_csr(names=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]), "exactly one CN, found 0"),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
     "malformed certificate request"),
    (lambda: b"", "is empty"),
    (lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "expected '-----BEGIN CERTIFICATE REQUEST"),
])
def test_bad_csrs_say_why(make, message):
    with pytest.raises(InvalidCsr) as caught:
        accept_csr(make(), "device-001", field="rows[3].csr")
    assert message in str(caught.value)
    assert str(caught.value).startswith("rows[3].csr: ")
