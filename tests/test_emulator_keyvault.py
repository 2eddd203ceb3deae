"""The Key Vault emulator, driven by the real ``KeyClient``, ``CryptographyClient`` and ``SecretClient``
over HTTPS with the local principals' real credentials, plus raw requests where the wire itself is the point
(challenge, token checks, RBAC refusals, JWK members)."""

from __future__ import annotations

import hashlib
import re
import time

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
from emulators.identity import STORAGE, VAULT, TokenIssuer
from emulators.stack import ADMIN, APP, OPERATOR

pytestmark = pytest.mark.integration

API_VERSION = "2025-07-01"
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "t")
PUBLIC_JWK_MEMBERS = {"kid", "kty", "key_ops", "crv", "x", "y", "n", "e"}


@pytest.fixture
def options(stack) -> dict:
    # The emulator's challenge names vault.azure.net, not 127.0.0.1; its CA is made at start.
    return {"verify_challenge_resource": False, "connection_verify": str(stack.ca_path)}


@pytest.fixture
def app(credential_of):
    return credential_of(APP)


@pytest.fixture
def keys(stack, options, app):
    with KeyClient(stack.keyvault_url, app, **options) as client:
        yield client


@pytest.fixture
def secrets_client(stack, options, app):
    with SecretClient(stack.keyvault_url, app, **options) as client:
        yield client


@pytest.fixture
def name(request) -> str:
    return re.sub(r"[^0-9a-zA-Z-]", "-", request.node.name)[:100]


def _raw(stack, method: str, path: str, *, token: str | None = None, **kwargs) -> requests.Response:
    """``token`` None: a valid token of the app's identity; "" sends none."""
    if token is None:
        token = stack.issuer.mint(stack.principals[APP], VAULT)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{stack.keyvault_url}{path}", headers=headers, verify=str(stack.ca_path),
                            timeout=10, **kwargs)


def test_a_request_without_a_bearer_token_gets_key_vaults_challenge(stack):
    response = _raw(stack, "GET", f"/keys/anything?api-version={API_VERSION}", token="")
    assert response.status_code == 401
    assert response.json()["error"] == {"code": "Unauthorized",
                                        "message": "AKV10000: Request is missing a Bearer or PoP token."}
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{stack.keyvault.tenant_id}", '
        'resource="https://vault.azure.net"')
    # A valid token passes; then the request is judged on its own.
    assert _raw(stack, "GET", f"/keys/anything?api-version={API_VERSION}").json()["error"]["code"] == "KeyNotFound"
    missing_version = _raw(stack, "GET", "/keys/anything")
    assert missing_version.status_code == 400 and "api-version" in missing_version.json()["error"]["message"]


def _tokens(stack) -> dict[str, str]:
    """Tokens Key Vault must refuse, each for its own reason."""
    app = stack.principals[APP]
    stranger = TokenIssuer(tenant_id=stack.issuer.tenant_id)  # same tenant id, another signing key
    return {
        "garbage": "not-a-jwt",
        "wrong resource (storage)": stack.issuer.mint(app, STORAGE),
        "expired": stack.issuer.mint(app, VAULT, issued_at=1_700_000_000, lifetime_s=600),
        "not yet valid": stack.issuer.mint(app, VAULT, nbf=int(time.time()) + 3600),
        "another tenant": stack.issuer.mint(app, VAULT, iss="https://sts.windows.net/another-tenant/"),
        "forged signature": stranger.mint(app, VAULT),
    }


@pytest.mark.parametrize("case", ["garbage", "wrong resource (storage)", "expired", "not yet valid", "another tenant",
                                  "forged signature"])
