"""IoT Hub registry emulator: the REST subset ``azure.iot.hub.IoTHubRegistryManager`` uses.

Routes (``api-version`` required, the SDK sends 2021-04-12):
``GET/PUT/DELETE /devices/{id}``, ``GET /devices``, ``POST /devices/query``, ``GET /twins/{id}``.
Errors use IoT Hub's shape: ``{"Message": "ErrorCode:<Code>;<text>", "ExceptionMessage": "Tracking ID:..."}``
with the code repeated in the ``iothub-errorcode`` header.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import hashlib
import hmac
import itertools
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_plus

from .core import HttpError, Request, Response, Route, route
from .identity import IOT_HUB, EntraGuard, TokenRejected

# IoT Hub device ids: up to 128 characters from ASCII alphanumerics and - . % _ * ? ! ( ) , : = @ $ '
# (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-identity-registry#device-identity-properties).
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
_AUTH_TYPES = ("sas", "selfSigned", "certificateAuthority", "none")
# The registry's "never" for lastActivityTime, as the service sends it.
_NEVER = "0001-01-01T00:00:00Z"
# Query page size when the caller sends no x-ms-max-item-count (the service's documented default).
DEFAULT_QUERY_PAGE = 100


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sas_problem(authorization: str | None, *, resource: str, key: str, policy_name: str) -> str | None:
    """Why ``authorization`` does not grant access to ``resource`` (``host/path``), or ``None`` when it does.

    IoT Hub and DPS share the token format (learn.microsoft.com/azure/iot-hub/authenticate-authorize-sas):
    ``SharedAccessSignature sr=<url-encoded resource>&sig=<signature>&se=<expiry>&skn=<policy>``, where the
    signature is base64(HMAC-SHA256(base64-decoded key, "<url-encoded resource>\\n<expiry>")) and the token
    is good for every URI that starts with the resource.
    """
    scheme = "SharedAccessSignature "
    if not authorization or not authorization.startswith(scheme):
        return "the Authorization header is missing or is not a SharedAccessSignature"
    fields = dict(part.split("=", 1) for part in authorization[len(scheme):].split("&") if "=" in part)
    missing = [name for name in ("sr", "sig", "se", "skn") if not fields.get(name)]
    if missing:
        return f"the token lacks {', '.join(missing)}"
    if unquote_plus(fields["skn"]) != policy_name:
        return f"unknown policy (skn) {unquote_plus(fields['skn'])!r}"
    try:
        expiry = int(fields["se"])
    except ValueError:
        return "se is not an integer"
    if expiry <= time.time():
        return "the token expired"
    audience = unquote_plus(fields["sr"]).lower().removeprefix("https://").rstrip("/")
    if not resource.lower().startswith(audience):
        return f"the token is for {audience!r}, not for {resource!r}"
    try:
        signing_key = base64.b64decode(key)
    except binascii.Error:
        return "the service key is not base64"
    # The signed string carries sr exactly as sent (still URL-encoded).
    expected = base64.b64encode(hmac.new(signing_key, f"{fields['sr']}\n{fields['se']}".encode(),
                                         hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, unquote_plus(fields["sig"])):
        return "the signature does not match the key"
    return None


def access_problem(request: Request, *, sas_resource: str, key: str, policy_name: str, guard: EntraGuard,
                   actions: tuple[str, ...]) -> tuple[str, str] | None:
    """Why ``request`` may not do ``actions``: ``("unauthenticated" | "forbidden", reason)``, or None when it may.

    IoT Hub and DPS take either a SAS token of a shared access policy (the owner policy grants every service
    operation) or a Microsoft Entra bearer token for the service's resource, whose principal then needs a role
    granting each data action (learn.microsoft.com/azure/iot-hub/authenticate-authorize-azure-ad,
    .../iot-dps/concepts-control-access-dps-azure-ad).
    """
    authorization = request.header("authorization")
    if authorization and authorization.startswith("SharedAccessSignature "):
        problem = sas_problem(authorization, resource=sas_resource, key=key, policy_name=policy_name)
        return ("unauthenticated", problem) if problem else None
    try:
        claims = guard.authenticate(authorization)
    except TokenRejected as exc:
        return "unauthenticated", str(exc)
    if not all(guard.permits(claims, action) for action in actions):
        # IoT Hub's words for a principal without a role (learn.microsoft.com/azure/iot-hub/troubleshoot-error-codes,
        # 401003 IoTHubUnauthorized; quoted in Azure/azure-iot-sdk-csharp#3344).
        return "forbidden", (f"Principal {claims.get('oid')} is not authorized for {request.method} on "
                             f"{request.path} due to no assigned permissions")
    return None


def hub_refusal(status: int, message: str) -> Response:
    """An injected fault in IoT Hub's error shape: throttling is ``ThrottlingException`` (learn.microsoft.com/azure/
    iot-hub/troubleshoot-error-codes, 429001), a server fault ``ServiceUnavailable`` (503003)."""
    code = {429: "ThrottlingException", 503: "ServiceUnavailable"}.get(status, "ServerError")
    return _hub_error(status, code, message).response


def _hub_error(status: int, code: str, message: str) -> HttpError:
    tracking = f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:{utc_now():%m/%d/%Y %H:%M:%S}"
    return HttpError(status, {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": tracking},
                     {"iothub-errorcode": code})


def _unquote_etag(value: str) -> str:
    return value.strip().removeprefix("W/").strip('"')


@dataclass
class _Device:
    device_id: str
    etag: str
    status: str
    authentication: dict
    capabilities: dict
    status_reason: str | None = None
    device_scope: str | None = None
    parent_scopes: list[str] = field(default_factory=list)
    generation_id: str = field(default_factory=lambda: str(secrets.randbelow(10 ** 18)))
    status_updated: dt.datetime = field(default_factory=utc_now)
    tags: dict = field(default_factory=dict)
    desired: dict = field(default_factory=dict)
    twin_version: int = 1
    twin_updated: dt.datetime = field(default_factory=utc_now)

    def identity_json(self) -> dict:
        return {
            "deviceId": self.device_id, "generationId": self.generation_id, "etag": self.etag,
            "connectionState": "Disconnected", "status": self.status, "statusReason": self.status_reason,
            "connectionStateUpdatedTime": _NEVER, "statusUpdatedTime": iso(self.status_updated),
            "lastActivityTime": _NEVER, "cloudToDeviceMessageCount": 0,
            "authentication": copy.deepcopy(self.authentication), "capabilities": dict(self.capabilities),
            "deviceScope": self.device_scope, "parentScopes": list(self.parent_scopes),
        }

    def twin_json(self) -> dict:
        version_etag = base64.b64encode(self.twin_version.to_bytes(8, "big")).decode()
        return {
            "deviceId": self.device_id, "etag": version_etag, "deviceEtag": self.etag, "status": self.status,
            "statusReason": self.status_reason, "statusUpdateTime": iso(self.status_updated),
            "connectionState": "Disconnected", "lastActivityTime": _NEVER, "cloudToDeviceMessageCount": 0,
            "authenticationType": self.authentication["type"],
            "x509Thumbprint": copy.deepcopy(self.authentication["x509Thumbprint"]),
            "version": self.twin_version, "capabilities": dict(self.capabilities),
            "deviceScope": self.device_scope, "parentScopes": list(self.parent_scopes),
            "tags": copy.deepcopy(self.tags),
            "properties": {
                "desired": {**copy.deepcopy(self.desired), "$metadata": {"$lastUpdated": iso(self.twin_updated)},
                            "$version": self.twin_version},
                "reported": {"$metadata": {"$lastUpdated": iso(self.twin_updated)}, "$version": 1},
            },
        }


def _merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7396 JSON merge patch, as IoT Hub applies twin updates: objects merge, null deletes, the rest replaces."""
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_patch(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _bad_twin_key(document: dict) -> str | None:
    """The first key, at any depth, that a twin may not hold (iot-hub-devguide-device-twins)."""
    for key, value in document.items():
        if not key or any(c in ".$ " or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key):
            return key
        if isinstance(value, dict):
            nested = _bad_twin_key(value)
            if nested is not None:
                return nested
    return None


def _authentication(body: Any) -> dict:
    """The stored authentication of a device; IoT Hub generates SAS keys when none are given."""
    body = body or {"type": "sas"}
    if not isinstance(body, dict) or body.get("type") not in _AUTH_TYPES:
        raise _hub_error(400, "ArgumentInvalid", f"authentication.type must be one of {', '.join(_AUTH_TYPES)}")
    keys = body.get("symmetricKey") or {}
    thumbprints = body.get("x509Thumbprint") or {}
    if body["type"] == "sas" and not keys.get("primaryKey"):
        keys = {"primaryKey": base64.b64encode(secrets.token_bytes(32)).decode(),
                "secondaryKey": base64.b64encode(secrets.token_bytes(32)).decode()}
    if body["type"] == "selfSigned" and not thumbprints.get("primaryThumbprint"):
        raise _hub_error(400, "ArgumentInvalid", "authentication.x509Thumbprint.primaryThumbprint is required "
                         "for selfSigned authentication")
    return {
        "type": body["type"],
        "symmetricKey": {"primaryKey": keys.get("primaryKey"), "secondaryKey": keys.get("secondaryKey")},
        "x509Thumbprint": {"primaryThumbprint": thumbprints.get("primaryThumbprint"),
                           "secondaryThumbprint": thumbprints.get("secondaryThumbprint")},
    }


def _twin_section(twin: dict | None, *path: str) -> dict:
    """A tags/desired section of a DPS initialTwin without its ``$metadata``/``$version`` bookkeeping."""
    section: Any = twin or {}
    for name in path:
        section = section.get(name) if isinstance(section, dict) else None
    if not isinstance(section, dict):
        return {}
    return {k: copy.deepcopy(v) for k, v in section.items() if not k.startswith("$")}


# --- the query subset: SELECT * FROM devices [WHERE <path> =|!=|<> <literal> [AND ...]] ---------------
# (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-query-language)
_SELECT = re.compile(r"\s*SELECT\s+\*\s+FROM\s+devices(?:\s+WHERE\s+(?P<where>.+?))?\s*", re.I | re.S)
_CONDITION = re.compile(r"\s*(?P<path>[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*)\s*(?P<op>=|!=|<>)\s*"
                        r"(?P<value>'(?:[^']|'')*'|\"[^\"]*\"|-?\d+(?:\.\d+)?|true|false|null)\s*", re.I)
_AND = re.compile(r"AND\b", re.I)
_MISSING = object()


def _literal(text: str) -> Any:
    lowered = text.lower()
    if text[0] == "'":
        return text[1:-1].replace("''", "'")
    if text[0] == '"':
        return text[1:-1]
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    return float(text) if "." in text else int(text)


def _parse_query(query: Any) -> list[tuple[list[str], str, Any]]:
    match = _SELECT.fullmatch(query) if isinstance(query, str) else None
    if match is None:
        raise _hub_error(400, "ArgumentInvalid", f"query: the emulator supports SELECT * FROM devices [WHERE a = "
                         f"'x' [AND ...]], got {query!r}")
    where, position, conditions = match["where"] or "", 0, []
    while where:
        condition = _CONDITION.match(where, position)
        if condition is None:
            raise _hub_error(400, "ArgumentInvalid", f"query: cannot read the condition at {where[position:]!r}")
        conditions.append((condition["path"].split("."), condition["op"], _literal(condition["value"])))
        position = condition.end()
        if position == len(where):
            break
        joiner = _AND.match(where, position)
        if joiner is None:
            raise _hub_error(400, "ArgumentInvalid", f"query: expected AND at {where[position:]!r}")
        position = joiner.end()
    return conditions


def _matches(twin: dict, conditions: list[tuple[list[str], str, Any]]) -> bool:
    for path, op, expected in conditions:
        value: Any = twin
        for name in path:
            value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:  # comparisons with an undefined property are false, as in the hub's language
            return False
        if (value == expected) != (op == "="):
            return False
    return True


BULK_LIMIT = 100


class IotHubEmulator:
    """The device registry of one IoT hub, in memory. Thread-safe: every read and write holds ``_lock``."""

    def __init__(self, shared_access_key: str, guard: EntraGuard, *, policy_name: str = "iothubowner"):
        if guard.resource != IOT_HUB:
            raise ValueError(f"guard: a hub's tokens are for {IOT_HUB}, not {guard.resource}")
        self.shared_access_key = shared_access_key
        self.guard = guard
        self.policy_name = policy_name
        self.hostname = ""  # "127.0.0.1:PORT", set once the server listens
        self.reachable = True  # False: DPS cannot create devices here (its registrations end "failed")
        self._devices: dict[str, _Device] = {}
        self._lock = threading.Lock()
        self._etag_counter = itertools.count(secrets.randbelow(10 ** 8))

    def routes(self) -> list[Route]:
        device = r"/devices/(?P<device_id>[^/]+)"
        return [
            route("POST", r"/devices/query", self._query),
            route("POST", r"/devices", self._bulk),
            route("GET", r"/devices", self._list),
            route("GET", device, self._get),
            route("PUT", device, self._put),
            route("DELETE", device, self._delete),
            route("GET", r"/twins/(?P<device_id>[^/]+)", self._get_twin),
            route("PATCH", r"/twins/(?P<device_id>[^/]+)", self._patch_twin),
        ]

    # --- what DPS calls on a successful registration ------------------------------------------------
    def provision_device(self, device_id: str, *, initial_twin: dict | None, iot_edge: bool = False,
                         reset_twin: bool = False) -> dict:
        """Create or update ``device_id`` with CA authentication, as DPS does when it assigns a device.

        A new device gets the enrollment's initial twin (tags and desired properties). An existing one keeps
        its status (DPS does not re-enable a device an operator disabled in the hub) and keeps its twin
        unless the enrollment's reprovisionPolicy.migrateDeviceData is false (``reset_twin``).
        """
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                device = _Device(device_id=device_id, etag=self._new_etag(), status="enabled",
                                 authentication=_authentication({"type": "certificateAuthority"}),
                                 capabilities={"iotEdge": iot_edge})
                self._devices[device_id] = device
                reset_twin = True
            else:
                device.authentication = _authentication({"type": "certificateAuthority"})
                device.capabilities = {"iotEdge": iot_edge}
                device.etag = self._new_etag()
            if reset_twin:
                device.tags = _twin_section(initial_twin, "tags")
                device.desired = _twin_section(initial_twin, "properties", "desired")
                device.twin_version += 1
                device.twin_updated = utc_now()
            return device.identity_json()

    def device_status(self, device_id: str) -> str | None:
        """For demos and tests in the emulator's process: a device's status, or None if unknown."""
        with self._lock:
            device = self._devices.get(device_id)
            return device.status if device else None

    # --- REST ---------------------------------------------------------------------------------------
    def _authorize(self, request: Request, *actions: str) -> None:
        """``actions``: the data actions the operation needs (learn.microsoft.com/azure/iot-hub/
        authenticate-authorize-azure-ad#permissions-for-iot-hub-service-apis); an RBAC refusal is a 401
        ``IotHubUnauthorized``, as IoT Hub answers it (not a 403)."""
        problem = access_problem(request, sas_resource=f"{self.hostname}{request.path}", key=self.shared_access_key,
                                 policy_name=self.policy_name, guard=self.guard,
                                 actions=tuple(f"Microsoft.Devices/IotHubs/{a}" for a in actions))
        if problem and problem[0] == "unauthenticated":
            raise _hub_error(401, "IotHubUnauthorizedAccess", f"Unauthorized: {problem[1]}")
        if problem:
            raise _hub_error(401, "IotHubUnauthorized", problem[1])
        if not request.query.get("api-version"):
            raise _hub_error(400, "ArgumentInvalid", "api-version is required")

    def _new_etag(self) -> str:
        # The registry's device etags are base64 of a decimal counter (e.g. "MTk0ODc5ODk4").
        return base64.b64encode(str(next(self._etag_counter)).encode()).decode()

    def _find(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            raise _hub_error(404, "DeviceNotFound", f"Device {device_id!r} not found.")
        return device

    def _get(self, request: Request, device_id: str) -> Response:
        self._authorize(request, "devices/read")
        with self._lock:
            device = self._find(unquote(device_id))
            return Response(200, device.identity_json(), {"ETag": f'"{device.etag}"'})

    def _get_twin(self, request: Request, device_id: str) -> Response:
        self._authorize(request, "twins/read")
        with self._lock:
            twin = self._find(unquote(device_id)).twin_json()
        return Response(200, twin, {"ETag": f'"{twin["etag"]}"'})

    def _patch_twin(self, request: Request, device_id: str) -> Response:
        """UpdateTwin (PATCH /twins/{id}, the IoT Hub service API): ``tags`` and ``properties.desired`` merged into
        the twin as a JSON merge patch (a null removes the key), ``If-Match`` against the twin's etag (``*`` or
        absent: any). Reported properties "can be written only by the device" and twin keys exclude control
        characters, '.', '$' and space (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins): both are
        refused. Returns the twin with its new version."""
        self._authorize(request, "twins/write")
        body = request.json()
        if not isinstance(body, dict):
            raise _hub_error(400, "ArgumentInvalid", "the body must be a twin object")
        properties = body.get("properties") or {}
        if not isinstance(properties, dict) or "reported" in properties:
            raise _hub_error(400, "ArgumentInvalid", "reported properties are set by the device, not the back end")
        desired, tags = properties.get("desired") or {}, body.get("tags") or {}
        if not isinstance(desired, dict) or not isinstance(tags, dict):
            raise _hub_error(400, "ArgumentInvalid", "tags and properties.desired must be objects")
        bad = _bad_twin_key(desired) or _bad_twin_key(tags)
        if bad is not None:
            raise _hub_error(400, "ArgumentInvalid", f"twin key {bad!r}: keys exclude control characters, '.', '$' "
                             "and space")
        if_match = request.header("if-match")
        with self._lock:
            device = self._find(unquote(device_id))
            twin_etag = device.twin_json()["etag"]
            if if_match is not None and _unquote_etag(if_match) not in ("*", twin_etag):
                raise _hub_error(412, "PreconditionFailed", f"Precondition failed: the twin of {device_id!r} has "
                                 f"etag {twin_etag!r}, the request sent If-Match {if_match}.")
            device.desired = _merge_patch(device.desired, desired)
            device.tags = _merge_patch(device.tags, tags)
            device.twin_version += 1
            device.twin_updated = utc_now()
            twin = device.twin_json()
        return Response(200, twin, {"ETag": f'"{twin["etag"]}"'})

    def _list(self, request: Request) -> Response:
        self._authorize(request, "devices/read")
        top = request.query.get("top")
        with self._lock:
            devices = [d.identity_json() for d in self._devices.values()]
        return Response(200, devices[: int(top)] if top and top.isdigit() else devices)

    def _put(self, request: Request, device_id: str) -> Response:
        """Create (no If-Match: 409 if it exists) or replace (If-Match: etag or "*"; stale: 412) an identity."""
        self._authorize(request, "devices/write")
        device_id = unquote(device_id)
        if not _DEVICE_ID.fullmatch(device_id):
            raise _hub_error(400, "ArgumentInvalid", f"deviceId {device_id!r}: up to 128 of A-Z a-z 0-9 "
                             "- . % _ * ? ! ( ) , : = @ $ '")
        body = request.json()
        if not isinstance(body, dict):
            raise _hub_error(400, "ArgumentInvalid", "the body must be a device JSON object")
        if body.get("deviceId", device_id) != device_id:
            raise _hub_error(400, "ArgumentInvalid", f"deviceId in the body ({body.get('deviceId')!r}) differs "
                             f"from the one in the URI ({device_id!r})")
        status = body.get("status") or "enabled"
        if status not in ("enabled", "disabled"):
            raise _hub_error(400, "ArgumentInvalid", f"status must be 'enabled' or 'disabled', not {status!r}")
        authentication = _authentication(body.get("authentication"))
        if_match = request.header("if-match")
        with self._lock:
            device = self._devices.get(device_id)
            if if_match is None:
                if device is not None:
                    raise _hub_error(409, "DeviceAlreadyExists",
                                     f"A device with ID {device_id!r} is already registered.")
                device = _Device(device_id=device_id, etag="", status=status, authentication=authentication,
                                 capabilities={"iotEdge": False})
                self._devices[device_id] = device
            else:
                if device is None:
                    raise _hub_error(404, "DeviceNotFound", f"Device {device_id!r} not found.")
                if _unquote_etag(if_match) not in ("*", device.etag):
                    raise _hub_error(412, "PreconditionFailed", f"Precondition failed: device {device_id!r} has "
                                     f"etag {device.etag!r}, the request sent If-Match {if_match}.")
                if status != device.status:
                    device.status_updated = utc_now()
                device.status, device.authentication = status, authentication
            device.status_reason = body.get("statusReason")
            device.capabilities = {"iotEdge": bool((body.get("capabilities") or {}).get("iotEdge"))}
            device.device_scope = body.get("deviceScope")
            device.parent_scopes = list(body.get("parentScopes") or [])
            device.etag = self._new_etag()
            return Response(200, device.identity_json(), {"ETag": f'"{device.etag}"'})

    def _bulk(self, request: Request) -> Response:
        """``bulk_create_or_update_devices``: up to 100 identities per call; 200 when all succeed, otherwise 400
        with the per-device errors (the others are applied, as IoT Hub does)."""
        self._authorize(request, "devices/write", "devices/delete")  # Bulk Update Registry needs both
        body = request.json()
        if not isinstance(body, list) or not all(isinstance(d, dict) for d in body):
            raise _hub_error(400, "ArgumentInvalid", "the body must be a list of ExportImportDevice objects")
        if len(body) > BULK_LIMIT:
            raise _hub_error(400, "TooManyDevices", f"at most {BULK_LIMIT} devices per bulk call, got {len(body)}")
        ids = [d.get("id") for d in body]
        if len(set(ids)) != len(ids):
            raise _hub_error(400, "ArgumentInvalid", "a device may appear only once per bulk call")
        errors = []
        with self._lock:
            for item in body:
                problem = self._bulk_one(item)
                if problem:
                    errors.append({"deviceId": item.get("id"), "errorCode": problem[0], "errorStatus": problem[1],
                                   "operation": item.get("importMode")})
        return Response(400 if errors else 200, {"isSuccessful": not errors, "errors": errors, "warnings": []})

    def _bulk_one(self, item: dict) -> tuple[str, str] | None:
        device_id, mode = item.get("id"), item.get("importMode", "")
        if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
            return "ArgumentInvalid", f"id {device_id!r} is not a valid device id"
        status = item.get("status") or "enabled"
        if status not in ("enabled", "disabled"):
            return "ArgumentInvalid", f"status must be 'enabled' or 'disabled', not {status!r}"
        device = self._devices.get(device_id)
        if mode.endswith("IfMatchETag") and device is not None and \
                _unquote_etag(item.get("eTag") or "") not in ("*", device.etag):
            return "PreconditionFailed", f"device {device_id!r} has another etag"
        if mode in ("delete", "deleteIfMatchETag"):
            if device is None:
                return "DeviceNotFound", f"device {device_id!r} not found"
            del self._devices[device_id]
            return None
        if mode not in ("create", "update", "updateIfMatchETag"):
            return "ArgumentInvalid", f"importMode {mode!r} is not supported by the emulator"
        if mode == "create" and device is not None:
            return "DeviceAlreadyExists", f"a device with ID {device_id!r} is already registered"
        if device is None and mode != "create":
            # importMode update / updateIfMatchETag: "update an existing device identity" (ImportMode in the
            # registry's API): a device that does not exist is an error for that device, not a creation
            return "DeviceNotFound", f"device {device_id!r} not found"
        if device is None:
            device = _Device(device_id=device_id, etag="", status=status, authentication={},
                             capabilities={"iotEdge": False})
            self._devices[device_id] = device
        if status != device.status:
            device.status_updated = utc_now()
        device.status, device.status_reason = status, item.get("statusReason")
        device.authentication = _authentication(item.get("authentication"))
        device.capabilities = {"iotEdge": bool((item.get("capabilities") or {}).get("iotEdge"))}
        device.etag = self._new_etag()
        return None

    def _delete(self, request: Request, device_id: str) -> Response:
        self._authorize(request, "devices/delete")
        device_id = unquote(device_id)
        if_match = request.header("if-match")
        with self._lock:
            device = self._find(device_id)
            if if_match is not None and _unquote_etag(if_match) not in ("*", device.etag):
                raise _hub_error(412, "PreconditionFailed", f"Precondition failed: device {device_id!r} has "
                                 f"etag {device.etag!r}, the request sent If-Match {if_match}.")
            del self._devices[device_id]
        return Response(204)

    def _query(self, request: Request) -> Response:
        """``query_iot_hub``: twins matching the query, a page at a time (x-ms-continuation is an offset)."""
        self._authorize(request, "twins/read")
        body = request.json()
        conditions = _parse_query(body.get("query") if isinstance(body, dict) else None)
        page_size = request.header("x-ms-max-item-count") or str(DEFAULT_QUERY_PAGE)
        start = request.header("x-ms-continuation") or "0"
        if not page_size.isdigit() or int(page_size) < 1 or not start.isdigit():
            raise _hub_error(400, "ArgumentInvalid", "x-ms-max-item-count must be a positive integer and "
                             "x-ms-continuation a token from a previous page")
        with self._lock:
            twins = [twin for twin in (d.twin_json() for d in self._devices.values()) if _matches(twin, conditions)]
        end = int(start) + int(page_size)
        headers = {"x-ms-item-type": "twin"}
        if end < len(twins):
            headers["x-ms-continuation"] = str(end)
        return Response(200, twins[int(start):end], headers)
