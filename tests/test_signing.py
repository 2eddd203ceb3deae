"""The stand-in keys: Key Vault's output formats in, valid X.509 signatures out."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from pki import SigningError, profiles
from pki.keys import KeyType, generate_key
from pki.signing import RemoteEcKey, remote_key, software_signer

from .x509_helpers import NOW, openssl_verify


def _root(key, **kwargs):
    return profiles.issue_root(key=key, common_name="Root", now=NOW, validity_days=30, **kwargs)


@pytest.mark.parametrize("key_type, algorithm, size", [(KeyType.EC_P256, "ES256", 64), (KeyType.EC_P384, "ES384", 96)])
def test_software_signer_returns_raw_r_and_s_like_key_vault(key_type, algorithm, size):
    key = generate_key(key_type)
    hash_algorithm = hashes.SHA256() if size == 64 else hashes.SHA384()
    digest = hashes.Hash(hash_algorithm)
    digest.update(b"tbs")
    raw = software_signer(key)(algorithm, digest.finalize())
    assert len(raw) == size
    half = size // 2
    der = utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    key.public_key().verify(der, b"tbs", ec.ECDSA(hash_algorithm))


def test_stand_in_converts_raw_signatures_so_verifiers_accept_the_certificate():
    key = generate_key(KeyType.EC_P256)
    cert = _root(remote_key(key.public_key(), software_signer(key)))
    cert.verify_directly_issued_by(cert)
    assert openssl_verify(cert, cert, purpose=None).returncode == 0


def test_unconverted_der_from_a_signer_is_caught_not_embedded():
    """The silent failure DESIGN.md warns of: a signer returning DER instead of r||s."""
    key = generate_key(KeyType.EC_P256)

    def der_signer(algorithm, digest):
        return key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    with pytest.raises(SigningError, match="r\\|\\|s"):
        _root(RemoteEcKey(key.public_key(), der_signer))


def test_signature_from_another_key_is_caught():
    key, other = generate_key(KeyType.EC_P256), generate_key(KeyType.EC_P256)
    with pytest.raises(SigningError, match="does not verify"):
        _root(remote_key(key.public_key(), software_signer(other)))


def test_hash_is_tied_to_the_curve():
    key = generate_key(KeyType.EC_P256)
    stand_in = remote_key(key.public_key(), software_signer(key))
    with pytest.raises(SigningError, match="ES256 signs with SHA256 only"):
        stand_in.sign(b"data", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(SigningError, match="does not fit"):
        software_signer(key)("ES384", b"\0" * 48)


@pytest.mark.parametrize("pss, algorithm", [(False, "RS256"), (True, "PS256")])
def test_rsa_stand_in_asks_key_vault_for_the_matching_algorithm(pss, algorithm):
    key = generate_key(KeyType.RSA_2048)
    calls = []
    sign = software_signer(key)

    def recording(name, digest):
        calls.append((name, len(digest)))
        return sign(name, digest)

    cert = _root(remote_key(key.public_key(), recording), pss=pss)
    assert calls == [(algorithm, 32)]
    cert.verify_directly_issued_by(cert)


def test_pss_with_another_salt_length_is_refused():
    key = generate_key(KeyType.RSA_2048)
    stand_in = remote_key(key.public_key(), software_signer(key))
    with pytest.raises(SigningError, match="salt length"):
        stand_in.sign(b"x", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
                      hashes.SHA256())


def test_stand_in_never_exports_the_key():
    key = generate_key(KeyType.EC_P256)
    stand_in = remote_key(key.public_key(), software_signer(key))
    with pytest.raises(TypeError, match="cannot be exported"):
        stand_in.private_bytes(None, None, None)
    with pytest.raises(TypeError, match="cannot be exported"):
        stand_in.private_numbers()


def test_remote_key_refuses_other_key_kinds():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(TypeError):
        remote_key(ed25519.Ed25519PrivateKey.generate().public_key(), lambda a, d: b"")


def test_certificates_signed_through_the_stand_in_parse_back():
    key = generate_key(KeyType.EC_P384)
    cert = _root(remote_key(key.public_key(), software_signer(key)))
    again = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    assert again == cert
