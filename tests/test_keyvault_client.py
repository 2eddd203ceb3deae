"""``KeyVaultKeyStore`` and ``KeyVaultSecrets`` against the Key Vault emulator, faults included, plus
the rate limiter and retry policy on their own."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients.keyvault import KeyVaultKeyStore, KeyVaultSecrets
from clients.retry import ThrottlingRetryPolicy, TokenBucket
from handlers.errors import NotFound
from handlers.ports import KeyRef
from pki import profiles
from pki.keys import KeyType
from pki.signing import remote_key

from .x509_helpers import NOW, assert_ca_cert, openssl_verify

pytestmark = pytest.mark.integration

SIGNS = 500
# A batch signs from a pool of workers; 8 stays within the SDK transport's 10 pooled connections.
WORKERS = 8


def _store(stack, **kwargs) -> KeyVaultKeyStore:
    from azure.identity import ManagedIdentityCredential

    from emulators.stack import APP

    return KeyVaultKeyStore(stack.keyvault_url, ManagedIdentityCredential(client_id=stack.client_id(APP)),
                            connection_verify=str(stack.ca_path), verify_challenge_resource=False, **kwargs)


@pytest.fixture
def store(stack):
    store = _store(stack)
    yield store
    store.close()


@pytest.mark.parametrize("key_type", [KeyType.EC_P384, KeyType.RSA_3072], ids=lambda k: k.value)
def test_a_root_signed_in_key_vault_verifies(store, key_type):
    ref = store.create_key(f"root-{key_type.value}", key_type)
    assert (ref.key_type, store.get_key(ref.name)) == (key_type, ref)
    cert = profiles.issue_root(key=remote_key(ref.public_key, store.signer(ref)), common_name="Key Vault Root",
                               now=NOW, validity_days=365)
    assert_ca_cert(cert, issuer=None, path_length=None)
    result = openssl_verify(cert, cert, purpose=None)
    assert result.returncode == 0, result.stderr


def test_versions_and_missing_keys(store):
    first = store.create_key("versioned", KeyType.EC_P256)
    second = store.create_key("versioned", KeyType.EC_P256)
    assert first.version != second.version
    assert store.get_key("versioned") == second
    assert store.get_key("versioned", first.version).public_key.public_numbers() == first.public_key.public_numbers()
    with pytest.raises(NotFound, match="key absent"):
        store.get_key("absent")
    with pytest.raises(NotFound):
        store.get_key("versioned", "0" * 32)
    ghost = KeyRef("versioned", "0" * 32, KeyType.EC_P256, first.public_key)
    with pytest.raises(NotFound):
        store.signer(ghost)("ES256", bytes(32))
    with pytest.raises(ValueError, match="key name"):
        store.create_key("no_underscores", KeyType.EC_P256)


def _sign_many(store: KeyVaultKeyStore, ref: KeyRef, count: int) -> None:
    sign = store.signer(ref)
    digests = [hashlib.sha256(b"%d" % i).digest() for i in range(count)]
    with ThreadPoolExecutor(WORKERS) as pool:
        signatures = list(pool.map(lambda digest: sign("ES256", digest), digests))
    assert len(signatures) == count and all(len(s) == 64 for s in signatures)


@pytest.mark.parametrize("retry_after", [False, True], ids=["no-retry-after", "retry-after"])
def test_signing_rides_out_throttling(stack, store, retry_after):
    """ACCEPTANCE: Key Vault's cap reached, with and without Retry-After, and no sign fails.

    The store keeps its default rate, equal to the cap here: the cap is the vault's, shared with
    other instances, so 429s still come (at window edges, and when retries bunch up)."""
    ref = store.create_key("throttled", KeyType.EC_P256)
    gate = stack.servers["keyvault"].gate
    throttled = gate.stats["throttled"]
    stack.faults("keyvault", rate_per_s=100, retry_after=retry_after)
    _sign_many(store, ref, SIGNS)
    assert gate.stats["throttled"] > throttled  # 429s happened, and every one was retried


def test_signing_rides_out_a_flaky_vault(stack):
    # 30% of requests fail: at most 9 attempts leave 0.3**9 (2e-5) per sign. A short backoff keeps
    # the test quick; the schedule itself is checked below, without a network.
    store = _store(stack, sign_rate_per_s=1000, retry_backoff_factor=0.05)
    try:
        ref = store.create_key("flaky", KeyType.EC_P256)
        gate = stack.servers["keyvault"].gate
        failed = gate.stats["failed_503"]
        stack.faults("keyvault", error_503_fraction=0.3)
        _sign_many(store, ref, SIGNS)
        assert gate.stats["failed_503"] > failed
    finally:
        store.close()


def test_backoff_grows_from_the_first_retry_with_jitter_and_a_ceiling():
    policy = ThrottlingRetryPolicy()
    for failures, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 6: (15, 30), 8: (15, 30)}.items():
        settings = policy.configure_retries({})
        settings["history"] = [None] * failures
        waits = {policy.get_backoff_time(settings) for _ in range(50)}
        assert all(low <= wait <= high for wait in waits) and len(waits) > 1
    assert "POST" in ThrottlingRetryPolicy(retry_post=True).configure_retries({})["methods"]
    assert "POST" not in policy.configure_retries({})["methods"]


def test_token_bucket_spaces_acquisitions_evenly():
    clock = [0.0]
    bucket = TokenBucket(10, clock=lambda: clock[0], sleep=lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    waits = [bucket.acquire() for _ in range(21)]
    assert waits[0] == 0 and clock[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBucket(0)


def test_token_bucket_holds_its_rate_across_threads():
    bucket, start = TokenBucket(500), time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.acquire() for _ in range(25)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - start >= 99 / 500


def test_secrets_round_trip_by_version(stack, credential_of):
    vault = KeyVaultSecrets(stack.keyvault_url, credential_of(), connection_verify=str(stack.ca_path),
                            verify_challenge_resource=False)
    try:
        first = vault.set_secret("batch-password", "first-password")
        second = vault.set_secret("batch-password", "second-password")
        assert first != second
        assert vault.get_secret("batch-password") == "second-password"
        assert vault.get_secret("batch-password", first) == "first-password"
        with pytest.raises(NotFound, match="secret absent"):
            vault.get_secret("absent")
    finally:
        vault.close()


def _settings_of(stack, principal: str, root_key_name: str):
    """A principal's settings for the two vaults, as the app (``app_settings``) and people have them."""
    from settings import load_settings

    return load_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true",
                          "AZURE_CLIENT_ID": stack.client_id(principal), "KEY_VAULT_URL": stack.keyvault_url,
                          "ROOT_CA_KEY_VAULT_URL": stack.rootvault_url, "EMULATOR_CA_PATH": str(stack.ca_path),
                          "ROOT_CA_KEY_NAME": root_key_name})


