"""The Key Vault emulator, driven by the real ``KeyClient``, ``CryptographyClient`` and ``SecretClient``
over HTTPS, plus raw requests where the wire itself is the point (challenge, JWK members)."""

from __future__ import annotations

import hashlib
import re

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from clients.keyvault import public_key_from_jwk
from clients.retry import StaticTokenCredential

pytestmark = pytest.mark.integration

API_VERSION = "2025-07-01"
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "t")
PUBLIC_JWK_MEMBERS = {"kid", "kty", "key_ops", "crv", "x", "y", "n", "e"}


@pytest.fixture
def options(stack) -> dict:
    # The emulator's challenge names vault.azure.net, not 127.0.0.1; its CA is made at start.
    return {"verify_challenge_resource": False, "connection_verify": str(stack.ca_path)}


@pytest.fixture
def keys(stack, options):
    with KeyClient(stack.keyvault_url, StaticTokenCredential(), **options) as client:
        yield client


@pytest.fixture
def secrets_client(stack, options):
    with SecretClient(stack.keyvault_url, StaticTokenCredential(), **options) as client:
        yield client


@pytest.fixture
def name(request) -> str:
    return re.sub(r"[^0-9a-zA-Z-]", "-", request.node.name)[:100]


def _raw(stack, method: str, path: str, *, token: str | None = "any-token", **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{stack.keyvault_url}{path}", headers=headers, verify=str(stack.ca_path),
                            timeout=10, **kwargs)


def test_a_request_without_a_bearer_token_gets_key_vaults_challenge(stack):
    response = _raw(stack, "GET", f"/keys/anything?api-version={API_VERSION}", token=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Unauthorized"
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{stack.keyvault.tenant_id}", '
        'resource="https://vault.azure.net"')
    # Any bearer token passes; then the request is judged on its own.
    assert _raw(stack, "GET", f"/keys/anything?api-version={API_VERSION}").json()["error"]["code"] == "KeyNotFound"
    missing_version = _raw(stack, "GET", "/keys/anything")
    assert missing_version.status_code == 400 and "api-version" in missing_version.json()["error"]["message"]


class RecordingCredential:
    def __init__(self):
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, tenant_id: str | None = None, **kwargs) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        return StaticTokenCredential().get_token(*scopes)


def test_the_sdk_is_challenged_first_then_sends_a_token_for_the_challenged_tenant(stack, options, name):
    # The SDK caches challenges per host for the whole process; "localhost" (also in the emulator's
    # certificate) is a host no other test uses, so this client's first request is challenged.
    credential, seen = RecordingCredential(), []
    url = stack.keyvault_url.replace("127.0.0.1", "localhost")
    with KeyClient(url, credential, **options) as client:
        key = client.create_ec_key(name, curve="P-256", raw_response_hook=lambda response: seen.append(
            (response.http_response.status_code, "Authorization" in response.http_request.headers)))
    assert seen == [(401, False), (200, True)]
    assert credential.requests == [(("https://vault.azure.net/.default",), stack.keyvault.tenant_id)]
    assert key.id.startswith(url + "/keys/")  # ids name the vault URL the client used


@pytest.mark.parametrize("create, kty, shape", [
    (lambda client, name: client.create_ec_key(name, curve="P-256"), "EC", {"crv": "P-256"}),
    (lambda client, name: client.create_ec_key(name, curve="P-384"), "EC", {"crv": "P-384"}),
    (lambda client, name: client.create_rsa_key(name, size=2048), "RSA", {}),
], ids=["ec-p256", "ec-p384", "rsa-2048"])
def test_each_create_makes_a_new_version_and_every_version_stays_readable(stack, keys, name, create, kty, shape):
    first, second = create(keys, name), create(keys, name)
    for key in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", key.properties.version)
        assert key.id == f"{stack.keyvault_url}/keys/{name}/{key.properties.version}"
        assert key.key_type == kty and all(getattr(key.key, k) == v for k, v in shape.items())
        assert key.properties.enabled is True and key.properties.created_on and key.properties.updated_on
        assert key.properties.exportable is False
        assert all(getattr(key.key, member) is None for member in PRIVATE_JWK_MEMBERS)
    assert first.properties.version != second.properties.version
    assert keys.get_key(name).properties.version == second.properties.version
    again = keys.get_key(name, first.properties.version)
    assert public_key_from_jwk(again.key).public_numbers() == public_key_from_jwk(first.key).public_numbers()
    if kty == "RSA":
        assert public_key_from_jwk(first.key).key_size == 2048
    # Key Vault's defaults when key_ops is not given.
    assert first.key_operations == (["sign", "verify"] if kty == "EC" else
                                    ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"])
    # On the wire, not just through the SDK's model: public members only.
    for path in (f"/keys/{name}", f"/keys/{name}/{first.properties.version}"):
        wire = _raw(stack, "GET", f"{path}?api-version={API_VERSION}").json()
        assert set(wire["key"]) <= PUBLIC_JWK_MEMBERS


def _verify(public_key, algorithm: str, digest: bytes, signature: bytes) -> None:
    hash_algorithm = {"256": hashes.SHA256(), "384": hashes.SHA384()}[algorithm[2:]]
    if algorithm.startswith("ES"):
        size = (public_key.key_size + 7) // 8
        assert len(signature) == 2 * size  # raw r||s (RFC 7518 section 3.4), not DER
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        der = utils.encode_dss_signature(r, s)
        public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(hash_algorithm)))
    elif algorithm.startswith("RS"):
        public_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hash_algorithm))
    else:
        public_key.verify(signature, digest, padding.PSS(padding.MGF1(hash_algorithm), padding.PSS.DIGEST_LENGTH),
                          utils.Prehashed(hash_algorithm))