def test_key_vault_refuses_a_token_that_is_not_a_valid_vault_token_of_its_tenant_with_401(stack, case):
    # learn.microsoft.com/azure/key-vault/general/authentication-requests-and-responses: 401 plus the challenge
    response = _raw(stack, "GET", f"/keys/anything?api-version={API_VERSION}", token=_tokens(stack)[case])
    assert response.status_code == 401, case
    assert response.json()["error"]["code"] == "Unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization=")
    message = response.json()["error"]["message"]
    expected = {"wrong resource (storage)": "AKV10022: Invalid audience. Expected https://vault.azure.net, found: "
                                            "https://storage.azure.com.",
                "another tenant": "AKV10032: Invalid issuer."}
    assert message.startswith(expected.get(case, "")), message


def test_a_principal_without_a_role_for_the_action_gets_403_forbidden_by_rbac(stack, credential_of, options, keys,
                                                                                 name):
    # Quoted in Azure/azure-sdk-for-js#31374: Forbidden / ForbiddenByRbac, naming the caller, action and resource.
    key = keys.create_ec_key(name, curve="P-256")
    operator = stack.principals[OPERATOR]
    with CryptographyClient(key.id, credential_of(OPERATOR), **options) as crypto, \
            pytest.raises(HttpResponseError) as refused:
        crypto.sign("ES256", hashlib.sha256(b"x").digest())
    assert refused.value.status_code == 403 and refused.value.error.code == "Forbidden"
    assert refused.value.error.innererror == {"code": "ForbiddenByRbac"}
    message = refused.value.error.message
    assert f"Caller: appid={operator.client_id};oid={operator.object_id};iss={stack.issuer.issuer}" in message
    assert "Action: 'Microsoft.KeyVault/vaults/keys/sign/action'" in message
    assert f"/providers/microsoft.keyvault/vaults/pkilocal/keys/{name.lower()}'" in message
    with KeyClient(stack.keyvault_url, credential_of(OPERATOR), **options) as operator_keys:
        assert operator_keys.get_key(name).id == key.id  # Key Vault Reader: keys/read
        with pytest.raises(HttpResponseError) as create:
            operator_keys.create_ec_key(f"{name}-op", curve="P-256")
    assert create.value.status_code == 403 and "keys/create/action" in create.value.error.message
    with SecretClient(stack.keyvault_url, credential_of(ADMIN), **options) as admin_secrets, \
            pytest.raises(HttpResponseError) as secret:
        admin_secrets.get_secret("anything")
    assert secret.value.status_code == 403 and "secrets/getSecret/action" in secret.value.error.message


class RecordingCredential:
    def __init__(self, inner):
        self.inner = inner
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, tenant_id: str | None = None, **kwargs) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        return self.inner.get_token(*scopes)


def test_the_sdk_is_challenged_first_then_sends_a_token_for_the_challenged_tenant(stack, options, name, app):
    # The SDK caches challenges per host for the whole process; "localhost" (also in the emulator's
    # certificate) is a host no other test uses, so this client's first request is challenged.
    credential, seen = RecordingCredential(app), []
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
def test_signatures_verify_with_the_jwk_public_key(stack, keys, options, name, create, algorithm, hash_name, app):
    key = create(keys, name)
    digest = hashlib.new(hash_name, b"to be signed").digest()
    with CryptographyClient(key.id, app, **options) as crypto:
        result = crypto.sign(algorithm, digest)
    assert result.key_id == key.id
    _verify(public_key_from_jwk(key.key), algorithm, digest, result.signature)


def test_sign_refuses_what_key_vault_refuses(stack, keys, options, name, app):
    key = keys.create_ec_key(name, curve="P-256")
    with CryptographyClient(key.id, app, **options) as crypto:
        with pytest.raises(HttpResponseError) as wrong_length:
            crypto.sign("ES256", hashlib.sha384(b"x").digest())
        with pytest.raises(HttpResponseError) as wrong_curve:
            crypto.sign("ES384", hashlib.sha384(b"x").digest())
    assert wrong_length.value.status_code == 400 and wrong_length.value.error.code == "BadParameter"
    assert "Invalid length of 'value': 48 bytes. ES256 requires 32 bytes" in wrong_length.value.message
    assert wrong_curve.value.status_code == 400
    verify_only = keys.create_ec_key(f"{name}-v", curve="P-256", key_operations=["verify"])
    with CryptographyClient(verify_only.id, app, **options) as crypto, \
            pytest.raises(HttpResponseError) as forbidden:
        crypto.sign("ES256", hashlib.sha256(b"x").digest())
    assert forbidden.value.status_code == 403
    disabled = keys.create_ec_key(f"{name}-d", curve="P-256", enabled=False)
    with CryptographyClient(disabled.id, app, **options) as crypto, pytest.raises(HttpResponseError) as refused:
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


