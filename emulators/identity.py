"""The local stack's token issuer: Microsoft Entra ID and the Functions managed identity endpoint, on loopback.

On Azure the app's credential (``ManagedIdentityCredential``, alone or inside ``DefaultAzureCredential``)
asks the identity endpoint that the platform names in ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` for a
token (learn.microsoft.com/azure/app-service/overview-managed-identity, "REST endpoint reference"):

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=R[&client_id=C | principal_id=O | mi_res_id=I]
    X-IDENTITY-HEADER: {IDENTITY_HEADER}
    -> 200 {"access_token", "expires_on" (epoch seconds, a string), "resource", "token_type", "client_id"}

No parameter means the system-assigned identity; an identity the app does not have is answered 400
``Unable to load the proper Managed Identity.`` (seen in Azure/azure-sdk-for-net#43691). This module serves that
endpoint (plain HTTP, as the platform's own is) for the local identities, and mints RS256 JWTs shaped like
Entra v1 access tokens (learn.microsoft.com/entra/identity-platform/access-token-claims-reference): ``iss``
``https://sts.windows.net/{tenant}/``, ``aud`` the resource asked for, ``appid`` (client id), ``oid``, ``sub``,
``tid``, ``idtyp: app``, ``ver: 1.0``, ``iat``/``nbf``/``exp``. Tokens are short-lived (10 minutes; real
managed identity tokens live about a day), so long runs renew them. The emulators check them with ``verify``.

The same endpoint also mints tokens for the local people (operator, PKI administrator), selected by their
client id: on Azure their tokens come from ``az login`` (``AzureCliCredential`` in ``DefaultAzureCredential``).
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .core import Request, Response, route
from .rbac import RoleAssignments

API_VERSION = "2019-08-01"
TOKEN_PATH = "/msi/token"  # noqa: S105 - a URL path, not a token
DEFAULT_LIFETIME_S = 600
# The resources (token audiences) of the services this app uses; Entra refuses a resource it does not know.
VAULT = "https://vault.azure.net"
DPS = "https://azure-devices-provisioning.net"
IOT_HUB = "https://iothubs.azure.net"
STORAGE = "https://storage.azure.com"
MANAGEMENT = "https://management.azure.com"  # Azure Resource Manager (a DPS instance's CA certificates)
RESOURCES = frozenset({VAULT, DPS, IOT_HUB, STORAGE, MANAGEMENT})
_SELECTORS = ("client_id", "principal_id", "object_id", "mi_res_id")


@dataclass(frozen=True)
class LocalIdentity:
    """A principal of the local tenant: a user-assigned managed identity (the app) or a person."""

    name: str
    client_id: str
    object_id: str
    resource_id: str


class TokenRejected(Exception):
    """Why a bearer token does not authenticate a request (``kind``: missing, malformed, signature, expired,
    not_yet_valid, audience, issuer)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _error(status: int, message: str) -> Response:
    # The platform endpoint's error shape: {"statusCode", "message", "correlationId"}.
    return Response(status, {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())})


