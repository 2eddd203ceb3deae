"""Key Vault emulator: the REST subset ``KeyClient``, ``CryptographyClient`` and ``SecretClient`` use.

Served (``{vault}`` is ``https://`` + the request's Host, so ids point back at the URL the client used):

- ``POST /keys/{name}/create``: EC (``crv`` P-256/P-384) or RSA (``key_size`` 2048/3072/4096), a new
  32-hex version each time. ``GET /keys/{name}[/{version}]``: the latest or one version.
- ``POST /keys/{name}/{version}/sign``: ``{"alg", "value"}`` (base64url digest) -> ``{"kid", "value"}``,
  signed by ``pki.signing.software_signer`` so ES256/ES384 give raw ``r||s`` and PS* use
  salt = digest length, exactly as Key Vault does.
- ``PUT /secrets/{name}``, ``GET /secrets/{name}[/{version}]``.

Like Key Vault (learn.microsoft.com/azure/key-vault/general/authentication-requests-and-responses and
rbac-guide): every request needs ``api-version`` and a bearer token of the vault's tenant for
``https://vault.azure.net``. Without one, or with an expired, wrongly signed, wrong-audience or other-tenant
token, it answers 401 with the challenge the SDK's ``ChallengeAuthPolicy`` parses (``authorization`` +
``resource``; clients of a loopback vault need ``verify_challenge_resource=False``, because the resource's
domain, vault.azure.net, cannot be a suffix of 127.0.0.1) and Key Vault's messages (AKV10000 missing token,
AKV10022 audience, AKV10032 issuer). A valid token whose principal holds no role granting the operation's
data action (``Microsoft.KeyVault/vaults/keys/sign/action``...) gets 403 ``Forbidden`` /
``ForbiddenByRbac`` with Key Vault's message (Caller, Action, Resource lines; quoted in
Azure/azure-sdk-for-js#31374). Errors have Key Vault's shape ``{"error": {"code", "message"}}``. Keys
never leave: no response carries private material and exportable keys and key release are refused. Key
Vault's shapes and fields follow the SDK's generated models (``azure/keyvault/keys/_generated/models/_models.py``),
field for field.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki.errors import SigningError
from pki.keys import KeyType, PrivateKey, generate_key
from pki.signing import software_signer

from .core import HttpError, Request, Response, route
from .identity import VAULT, EntraGuard, TokenRejected

# Key Vault object names: 1-127 of a-z, A-Z, 0-9 and '-', compared case-insensitively.
_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")
_CURVES = {"P-256": KeyType.EC_P256, "P-384": KeyType.EC_P384}
_RSA_SIZES = {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}
# Key Vault's defaults when "key_ops" is absent (a key created by the portal shows the same).
_DEFAULT_KEY_OPS = {"EC": ["sign", "verify"], "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]}
_DIGEST_BYTES = {"256": 32, "384": 48, "512": 64}
# Service limits: "Secret value size limit: 25 KB".
MAX_SECRET_BYTES = 25 * 1024
# What a vault with soft delete (Key Vault's default) reports for every object.
_RECOVERY = {"recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _error(status: int, code: str, message: str, inner: str | None = None) -> HttpError:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return HttpError(status, {"error": error})


def _bad(message: str) -> HttpError:
    return _error(400, "BadParameter", message)


def _public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public half as a JWK (RFC 7518 section 6); the private members are never written."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = (public.key_size + 7) // 8
        crv = next(name for name, key_type in _CURVES.items() if key_type.curve.name == public.curve.name)
        return {"kty": "EC", "crv": crv, "x": _b64url(numbers.x.to_bytes(size, "big")),
                "y": _b64url(numbers.y.to_bytes(size, "big"))}
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError(f"{type(public).__name__} keys are not served")
    numbers = public.public_numbers()
    return {"kty": "RSA", "n": _b64url(_int_bytes(numbers.n)), "e": _b64url(_int_bytes(numbers.e))}


@dataclass
class _KeyVersion:
    version: str
    key: PrivateKey = field(repr=False)
    key_ops: list[str]
    enabled: bool
    tags: dict[str, str] | None
    created: int
    hsm: bool = False  # kty EC-HSM / RSA-HSM: the JWK says so


@dataclass
class _SecretVersion:
    version: str
    value: str = field(repr=False)
    content_type: str | None
    enabled: bool
    tags: dict[str, str] | None
    created: int


@dataclass
class _Versions:
    """All versions of one named object; ``name`` keeps the spelling it was first created with."""

    name: str
    versions: dict[str, Any] = field(default_factory=dict)
    latest: str = ""


_ACTION = "Microsoft.KeyVault/vaults/"
# Key Vault's own codes for the token problems it names (quoted in SDK issues: AKV10000 in
# Azure/azure-sdk-for-python#24557, AKV10022 in Azure/go-autorest#525, AKV10032 in MicrosoftDocs/azure-docs#75410);
# for the others no code is documented, so the message says what is wrong without one.
_AKV_CODES = {"missing": "AKV10000", "audience": "AKV10022", "issuer": "AKV10032"}


class KeyVaultEmulator:
    """One vault, in memory, guarded by ``guard`` (the local tenant's tokens and the vault's role assignments)."""

    def __init__(self, guard: EntraGuard, *, name: str = "pkilocal", sku: str = "standard"):
        """``sku``: ``standard`` refuses HSM-protected keys, ``premium`` holds them (key-vault/general/overview:
        "Premium tier: ... HSM-protected keys")."""
        if guard.resource != VAULT:
            raise ValueError(f"guard: a vault's tokens are for {VAULT}, not {guard.resource}")
        if sku not in ("standard", "premium"):
            raise ValueError(f"sku: {sku!r} is not standard or premium")
        self.guard = guard
        self.name = name
        self.sku = sku
        self._lock = threading.Lock()
        self._keys: dict[str, _Versions] = {}
        self._secrets: dict[str, _Versions] = {}

    def secret_values(self) -> list[str]:
        """Test inspection: every secret value ever set (to prove none leaked into logs or blobs)."""
        with self._lock:
            return [v.value for versions in self._secrets.values() for v in versions.versions.values()]

    def key_versions(self, name: str) -> list[str]:
        """Test inspection: the versions of a key, oldest first (Key Vault's list-versions, minus paging)."""
        with self._lock:
            versions = self._keys.get(name.lower())
            return list(versions.versions) if versions is not None else []

    @property
    def tenant_id(self) -> str:
        return self.guard.issuer.tenant_id

    def routes(self):
        name, version = r"(?P<name>[^/]+)", r"(?P<version>[^/]*)"
        return [
            route("POST", rf"/keys/{name}/create", self._guard(self._create_key, "keys/create/action")),
            route("POST", rf"/keys/{name}/{version}/sign", self._guard(self._sign, "keys/sign/action")),
            route("POST", rf"/keys/{name}/{version}/release", self._guard(self._release, "keys/release/action")),
            route("GET", rf"/keys/{name}(?:/{version})?", self._guard(self._get_key, "keys/read")),
            route("PUT", rf"/secrets/{name}", self._guard(self._set_secret, "secrets/setSecret/action")),
            route("GET", rf"/secrets/{name}(?:/{version})?", self._guard(self._get_secret, "secrets/getSecret/action")),
        ]

    # -- what every request goes through --------------------------------------------------------

    def _guard(self, handler: Callable[..., Response], action: str) -> Callable[..., Response]:
        def guarded(request: Request, **groups: str) -> Response:
            try:
                claims = self.guard.authenticate(request.header("authorization"))
            except TokenRejected as exc:
                # Key Vault's challenge; ChallengeAuthPolicy needs "authorization" (the tenant is its
                # path) and "resource" or "scope" (azure/keyvault/keys/_shared/http_challenge.py).
                challenge = (f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", '
                             f'resource="{VAULT}"')
                code = _AKV_CODES.get(exc.kind)
                message = "AKV10000: Request is missing a Bearer or PoP token." if exc.kind == "missing" else \
                    f"{code}: {exc}" if code else str(exc)
                raise HttpError(401, {"error": {"code": "Unauthorized", "message": message}},
                                {"WWW-Authenticate": challenge}) from None
            if not request.query.get("api-version"):
                raise _bad("The 'api-version' query parameter is missing.")
            if not _NAME.fullmatch(groups["name"]):
                raise _bad(f"The request URI contains an invalid name: {groups['name']}")
            if not self.guard.permits(claims, _ACTION + action):
                raise self._forbidden(claims, _ACTION + action, request.path)
            return handler(request, **groups)

        return guarded

    def _forbidden(self, claims: dict, action: str, path: str) -> HttpError:
        """Key Vault's RBAC refusal, line for line (the resource id is lower-case, as the service prints it)."""
        issuer = self.guard.issuer
        resource = (f"/subscriptions/{issuer.subscription_id}/resourcegroups/pki-local/providers/"
                    f"microsoft.keyvault/vaults/{self.name}{'/'.join(path.split('/')[:3])}").lower()
        message = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments "
                   "or role definitions were changed recently, please observe propagation time.\r\n"
                   f"Caller: appid={claims.get('appid')};oid={claims.get('oid')};iss={claims.get('iss')}\r\n"
                   f"Action: '{action}'\r\nResource: '{resource}'\r\nAssignment: (not found)\r\n"
                   f"DenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {self.name};location=local\r\n")
        return _error(403, "Forbidden", message, "ForbiddenByRbac")

    @staticmethod
    def _vault(request: Request) -> str:
        return f"https://{request.header('host', '127.0.0.1')}"

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        return body

    @staticmethod
    def _attributes(body: dict[str, Any]) -> dict[str, Any]:
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("Property 'attributes' must be an object.")
        if "enabled" in attributes and not isinstance(attributes["enabled"], bool):
            raise _bad("Property 'attributes.enabled' must be true or false.")
        return attributes

    @staticmethod
    def _tags(body: dict[str, Any]) -> dict[str, str] | None:
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
            raise _bad("Property 'tags' must be an object of strings.")
        return tags

    def _find(self, store: dict[str, _Versions], kind: str, code: str, name: str,
              version: str | None) -> tuple[str, Any]:
        """``(stored name, version record)``; 404 in Key Vault's words when either is missing."""
        with self._lock:
            entry = store.get(name.lower())
            record = entry and entry.versions.get(version or entry.latest)
        if record is None:
            shown = f"{name}/{version}" if version else name
            raise _error(404, code, f"A {kind} with (name/id) {shown} was not found in this key vault. If you "
                                    f"recently deleted this {kind} you may be able to recover it using the correct "
                                    "recovery command. For help resolving this issue, please see "
                                    "https://go.microsoft.com/fwlink/?linkid=2125182")
        return entry.name, record

    def _add(self, store: dict[str, _Versions], name: str, record: Any) -> str:
        with self._lock:
            entry = store.setdefault(name.lower(), _Versions(name))
            entry.versions[record.version] = record
            entry.latest = record.version
            return entry.name

    # -- keys ----------------------------------------------------------------------------------

    def _key_bundle(self, request: Request, name: str, record: _KeyVersion) -> dict[str, Any]:
        jwk = {"kid": f"{self._vault(request)}/keys/{name}/{record.version}", **_public_jwk(record.key),
               "key_ops": list(record.key_ops)}
        if record.hsm:
            jwk["kty"] += "-HSM"
        bundle: dict[str, Any] = {"key": jwk, "attributes": {"enabled": record.enabled, "created": record.created,
                                                             "updated": record.created, "exportable": False,
                                                             **_RECOVERY}}
        if record.tags is not None:
            bundle["tags"] = record.tags
        return bundle

    def _create_key(self, request: Request, name: str) -> Response:
        body = self._body(request)
        attributes = self._attributes(body)
        if attributes.get("exportable") or body.get("release_policy"):
            raise _bad("Exportable keys and release policies are refused: keys held here never leave the vault.")
        kty = body.get("kty")
        hsm = isinstance(kty, str) and kty in ("EC-HSM", "RSA-HSM")
        if hsm and self.sku != "premium":
            # what Key Vault answers (az keyvault key create --kty RSA-HSM on a standard vault: MicrosoftDocs/
            # azure-docs#63888, Azure/azure-sdk-for-net#6551; "Forbidden": MicrosoftDocs/azure-docs#34948)
            raise _error(403, "Forbidden", "Hardware key operation not allowed on standard vault")
        if hsm:
            kty = kty.removesuffix("-HSM")
        if kty == "EC":
            crv = body.get("crv") or "P-256"
            if not isinstance(crv, str) or crv not in _CURVES:
                raise _bad(f"Property 'crv': {crv!r} is not supported here; use P-256 or P-384.")
            key_type = _CURVES[crv]
        elif kty == "RSA":
            size = body.get("key_size") or 2048
            if not isinstance(size, int) or size not in _RSA_SIZES:
                raise _bad(f"Property 'key_size': {size!r} is not supported here; use 2048, 3072 or 4096.")
            key_type = _RSA_SIZES[size]
        else:
            raise _bad(f"Property 'kty': {kty!r} is not supported here; use EC, RSA, EC-HSM or RSA-HSM.")
        key_ops = body.get("key_ops") or _DEFAULT_KEY_OPS[kty]
        if not (isinstance(key_ops, list) and all(isinstance(op, str) for op in key_ops)):
            raise _bad("Property 'key_ops' must be a list of operation names.")
        record = _KeyVersion(version=secrets.token_hex(16), key=generate_key(key_type), key_ops=key_ops,
                             enabled=attributes.get("enabled", True), tags=self._tags(body), created=int(time.time()),
                             hsm=hsm)
        stored_name = self._add(self._keys, name, record)
        return Response(200, self._key_bundle(request, stored_name, record))

    def _get_key(self, request: Request, name: str, version: str | None = None) -> Response:
        stored_name, record = self._find(self._keys, "key", "KeyNotFound", name, version)
        return Response(200, self._key_bundle(request, stored_name, record))

    def _sign(self, request: Request, name: str, version: str) -> Response:
        stored_name, record = self._find(self._keys, "key", "KeyNotFound", name, version)
        if "sign" not in record.key_ops:
            raise _error(403, "Forbidden", "Operation sign is not permitted on this key.", "KeyOperationForbidden")
        if not record.enabled:
            raise _error(403, "Forbidden", "Operation sign is not allowed on a disabled key.", "KeyDisabled")
        body = self._body(request)
        alg, value = body.get("alg"), body.get("value")
        if not isinstance(alg, str) or not alg:
            raise _bad("Property 'alg' is required.")
        if not isinstance(value, str):
            raise _bad("Property 'value' is required (the digest, base64url).")
        try:
            digest = _unb64url(value)
        except (binascii.Error, ValueError):
            raise _bad("Property 'value' is not base64url.") from None
        expected = _DIGEST_BYTES.get(alg[-3:])
        if expected is not None and len(digest) != expected:
            # Key Vault's own wording (seen in Azure/azure-sdk-for-python#4399).
            raise _bad(f"Invalid length of 'value': {len(digest)} bytes. {alg} requires {expected} bytes, "
                       "encoded with base64url.")
        try:
            signature = software_signer(record.key)(alg, digest)
        except SigningError as exc:
            raise _bad(f"Property 'alg': {exc}") from None
        return Response(200, {"kid": f"{self._vault(request)}/keys/{stored_name}/{record.version}",
                              "value": _b64url(signature)})

    def _release(self, request: Request, name: str, version: str) -> Response:
        self._find(self._keys, "key", "KeyNotFound", name, version)
        raise _bad("Key release is refused: no key held here is exportable.")

    # -- secrets -------------------------------------------------------------------------------

    def _secret_bundle(self, request: Request, name: str, record: _SecretVersion) -> dict[str, Any]:
        bundle: dict[str, Any] = {"value": record.value,
                                  "id": f"{self._vault(request)}/secrets/{name}/{record.version}",
                                  "attributes": {"enabled": record.enabled, "created": record.created,
                                                 "updated": record.created, **_RECOVERY}}
        if record.content_type is not None:
            bundle["contentType"] = record.content_type
        if record.tags is not None:
            bundle["tags"] = record.tags
        return bundle

    def _set_secret(self, request: Request, name: str) -> Response:
        body = self._body(request)
        value, content_type = body.get("value"), body.get("contentType")
        if not isinstance(value, str):
            raise _bad("Property 'value' is required and must be a string.")
        if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
            raise _bad(f"Property 'value' is larger than {MAX_SECRET_BYTES} bytes.")
        if content_type is not None and not isinstance(content_type, str):
            raise _bad("Property 'contentType' must be a string.")
        record = _SecretVersion(version=secrets.token_hex(16), value=value, content_type=content_type,
                                enabled=self._attributes(body).get("enabled", True), tags=self._tags(body),
                                created=int(time.time()))
        stored_name = self._add(self._secrets, name, record)
        return Response(200, self._secret_bundle(request, stored_name, record))

    def _get_secret(self, request: Request, name: str, version: str | None = None) -> Response:
        stored_name, record = self._find(self._secrets, "secret", "SecretNotFound", name, version)
        if not record.enabled:
            raise _error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
        return Response(200, self._secret_bundle(request, stored_name, record))