def test_the_root_vault_is_another_vault_with_its_own_role_assignments(stack, credential_of, options, keys, name):
    """Two vaults, as docs/deploy.md makes them: a key in one is not in the other, and the app, Crypto Officer in
    the intermediates' vault, holds only the custom get + sign role in the root vault."""
    keys.create_ec_key(name, curve="P-256")
    with KeyClient(stack.rootvault_url, credential_of(ADMIN), **options) as admin_root:
        with pytest.raises(ResourceNotFoundError):
            admin_root.get_key(name)
        root = admin_root.create_ec_key(name, curve="P-384")  # Crypto Officer on the root vault
    assert root.id.startswith(stack.rootvault_url + "/keys/")
    with KeyClient(stack.rootvault_url, credential_of(APP), **options) as app_root:
        assert app_root.get_key(name).id == root.id
        with pytest.raises(HttpResponseError) as refused:
            app_root.create_ec_key(name, curve="P-384")
    assert refused.value.status_code == 403 and refused.value.error.innererror == {"code": "ForbiddenByRbac"}
    assert "Action: 'Microsoft.KeyVault/vaults/keys/create/action'" in refused.value.error.message
    assert "Vault: pkilocal-root;" in refused.value.error.message
    with CryptographyClient(root.id, credential_of(APP), **options) as crypto:
        assert len(crypto.sign("ES384", hashlib.sha384(b"x").digest()).signature) == 96
    with SecretClient(stack.rootvault_url, credential_of(APP), **options) as app_root_secrets, \
            pytest.raises(HttpResponseError) as secret:
        app_root_secrets.set_secret(name, "no secrets in the root vault")
    assert secret.value.status_code == 403 and "secrets/setSecret/action" in secret.value.error.message


