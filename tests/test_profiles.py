import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from pki import InvalidInput, InvalidRegistrationId, export, profiles
from pki.keys import KeyType, generate_key

from .x509_helpers import NOW, assert_ca_cert, assert_device_cert, cn, make_chain, openssl_verify, remote


@pytest.mark.parametrize("root_type, intermediate_type, device_type", [
    (KeyType.EC_P384, KeyType.EC_P256, KeyType.EC_P256),
    (KeyType.EC_P256, KeyType.EC_P384, KeyType.EC_P384),
    (KeyType.RSA_3072, KeyType.RSA_2048, KeyType.RSA_2048),
    (KeyType.RSA_4096, KeyType.EC_P256, KeyType.RSA_3072),
])
def test_every_profile_is_right_and_openssl_strict_accepts_the_chain(root_type, intermediate_type, device_type):
    chain = make_chain(root_type=root_type, intermediate_type=intermediate_type, device_type=device_type)
    assert_ca_cert(chain.root, issuer=None, path_length=None)
    assert_ca_cert(chain.intermediate, issuer=chain.root, path_length=0)
    assert_device_cert(chain.device, device_id="device-001", issuer=chain.intermediate)
    result = openssl_verify(chain.root, chain.device, chain.intermediate)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_ec_signatures_use_the_hash_tied_to_the_curve():
    chain = make_chain(root_type=KeyType.EC_P384, intermediate_type=KeyType.EC_P256)
    assert chain.intermediate.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384  # root P-384
    assert chain.device.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256  # intermediate P-256


def test_rsa_pss_declares_salt_equal_to_digest_length_and_verifies():
    chain = make_chain(root_type=KeyType.RSA_3072, intermediate_type=KeyType.RSA_2048, pss=True)
    for cert in (chain.root, chain.intermediate, chain.device):
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
        params = cert.signature_algorithm_parameters
        assert isinstance(params, padding.PSS)
    result = openssl_verify(chain.root, chain.device, chain.intermediate)
    assert result.returncode == 0, result.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=export.cert_pem(chain.device),
                          capture_output=True, check=True).stdout.decode()
    assert "Salt Length: 0x20" in text  # 32 bytes = SHA-256 digest length


def test_intermediate_subject_carries_customer_organization_and_country():
    chain = make_chain(customer_id="acme-gmbh")
    subject = chain.intermediate.subject
    assert cn(chain.intermediate) == "acme-gmbh"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Contoso Ltd"
    assert subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "DE"


def test_device_validity_is_cut_at_the_issuer_and_the_result_says_so():
    chain = make_chain(intermediate_days=100)
    key = generate_key(KeyType.EC_P256)
    issued = profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                                   public_key=key.public_key(), device_id="d1", now=NOW, validity_days=365)
    assert issued.truncated
    assert issued.certificate.not_valid_after_utc == chain.intermediate.not_valid_after_utc
    assert "shortened" in issued.notice and "cannot outlive its issuer" in issued.notice
    full = profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                                 public_key=key.public_key(), device_id="d2", now=NOW, validity_days=30)
    assert not full.truncated and full.notice is None
    assert full.certificate.not_valid_after_utc == NOW + dt.timedelta(days=30)
    assert full.certificate.not_valid_before_utc == NOW - profiles.CLOCK_SKEW


def test_an_expired_issuer_issues_nothing():
    chain = make_chain(intermediate_days=10)
    with pytest.raises(InvalidInput, match="issuer: expired on"):
        profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                              public_key=chain.device_key.public_key(), device_id="d1",
                              now=NOW + dt.timedelta(days=11), validity_days=1)


def test_device_id_is_checked_before_signing():
    chain = make_chain()
    with pytest.raises(InvalidRegistrationId, match="lowercase"):
        profiles.issue_device(issuer=chain.intermediate, issuer_key=remote(chain.intermediate_key),
                              public_key=chain.device_key.public_key(), device_id="Device-1", now=NOW,
                              validity_days=1)


def test_verification_certificate_has_the_code_as_cn_and_is_short_lived():
    chain = make_chain()
    key = generate_key(KeyType.EC_P256)
    cert = profiles.issue_verification(ca=chain.root, ca_key=remote(chain.root_key), public_key=key.public_key(),
                                       code="A1B2C3D4E5F6", now=NOW)
    assert cn(cert) == "A1B2C3D4E5F6"
    cert.verify_directly_issued_by(chain.root)
    assert cert.not_valid_after_utc - NOW == profiles.VERIFICATION_VALIDITY
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(InvalidInput, match="code"):
        profiles.issue_verification(ca=chain.root, ca_key=remote(chain.root_key), public_key=key.public_key(),
                                    code="has space", now=NOW)


@pytest.mark.parametrize("kwargs, message", [
    ({"country": "Germany"}, "country"),
    ({"country": "de"}, "country"),
    ({"organization": "x" * 65}, "organization: must be at most 64"),
    ({"common_name": " "}, "commonName: must not be empty"),
])
def test_bad_subject_parts_name_the_field(kwargs, message):
    key = generate_key(KeyType.EC_P256)
    args = {"key": remote(key), "common_name": "Root", "now": NOW, "validity_days": 10, **kwargs}
    with pytest.raises(InvalidInput, match=message):
        profiles.issue_root(**args)


def test_now_must_be_timezone_aware():
    key = generate_key(KeyType.EC_P256)
    with pytest.raises(ValueError, match="timezone-aware"):
        profiles.issue_root(key=remote(key), common_name="Root", now=dt.datetime(2026, 1, 1), validity_days=1)
