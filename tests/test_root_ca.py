"""The root CA use case with fakes: made once, resumable, safe under concurrency."""


import pytest

from handlers.errors import AlreadyExists, Conflict, NotFound, TransientError
from handlers.root import ROOT_DOCUMENT, load_root
from handlers.root_ca import LEASE, RootRequest, create_root
from handlers.verification_cert import root_verification_certificate
from pki.keys import KeyType

from .fakes import MemoryDocumentStore, run_concurrently
from .worlds import CountingKeys
from .x509_helpers import NOW, assert_ca_cert, cn

REQUEST = RootRequest(key_name="root", key_type=KeyType.EC_P384, validity_years=20, common_name="Contoso Root",
                      organization="Contoso", country="DE")


@pytest.fixture
def keys(tmp_path):
    return CountingKeys(tmp_path / "keys", b"test-passphrase-123")


def test_root_is_created_once_and_loads_back(keys):
    store = MemoryDocumentStore()
    root = create_root(REQUEST, store=store, keys=keys, now=NOW)
    assert_ca_cert(root.certificate, issuer=None, path_length=None)
    assert cn(root.certificate) == "Contoso Root"
    assert root.record["status"] == "active"
    assert load_root(store, keys).certificate == root.certificate
    with pytest.raises(AlreadyExists, match="pass --force"):
        create_root(REQUEST, store=store, keys=keys, now=NOW)
    assert keys.created == 1


def test_force_replaces_the_root_and_keeps_the_old_one_on_record(keys):
    store = MemoryDocumentStore()
    first = create_root(REQUEST, store=store, keys=keys, now=NOW)
    second = create_root(REQUEST, store=store, keys=keys, now=NOW, force=True)
    assert second.certificate != first.certificate
    assert second.key.version != first.key.version
    assert second.record["previous"][0]["summary"]["serial"] == first.record["summary"]["serial"]


def test_an_interrupted_run_frees_its_lease_and_the_next_resumes_with_the_key_it_made(keys):
    store = MemoryDocumentStore()
    keys.fail_signing = 1
    with pytest.raises(ConnectionError):
        create_root(REQUEST, store=store, keys=keys, now=NOW)
    assert store.get(ROOT_DOCUMENT).data["status"] == "key_created"
    assert store.get(ROOT_DOCUMENT).data["lease"] is None
    root = create_root(REQUEST, store=store, keys=keys, now=NOW)
    assert keys.created == 1
    assert root.key.version == store.get(ROOT_DOCUMENT).data["key"]["version"]


def test_a_key_created_by_a_run_that_died_before_recording_it_is_reused(keys):
    store = MemoryDocumentStore()
    store.create(ROOT_DOCUMENT, {"status": "pending", "request": REQUEST.as_dict(), "previous": [],
                                 "createdAt": "x", "updatedAt": "x", "lease": None})
    orphan = keys.create_key("root", KeyType.EC_P384)
    root = create_root(REQUEST, store=store, keys=keys, now=NOW)
    assert root.key.version == orphan.version and keys.created == 1


def test_a_concurrent_run_holding_the_lease_makes_the_next_one_wait(keys):
    store = MemoryDocumentStore()
    store.create(ROOT_DOCUMENT, {"status": "pending", "request": REQUEST.as_dict(), "previous": [],
                                 "createdAt": "x", "updatedAt": "x",
                                 "lease": {"owner": "someone", "until": "2999-01-01T00:00:00Z"}})
    with pytest.raises(TransientError, match="in progress"):
        create_root(REQUEST, store=store, keys=keys, now=NOW)


def test_an_interrupted_run_with_other_parameters_needs_force(keys):
    store = MemoryDocumentStore()
    keys.fail_signing = 1
    with pytest.raises(ConnectionError):
        create_root(REQUEST, store=store, keys=keys, now=NOW)
    other = RootRequest(key_name="root", key_type=KeyType.RSA_3072, validity_years=10, common_name="Other")
    with pytest.raises(Conflict, match="other parameters"):
        create_root(other, store=store, keys=keys, now=NOW)
    root = create_root(other, store=store, keys=keys, now=NOW + LEASE, force=True)
    assert root.key.key_type is KeyType.RSA_3072


def test_concurrent_creations_converge_on_one_root(keys):
    store = MemoryDocumentStore()
    # "made already" or "in progress, retry" are the answers for the others
    results, errors = run_concurrently(lambda: create_root(REQUEST, store=store, keys=keys, now=NOW), 4,
                                       (AlreadyExists, TransientError))
    final = load_root(store, keys)
    assert all(r.certificate == final.certificate for r in results)
    assert len(results) + len(errors) == 4 and results
    assert keys.created == 1


def test_verification_certificate_needs_a_root_and_is_signed_by_it(keys):
    store = MemoryDocumentStore()
    with pytest.raises(NotFound, match="pkictl root create"):
        root_verification_certificate("ABC123", store=store, keys=keys, now=NOW)
    root = create_root(REQUEST, store=store, keys=keys, now=NOW)
    cert = root_verification_certificate("ABC123", store=store, keys=keys, now=NOW)
    assert cn(cert) == "ABC123"
    cert.verify_directly_issued_by(root.certificate)
