import stat

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from clients.local_keystore import LocalKeyStore
from handlers.errors import NotFound
from pki.keys import KeyType
from pki.signing import remote_key

from .x509_helpers import NOW


def test_keys_are_encrypted_at_rest_private_to_the_owner_and_versioned(tmp_path):
    store = LocalKeyStore(tmp_path, b"passphrase-for-tests")
    first = store.create_key("root", KeyType.EC_P384)
    second = store.create_key("root", KeyType.EC_P384)
    assert first.version != second.version
    assert store.get_key("root").version == second.version
    assert store.get_key("root", first.version).public_key.public_numbers() == first.public_key.public_numbers()
    for path in (tmp_path / "root").glob("*.pem"):
        with pytest.raises(TypeError, match="encrypted"):  # unreadable without the passphrase
            serialization.load_pem_private_key(path.read_bytes(), None)
        assert serialization.load_pem_private_key(path.read_bytes(), b"passphrase-for-tests")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_random_passphrase_is_kept_private_when_none_is_given(tmp_path):
    store = LocalKeyStore(tmp_path)
    ref = store.create_key("k", KeyType.EC_P256)
    assert stat.S_IMODE((tmp_path / ".passphrase").stat().st_mode) == 0o600
    assert LocalKeyStore(tmp_path).get_key("k").version == ref.version


def test_wrong_passphrase_is_a_clear_error(tmp_path):
    LocalKeyStore(tmp_path, b"right-passphrase").create_key("k", KeyType.EC_P256)
    with pytest.raises(ValueError, match="LOCAL_KEYSTORE_PASSPHRASE"):
        LocalKeyStore(tmp_path, b"wrong-passphrase").get_key("k")


def test_missing_key_and_bad_names(tmp_path):
    store = LocalKeyStore(tmp_path, b"passphrase-for-tests")
    with pytest.raises(NotFound):
        store.get_key("absent")
    with pytest.raises(ValueError, match="key name"):
        store.create_key("../escape", KeyType.EC_P256)


def test_signs_through_the_key_vault_path(tmp_path):
    from pki import profiles

    store = LocalKeyStore(tmp_path, b"passphrase-for-tests")
    ref = store.create_key("root", KeyType.EC_P256)
    cert = profiles.issue_root(key=remote_key(ref.public_key, store.signer(ref)), common_name="R", now=NOW,
                               validity_days=1)
    cert.verify_directly_issued_by(cert)
    assert cert.signature_hash_algorithm.name == hashes.SHA256().name