def test_the_root_key_lives_apart_where_the_app_may_only_read_and_sign_with_it(stack):
    """ACCEPTANCE (issue 15): the root key is the admin's, in the root vault; the app's ``KeyStore`` (the product's
    ``clients.factory.key_store``, real SDK clients and credentials) reads and signs with it there, and the root
    vault refuses it anything else with 403 ForbiddenByRbac, translated to ``NotPermitted``."""
    from azure.identity import ManagedIdentityCredential
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives.hashes import SHA384

    from clients.factory import key_store
    from emulators.stack import ADMIN, APP
    from handlers.errors import NotPermitted

    name = f"pki-root-{int(time.time() * 1000)}"
    admin = key_store(_settings_of(stack, ADMIN, name))
    app = key_store(_settings_of(stack, APP, name))
    try:
        root = admin.create_key(name, KeyType.EC_P384)  # `pkictl root create`, the PKI administrator's ceremony
        assert stack.rootvault.key_versions(name) == [root.version] and stack.keyvault.key_versions(name) == []
        assert app.get_key(name) == root and app.get_key(name.upper(), root.version) == root
        digest = hashlib.sha384(b"an intermediate's TBS").digest()
        signature = app.signer(root)("ES384", digest)
        r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
        root.public_key.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(SHA384())))

        for attempt in (name, name.upper()):  # Key Vault names ignore case: routed (and refused) alike
            with pytest.raises(NotPermitted, match=r"HTTP 403 Forbidden/ForbiddenByRbac.*keys/create/action.*"
                                                   r"vaults/pkilocal-root/keys/"):
                app.create_key(attempt, KeyType.EC_P384)
        assert stack.rootvault.key_versions(name) == [root.version]  # no second version

        root_secrets = KeyVaultSecrets(stack.rootvault_url, ManagedIdentityCredential(client_id=stack.client_id(APP)),
                                       connection_verify=str(stack.ca_path), verify_challenge_resource=False)
        try:
            with pytest.raises(NotPermitted, match=r"HTTP 403 Forbidden/ForbiddenByRbac.*secrets/setSecret/action"):
                root_secrets.set_secret("batch-password", "not-here")
        finally:
            root_secrets.close()

        customer = app.create_key("customer-acme-root-apart", KeyType.EC_P256)  # intermediates: the other vault
        assert stack.keyvault.key_versions(customer.name) == [customer.version]
        assert stack.rootvault.key_versions(customer.name) == []
    finally:
        admin.close()
        app.close()
