"""Azure Key Vault behind the handlers' ports: CA keys that sign without leaving it, and secrets.

The credential is the app's (``clients.identity``), on Azure and against the emulator (``emulators/keyvault.py``)
alike; the emulator also needs ``connection_verify=<the local stack's CA>`` and ``verify_challenge_resource=False``
(its challenge names vault.azure.net, of which 127.0.0.1 is not a subdomain: ``clients.factory``).

Throttling (DESIGN.md section 3). Key Vault allows, per vault and 10 s, 4,000 signs with EC and
RSA-2048 software keys, 1,000 with RSA-3072 and 500 with RSA-4096, and may answer 429 without
Retry-After. azure-core's ``RetryPolicy`` (``azure/core/pipeline/policies/_retry.py``, 1.41) then
gives up on a sign: ``is_retry`` retries a POST only on 500/503/504 or when Retry-After is present,
its backoff is 0 before the first retry and has no jitter, and it allows 3 status retries. Two
things fix that here, both through public means:

- ``ThrottlingRetryPolicy``, a ``RetryPolicy`` subclass passed as ``retry_policy=`` to every SDK client:
  429 is retried for every method (a throttled request was not executed), POST is retried like
  GET for the side-effect-free sign, and the backoff follows Key Vault's guidance (1, 2, 4... s,
  https://learn.microsoft.com/azure/key-vault/general/overview-throttling) with jitter so throttled
  workers do not retry in lockstep. A Retry-After, when sent, still decides the wait.
- a client-side token bucket per key-size class, as a ``per_retry_policies=`` pipeline policy of
  the clients that sign: every attempt, retries included, takes a token, so a batch stays under
  the limit instead of discovering it, and workers woken together by Retry-After are spaced out.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyCurveName, KeyOperation, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from handlers.errors import AlreadyExists, NotPermitted, Rejected
from handlers.ports import KeyRef
from pki.keys import KeyType, PublicKey
from pki.signing import SignFn

from .errors import translated
from .metrics import KEY_VAULT_SIGN_DURATION, KEY_VAULT_SIGNS, KEY_VAULT_THROTTLED
from .retry import AdaptiveBucket, RateLimitPolicy, ThrottlingRetryPolicy
from .signers import SigningPeers, SignInProgress
from .storage import pooled_transport

# A quarter of Key Vault's EC/RSA-2048 sign limit (4,000 per 10 s): the limit is per vault, shared by
# every Functions instance the app scales out to. RSA-3072/4096 get the same fraction of theirs.
DEFAULT_SIGN_RATE_PER_S = 100.0
# Sign limits per vault and 10 s, software keys; HSM keys get half
# (https://learn.microsoft.com/azure/key-vault/general/service-limits, DESIGN.md section 3).
_SIGN_LIMIT_PER_10S = {KeyType.EC_P256: 4000, KeyType.EC_P384: 4000, KeyType.RSA_2048: 4000,
                       KeyType.RSA_3072: 1000, KeyType.RSA_4096: 500}


def sign_rate(key_type: KeyType, rate_per_s: float, hardware_protected: bool = False) -> float:
    """Signs per second this process allows itself with ``key_type`` keys: ``KEY_VAULT_SIGN_RATE_PER_S`` (set for
    EC / RSA-2048 software keys) scaled by Key Vault's lower limits for RSA-3072 and RSA-4096, and halved for
    HSM-protected keys (service-limits: 2,000 signs per 10 s for HSM EC / RSA-2048 against 4,000)."""
    return rate_per_s * _SIGN_LIMIT_PER_10S[key_type] / _SIGN_LIMIT_PER_10S[KeyType.EC_P256] * (
        0.5 if hardware_protected else 1.0)


_CURVE_NAMES = {KeyType.EC_P256: KeyCurveName.p_256, KeyType.EC_P384: KeyCurveName.p_384}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")  # Key Vault object names (same rule as the local key store)
# A CA key only signs (and verifies); Key Vault's default for RSA would also allow decrypt and unwrap.
_KEY_OPERATIONS = [KeyOperation.sign, KeyOperation.verify]


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r}: use 1-127 of a-z, A-Z, 0-9, '-'")


def public_key_from_jwk(jwk: JsonWebKey) -> PublicKey:
    """The ``cryptography`` public key of a Key Vault JWK (EC P-256/P-384 or RSA)."""
    if jwk.kty in ("EC", "EC-HSM"):
        curve = _CURVES.get(jwk.crv)
        if curve is None:
            raise ValueError(f"crv: {jwk.crv!r} is not a curve this service uses; use P-256 or P-384")
        return ec.EllipticCurvePublicNumbers(int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"),
                                             curve()).public_key()
    if jwk.kty in ("RSA", "RSA-HSM"):
        return rsa.RSAPublicNumbers(int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")).public_key()
    raise ValueError(f"kty: {jwk.kty!r} is not a key type this service uses; use EC or RSA")


def _client_options(connection_verify: str | None, verify_challenge_resource: bool,
                    retry_policy: ThrottlingRetryPolicy, **pipeline: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"verify_challenge_resource": verify_challenge_resource, "retry_policy": retry_policy,
                               **pipeline}
    if connection_verify is not None:
        options["connection_verify"] = str(connection_verify)
    return options


class KeyVaultKeyStore:
    """``KeyStore`` over Key Vault: keys are created non-exportable with sign/verify only, and sign there.

    One ``CryptographyClient`` per key version is kept (it fetches the public key once). Retry
    settings take azure-core's names; with the defaults a sign gives up after at most about two minutes
    of throttling (1 + 2 + 4 + 8 + 16 + 30 + 30 + 30 s). ``sign_rate_per_s`` is the app's budget at this vault;
    ``signers`` (``clients.signers.SigningPeers``) says how many processes share it now.
    """

    def __init__(self, vault_url: str, credential: TokenCredential, *, connection_verify: str | None = None,
                 verify_challenge_resource: bool = True, sign_rate_per_s: float = DEFAULT_SIGN_RATE_PER_S,
                 retry_total: int = 8, retry_backoff_factor: float = 1.0, retry_backoff_max: float = 30.0,
                 signers: SigningPeers | None = None, hardware_protected: bool = False):
        if not sign_rate_per_s > 0:
            raise ValueError(f"sign_rate_per_s: must be more than 0, got {sign_rate_per_s}")
        retry = {"retry_total": retry_total, "retry_backoff_factor": retry_backoff_factor,
                 "retry_backoff_max": retry_backoff_max}
        self._credential = credential
        self._hsm = hardware_protected  # new keys EC-HSM / RSA-HSM (KEY_VAULT_KEY_PROTECTION=hsm; a premium vault)
        self._vault = {"vault": urlsplit(vault_url).netloc}  # the metrics' attributes

        def throttled() -> None:
            KEY_VAULT_THROTTLED.add(1, self._vault)

        # create_key is a POST that makes a version: retried on 429 only (then it was not executed).
        self._keys = KeyClient(vault_url, credential, **_client_options(
            connection_verify, verify_challenge_resource, ThrottlingRetryPolicy(**retry)))
        sign_retry = ThrottlingRetryPolicy(retry_post=True, **retry)
        # one pool for every key's CryptographyClient: chunks sign from many threads
        transport = pooled_transport(connection_verify)
        self._crypto_options = {
            key_type: _client_options(connection_verify, verify_challenge_resource, sign_retry, transport=transport,
                                      per_retry_policies=[
                RateLimitPolicy(AdaptiveBucket(sign_rate(key_type, sign_rate_per_s, hardware_protected), share=signers),
                                on_throttled=throttled)],
                                      per_call_policies=[SignInProgress(signers)] if signers else [])
            for key_type in _SIGN_LIMIT_PER_10S
        }
        self._crypto: dict[tuple[str, str], CryptographyClient] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _ref(key: KeyVaultKey) -> KeyRef:
        public_key = public_key_from_jwk(key.key)
        return KeyRef(name=key.name, version=key.properties.version, key_type=KeyType.of(public_key),
                      public_key=public_key)

    def create_key(self, name: str, key_type: KeyType) -> KeyRef:
        _check_name(name, "key")
        try:
            with translated(f"key {name}"):
                if key_type.is_ec:
                    key = self._keys.create_ec_key(name, curve=_CURVE_NAMES[key_type], hardware_protected=self._hsm,
                                                   key_operations=_KEY_OPERATIONS, exportable=False)
                else:
                    key = self._keys.create_rsa_key(name, size=key_type.rsa_bits, key_operations=_KEY_OPERATIONS,
                                                    hardware_protected=self._hsm, exportable=False)
        except NotPermitted as exc:
            if self._hsm and "Hardware key operation not allowed" in str(exc):
                raise Rejected(f"key {name}: KEY_VAULT_KEY_PROTECTION=hsm needs a premium vault, and "
                               f"{self._vault['vault']} is standard (Key Vault: \"Hardware key operation not allowed "
                               "on standard vault\"): make the vault premium or the setting software, then send the "
                               "message again") from None
            raise
        except AlreadyExists:
            # Key Vault answers 409 to a create on a soft-deleted name (soft delete is on by default): no retry
            # can pass that; an operator must recover or purge the key.
            raise Rejected(f"key {name} is soft-deleted in Key Vault: recover it (az keyvault key recover) or "
                           "purge it, then send the message again") from None
        return self._ref(key)

    def get_key(self, name: str, version: str | None = None) -> KeyRef:
        _check_name(name, "key")
        with translated(f"key {name}/{version}" if version else f"key {name}"):
            key = self._keys.get_key(name, version)
        return self._ref(key)

    def _crypto_client(self, key: KeyRef) -> CryptographyClient:
        with self._lock:
            client = self._crypto.get((key.name, key.version))
            if client is None:
                key_id = f"{self._keys.vault_url}/keys/{key.name}/{key.version}"
                client = CryptographyClient(key_id, self._credential, **self._crypto_options[key.key_type])
                self._crypto[(key.name, key.version)] = client
            return client

    def signer(self, key: KeyRef) -> SignFn:
        client = self._crypto_client(key)
        what = f"key {key.name}/{key.version}: sign"

        def sign(algorithm: str, digest: bytes) -> bytes:
            started = time.perf_counter()
            with translated(what):
                signature = client.sign(algorithm, digest).signature
            KEY_VAULT_SIGN_DURATION.record(time.perf_counter() - started, self._vault)
            KEY_VAULT_SIGNS.add(1, self._vault)
            return signature

        return sign

    def close(self) -> None:
        with self._lock:
            clients, self._crypto = list(self._crypto.values()), {}
        for client in clients:
            client.close()
        self._keys.close()


class RootApartKeyStore:
    """``KeyStore`` over two vaults: the root key (``ROOT_CA_KEY_NAME``) in the root vault, every other key (the
    customers' intermediates, ``customer-{id}``) in the intermediates' vault. The handlers see one ``KeyStore``.

    Why two vaults: Azure RBAC is additive and ordinary role assignments cannot deny (learn.microsoft.com/azure/
    role-based-access-control/overview#multiple-role-assignments; deny assignments are made by Azure only,
    .../deny-assignments), and Microsoft advises against key-scoped assignments for isolation within a vault
    (key-vault/general/rbac-guide, "Best Practices for individual keys..." and FAQ). The app needs Key Vault Crypto
    Officer where intermediates are created; in the root vault it holds only get + sign (docs/deploy.md).
    Names are compared as Key Vault compares them, ignoring case.
    """

    def __init__(self, root_key_name: str, root: KeyVaultKeyStore, intermediates: KeyVaultKeyStore):
        self.root_key_name = root_key_name
        self.root, self.intermediates = root, intermediates

    def _vault(self, name: str) -> KeyVaultKeyStore:
        return self.root if name.lower() == self.root_key_name.lower() else self.intermediates

    def create_key(self, name: str, key_type: KeyType) -> KeyRef:
        return self._vault(name).create_key(name, key_type)

    def get_key(self, name: str, version: str | None = None) -> KeyRef:
        return self._vault(name).get_key(name, version)

    def signer(self, key: KeyRef) -> SignFn:
        return self._vault(key.name).signer(key)

    def close(self) -> None:
        self.root.close()
        self.intermediates.close()


class KeyVaultSecrets:
    """Secrets (batch PFX passwords). Values are never logged: errors name the secret, never its value,
    and the SDK logs request bodies only with ``logging_enable``, which is never set here."""

    def __init__(self, vault_url: str, credential: TokenCredential, *, connection_verify: str | None = None,
                 verify_challenge_resource: bool = True, retry_total: int = 8, retry_backoff_factor: float = 1.0,
                 retry_backoff_max: float = 30.0):
        policy = ThrottlingRetryPolicy(retry_total=retry_total, retry_backoff_factor=retry_backoff_factor,
                                     retry_backoff_max=retry_backoff_max)
        self._client = SecretClient(vault_url, credential,
                                    **_client_options(connection_verify, verify_challenge_resource, policy))

    def set_secret(self, name: str, value: str) -> str:
        """Store ``value`` as a new version of ``name``; returns that version."""
        _check_name(name, "secret")
        with translated(f"secret {name}"):
            return self._client.set_secret(name, value).properties.version

    def get_secret(self, name: str, version: str | None = None) -> str:
        _check_name(name, "secret")
        with translated(f"secret {name}/{version}" if version else f"secret {name}"):
            return self._client.get_secret(name, version).value

    def close(self) -> None:
        self._client.close()
