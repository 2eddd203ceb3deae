import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pki import InvalidCsr, profiles
from pki.csr import accept_csr
from pki.keys import KeyType, generate_key

from .x509_helpers import NOW, assert_device_cert, break_signature, make_chain, make_csr, remote


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