@pytest.mark.parametrize("create, algorithm, hash_name", [
    (lambda client, name: client.create_ec_key(name, curve="P-256"), "ES256", "sha256"),
    (lambda client, name: client.create_ec_key(name, curve="P-384"), "ES384", "sha384"),
    (lambda client, name: client.create_rsa_key(name, size=2048), "RS256", "sha256"),
    (lambda client, name: client.create_rsa_key(name, size=2048), "PS256", "sha256"),
], ids=["es256", "es384", "rs256", "ps256"])
def test_signatures_verify_with_the_jwk_public_key(stack, keys, options, name, create, algorithm, hash_name):
    key = create(keys, name)
    digest = hashlib.new(hash_name, b"to be signed").digest()
    with CryptographyClient(key.id, StaticTokenCredential(), **options) as crypto:
        result = crypto.sign(algorithm, digest)
    assert result.key_id == key.id
    _verify(public_key_from_jwk(key.key), algorithm, digest, result.signature)


def test_sign_refuses_what_key_vault_refuses(stack, keys, options, name):
    key = keys.create_ec_key(name, curve="P-256")
    with CryptographyClient(key.id, StaticTokenCredential(), **options) as crypto:
        with pytest.raises(HttpResponseError) as wrong_length:
            crypto.sign("ES256", hashlib.sha384(b"x").digest())
        with pytest.raises(HttpResponseError) as wrong_curve:
            crypto.sign("ES384", hashlib.sha384(b"x").digest())
    assert wrong_length.value.status_code == 400 and wrong_length.value.error.code == "BadParameter"
    assert "Invalid length of 'value': 48 bytes. ES256 requires 32 bytes" in wrong_length.value.message
    assert wrong_curve.value.status_code == 400
    verify_only = keys.create_ec_key(f"{name}-v", curve="P-256", key_operations=["verify"])
    with CryptographyClient(verify_only.id, StaticTokenCredential(), **options) as crypto:
        with pytest.raises(HttpResponseError) as forbidden:
            crypto.sign("ES256", hashlib.sha256(b"x").digest())
    assert forbidden.value.status_code == 403
    disabled = keys.create_ec_key(f"{name}-d", curve="P-256", enabled=False)
    with CryptographyClient(disabled.id, StaticTokenCredential(), **options) as crypto:
        with pytest.raises(HttpResponseError) as refused:
            crypto.sign("ES256", hashlib.sha256(b"x").digest())
    assert refused.value.status_code == 403


def test_missing_keys_versions_and_bad_input(keys, name):
    with pytest.raises(ResourceNotFoundError) as missing:
        keys.get_key(f"{name}-absent")
    assert missing.value.error.code == "KeyNotFound"
    keys.create_ec_key(name, curve="P-256")
    with pytest.raises(ResourceNotFoundError):
        keys.get_key(name, "0" * 32)
    for bad in (lambda: keys.create_ec_key("not_a_name", curve="P-256"),
                lambda: keys.create_ec_key(name, curve="P-521"),
                lambda: keys.create_rsa_key(name, size=1024)):
        with pytest.raises(HttpResponseError) as refused:
            bad()
        assert refused.value.status_code == 400 and refused.value.error.code == "BadParameter"


def test_keys_never_leave_the_vault(keys, name):
    with pytest.raises(HttpResponseError) as exportable:
        keys.create_ec_key(name, curve="P-256", exportable=True)
    assert exportable.value.status_code == 400
    keys.create_ec_key(name, curve="P-256")
    with pytest.raises(HttpResponseError) as release:
        keys.release_key(name, "attestation-token")
    assert release.value.status_code == 400


def test_secrets_are_versioned_with_their_content_type(secrets_client, name):
    first = secrets_client.set_secret(name, "one", content_type="text/plain")
    second = secrets_client.set_secret(name, "two")
    assert re.fullmatch(r"[0-9a-f]{32}", first.properties.version)
    assert first.properties.version != second.properties.version
    assert secrets_client.get_secret(name).value == "two"
    old = secrets_client.get_secret(name, first.properties.version)
    assert (old.value, old.properties.content_type, old.properties.enabled) == ("one", "text/plain", True)
    with pytest.raises(ResourceNotFoundError) as missing:
        secrets_client.get_secret(f"{name}-absent")
    assert missing.value.error.code == "SecretNotFound"
    with pytest.raises(ResourceNotFoundError):
        secrets_client.get_secret(name, "0" * 32)
    secrets_client.set_secret(name, "three", enabled=False)
    with pytest.raises(HttpResponseError) as disabled:
        secrets_client.get_secret(name)
    assert disabled.value.status_code == 403