class TokenIssuer:
    """The local tenant: identities, a signing key made at start, the identity endpoint's route. Thread-safe."""

    def __init__(self, *, tenant_id: str | None = None, subscription_id: str | None = None,
                 lifetime_s: int = DEFAULT_LIFETIME_S):
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.subscription_id = subscription_id or str(uuid.uuid4())
        self.lifetime_s = lifetime_s
        self.header = secrets.token_urlsafe(24)  # X-IDENTITY-HEADER: guards the endpoint against SSRF, not a key
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = secrets.token_hex(8)
        self.endpoint = ""  # http://127.0.0.1:PORT/msi/token, set once the server listens
        self._identities: dict[str, LocalIdentity] = {}
        self._lock = threading.Lock()
        self.issued = 0

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def add_identity(self, name: str) -> LocalIdentity:
        identity = LocalIdentity(
            name=name, client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()),
            resource_id=(f"/subscriptions/{self.subscription_id}/resourcegroups/pki-local/providers/"
                         f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"))
        with self._lock:
            self._identities[identity.client_id] = identity
        return identity

    def identity(self, name: str) -> LocalIdentity:
        with self._lock:
            found = [i for i in self._identities.values() if i.name == name]
        if not found:
            raise KeyError(f"no local identity {name!r}")
        return found[0]

    def environment(self) -> dict[str, str]:
        """What the platform puts in the app's environment for azure-identity."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.header}

    # -- tokens ------------------------------------------------------------------------------------
    def mint(self, identity: LocalIdentity, resource: str, *, lifetime_s: int | None = None,
             issued_at: float | None = None, **overrides) -> str:
        """A signed access token for ``identity`` and ``resource``; ``overrides`` replace claims (tests)."""
        now = int(time.time() if issued_at is None else issued_at)
        claims = {
            "aud": resource, "iss": self.issuer, "iat": now, "nbf": now,
            "exp": now + (self.lifetime_s if lifetime_s is None else lifetime_s),
            "appid": identity.client_id, "appidacr": "2", "idp": self.issuer, "idtyp": "app",
            "oid": identity.object_id, "sub": identity.object_id, "tid": self.tenant_id,
            "uti": secrets.token_urlsafe(16), "ver": "1.0", "xms_mirid": identity.resource_id,
        }
        claims.update(overrides)
        with self._lock:
            self.issued += 1
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.key_id})

    def verify(self, authorization: str | None, resource: str) -> dict:
        """The claims of the ``Authorization: Bearer`` token if it is this tenant's, unexpired, for ``resource``."""
        if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise TokenRejected("missing", "Request is missing a Bearer token.")
        token = authorization[7:].strip()
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("malformed", "The bearer token is not a JWT.") from None
        try:
            return jwt.decode(token, self._key.public_key(), algorithms=["RS256"], audience=resource,
                              issuer=self.issuer, options={"require": ["exp", "nbf", "iat", "aud", "iss", "oid"]})
        except jwt.InvalidAudienceError:
            raise TokenRejected("audience", f"Invalid audience. Expected {resource}, found: "
                                            f"{unverified.get('aud')}.") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("issuer", f"Invalid issuer. Expected one of {self.issuer}, found "
                                          f"{unverified.get('iss')}.") from None
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired", "The token is expired.") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("not_yet_valid", "The token is not yet valid (nbf).") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("signature", "The token's signature does not verify.") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected("malformed", f"The token is not valid: {exc}.") from None

    # -- the identity endpoint ---------------------------------------------------------------------
    def routes(self):
        return [route("GET", TOKEN_PATH, self._token)]

    def _token(self, request: Request) -> Response:
        if request.header("x-identity-header") != self.header:
            return _error(401, "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.")
        if request.query.get("api-version") != API_VERSION:
            return _error(400, f"api-version must be {API_VERSION}")
        resource = (request.query.get("resource") or "").rstrip("/")
        if not resource:
            return _error(400, "resource is required")
        selectors = {k: request.query[k] for k in _SELECTORS if request.query.get(k)}
        if len(selectors) > 1:
            return _error(400, f"give at most one of {', '.join(_SELECTORS)}")
        with self._lock:
            candidates = list(self._identities.values())
        field_of = {"client_id": "client_id", "principal_id": "object_id", "object_id": "object_id",
                    "mi_res_id": "resource_id"}
        # No selector asks for the system-assigned identity, which the local app does not have (it runs
        # with a user-assigned one, as docs/deploy.md sets it up): a client that forgets the client id fails.
        identity = next((i for i in candidates for k, v in selectors.items()
                         if getattr(i, field_of[k]).lower() == v.lower()), None)
        if identity is None:
            return _error(400, "Unable to load the proper Managed Identity.")
        if resource not in RESOURCES:
            # Entra's answer for an unknown resource; App Service passes it on as a 500 (msal's notes).
            return _error(500, f"AADSTS500011: The resource principal named {resource} was not found in the "
                               f"tenant named {self.tenant_id}.")
        token = self.mint(identity, resource)
        expires_on = int(jwt.decode(token, options={"verify_signature": False})["exp"])
        return Response(200, {"access_token": token, "expires_on": str(expires_on), "resource": resource,
                              "token_type": "Bearer", "client_id": identity.client_id})


@dataclass
class EntraGuard:
    """What an emulated data plane checks before an operation: a bearer token of the local tenant for its own
    resource (signature, lifetime, audience, issuer), then a role assignment on it granting the data action."""

    issuer: TokenIssuer
    resource: str
    roles: RoleAssignments = field(default_factory=RoleAssignments)

    def authenticate(self, authorization: str | None) -> dict:
        return self.issuer.verify(authorization, self.resource)

    def permits(self, claims: dict, action: str, *, management: bool = False) -> bool:
        return self.roles.allows(claims["oid"], action, management=management)