def test_the_files_holding_keys_and_sas_are_written_owner_only(stack, tmp_path):
    import json
    import stat

    from devhost.stack import write_local_settings
    from emulators.stack import write_private

    described = stack.state_dir / "emulators.json"  # the emulators' SAS keys
    assert stat.S_IMODE(described.stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o700
    assert json.loads(described.read_text())["rootKeyVaultUrl"] == stack.rootvault_url
    for write in (lambda path: write_private(path, "{}"), lambda path: write_local_settings({}, path)):
        path = tmp_path / "left-by-an-older-run.json"
        path.write_text("{}")
        path.chmod(0o644)
        write(path)  # rewritten, and narrowed
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.unlink()
        write(path)  # made
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.unlink()


def test_the_rate_cap_counts_admitted_requests_over_any_window_as_key_vault_documents_its_limits():
    """service-limits: "transactions allowed in 10 seconds, per vault per region" (window_s, here scaled down
    to 0.3 s); any window, not clock-aligned ones, is the stricter reading. overview-throttling: "Failed requests
    that return a 429 do not count towards the throttle limits"."""
    from emulators.core import FaultGate, Faults

    gate = FaultGate(Faults(rate_per_s=10, window_s=0.3, retry_after=False))
    assert [gate.check() is None for _ in range(4)] == [True, True, True, False]  # 3 per any 0.3 s
    refused = gate.check()
    assert refused.status == 429 and "Retry-After" not in refused.headers
    assert gate.stats["throttled"] == 2
    time.sleep(0.32)  # the three admitted leave the window; the refused ones never counted
    assert [gate.check() is None for _ in range(4)] == [True, True, True, False]


def test_the_burst_reading_caps_each_100ms_window():
    from emulators.core import FaultGate, Faults

    gate = FaultGate(Faults(rate_per_s=50))  # window_s 0: 5 per 100 ms
    assert sum(gate.check() is None for _ in range(8)) == 5


def test_a_standard_vault_refuses_hsm_keys_as_key_vault_does(keys, name):
    """kty EC-HSM / RSA-HSM need a premium vault: Key Vault answers 403 "Hardware key operation not allowed on
    standard vault" (az keyvault key create --kty RSA-HSM on a standard vault: MicrosoftDocs/azure-docs#63888)."""
    for create in (lambda: keys.create_ec_key(name, hardware_protected=True),
                   lambda: keys.create_rsa_key(name, hardware_protected=True)):
        with pytest.raises(HttpResponseError) as refused:
            create()
        assert refused.value.status_code == 403
        assert "Hardware key operation not allowed on standard vault" in str(refused.value)
    with pytest.raises(ResourceNotFoundError):
        keys.get_key(name)


def test_the_app_told_to_make_hsm_keys_in_a_standard_vault_says_it_is_a_configuration_error(stack, app, name):
    """Not "your identity lacks a role" (a 403 usually means that): the setting and the vault's tier, named."""
    from clients.keyvault import KeyVaultKeyStore
    from handlers.errors import Rejected
    from pki.keys import KeyType

    store = KeyVaultKeyStore(stack.keyvault_url, app, connection_verify=str(stack.ca_path),
                             verify_challenge_resource=False, hardware_protected=True)
    try:
        with pytest.raises(Rejected) as refused:
            store.create_key(name[:100], KeyType.EC_P256)
    finally:
        store.close()
    assert "KEY_VAULT_KEY_PROTECTION=hsm needs a premium vault" in refused.value.reason


def test_a_premium_vault_holds_hsm_keys_and_the_app_makes_them_when_told(fresh_stack, name):
    """KEY_VAULT_KEY_PROTECTION=hsm (infra: a premium vault): the app's key store creates EC-HSM / RSA-HSM keys,
    whose JWK says so, and signs with them."""
    from azure.identity import ManagedIdentityCredential

    from clients.keyvault import KeyVaultKeyStore
    from pki.keys import KeyType

    with fresh_stack(vault_sku="premium") as premium:
        app = ManagedIdentityCredential(client_id=premium.client_id(APP))  # that stack's identity endpoint
        store = KeyVaultKeyStore(premium.keyvault_url, app, connection_verify=str(premium.ca_path),
                                 verify_challenge_resource=False, hardware_protected=True)
        try:
            for key_type, kty in ((KeyType.EC_P256, "EC-HSM"), (KeyType.RSA_2048, "RSA-HSM")):
                ref = store.create_key(f"{name[:60]}-{key_type.value}", key_type)
                with KeyClient(premium.keyvault_url, app, verify_challenge_resource=False,
                               connection_verify=str(premium.ca_path)) as client:
                    assert client.get_key(ref.name).key.kty == kty
                algorithm = "ES256" if key_type.is_ec else "RS256"
                digest = hashlib.sha256(b"hsm").digest()
                signature = store.signer(ref)(algorithm, digest)
                assert signature
        finally:
            store.close()


def test_hsm_keys_halve_the_sign_budget():
    """service-limits: HSM EC / RSA-2048 keys sign 2,000 per 10 s per vault against 4,000 for software keys."""
    from clients.keyvault import sign_rate
    from pki.keys import KeyType

    assert sign_rate(KeyType.EC_P256, 100) == 100
    assert sign_rate(KeyType.EC_P256, 100, hardware_protected=True) == 50
    assert sign_rate(KeyType.RSA_4096, 100, hardware_protected=True) == 100 * 500 / 4000 / 2
