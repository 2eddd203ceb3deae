"""DPS emulator: the service API of one DPS instance, and the device registration endpoint of all of them.

Service API (``DpsInstance``, what ``azure.iot.deviceprovisioning.DeviceProvisioningClient`` calls, with a
SAS token of the ``provisioningserviceowner`` policy or a Microsoft Entra token for
``https://azure-devices-provisioning.net`` whose principal holds a role granting the operation's data action
(``Microsoft.Devices/provisioningServices/enrollmentGroups/write``..., learn.microsoft.com/azure/iot-dps/
concepts-control-access-dps-azure-ad); ``api-version`` required; the SDK sends 2021-10-01):
``GET/PUT/DELETE /enrollmentGroups/{id}``, ``POST /enrollmentGroups/query``,
``GET/PUT/DELETE /enrollments/{id}``, ``POST /enrollments/query``,
``GET/DELETE /registrations/{id}``, ``POST /registrations/{enrollmentGroupId}/query``.

Device API (``DpsDeviceEndpoint``, mutual TLS, X.509 attestation; device SDKs send 2019-03-31 or 2021-06-01):
``PUT /{idScope}/registrations/{registrationId}/register`` and
``GET /{idScope}/registrations/{registrationId}/operations/{operationId}``.

Errors use DPS's shape ``{"errorCode", "trackingId", "message", "timestampUtc"}``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import re
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import requests
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from pki.export import thumbprints

from .core import HttpError, Request, Response, Route, der, route
from .identity import DPS, EntraGuard
from .iothub import IotHubEmulator, access_problem, iso, utc_now

# DPS error codes are the HTTP status followed by three digits
# (learn.microsoft.com/azure/iot-dps/how-to-troubleshoot-dps). 401002 is DPS's X.509 attestation failure
# (DESIGN.md section 4) and 400004 its invalid-argument code (seen in Azure/azure-sdk-for-python#35368);
# DPS documents no detail digits for the others, so these are the emulator's picks under the right status.
INVALID_ARGUMENT = 400004
# A full instance is a verdict on the request, so 400, not 409: the DPS SDK maps 409 to ResourceExistsError and
# clients/errors.py maps that to AlreadyExists, which callers treat as "done", and a quota must not read as success.
# DPS documents neither the status nor the code, so the emulator's are its own picks, and its message does not name
# the quota: clients must recognise a full instance without relying on either (clients/dps.py counts).
GROUP_QUOTA_EXCEEDED = 400010
UNAUTHORIZED = 401002
ENROLLMENT_DISABLED = 401005
NOT_FOUND = 404201
UNKNOWN_ID_SCOPE = 404104
ALREADY_EXISTS = 409201
PRECONDITION_FAILED = 412001
# An attestation that passed but could not be completed: the assigned hub did not take the device. DPS documents
# only the status (500, internal error) for this, so the detail digits are the emulator's pick.
ASSIGNMENT_FAILED = 500000
# The custom allocation webhook failed or answered what DPS cannot apply. concepts-custom-allocation has the webhook
# return the hub ("This must be one of the IoT hubs passed in the linkedHubs property"); without a usable answer there
# is no hub to assign, so the emulator fails the registration (the stricter reading; DPS documents no code for it,
# so the digits are the emulator's pick).
CUSTOM_ALLOCATION_FAILED = 400209
WEBHOOK_TIMEOUT_S = 30

# The message DPS sends with 401002 when no enrollment group's certificate is in the device's chain.
CHAIN_MISMATCH = "Signing certificate info did not match chain elements"
# Enrollment and group ids: "a case-insensitive string (up to 128 characters long) of alphanumeric characters
# plus certain special characters : . _ -. No special characters allowed at start or end" (the SDK's docs).
_RECORD_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9:._-]{0,126}[A-Za-z0-9])?")
# Registration ids, which individual enrollments are keyed by: "a case-insensitive string of alphanumeric characters
# plus the special characters: '-', '.', '_', ':'. The last character must be alphanumeric or dash ('-'). DPS supports
# registration IDs up to 128 characters long" (learn.microsoft.com/azure/iot-dps/concepts-service#registration-id).
# One rule for the enrollment API and for registration.
_REGISTRATION_ID = re.compile(r"[A-Za-z0-9:._-]{0,127}[A-Za-z0-9-]")
_ALLOCATION_POLICIES = {"hashed": "hashed", "geolatency": "geoLatency", "static": "static", "custom": "custom"}
# How long a device should wait before polling its registration operation (the Retry-After DPS sends).
DEFAULT_RETRY_AFTER_S = 1
# A chain longer than this is not a device chain; stops the issuer walk on a crafted loop.
MAX_CHAIN_DEPTH = 8
# "Maximum number of CA certificates registered to a single Azure IoT Hub Device Provisioning Service: 25"
# (learn.microsoft.com/azure/iot-dps/about-iot-dps#quotas-and-limits).
MAX_CA_CERTIFICATES = 25


@dataclass
class CaCertificate:
    """A CA certificate uploaded to the instance (its management resource ``.../certificates/{name}``)."""

    name: str
    certificate: x509.Certificate
    raw: bytes  # what was uploaded (PEM text or DER), returned as the resource's ``certificate``
    verified: bool
    etag: str
    created: dt.datetime
    updated: dt.datetime
    verification_code: str | None = None


def verified_path(chain: list[x509.Certificate], anchors: list[x509.Certificate],
                  now: dt.datetime) -> list[x509.Certificate] | None:
    """The path from the leaf to a verified CA certificate, validated as RFC 5280 says (signatures, validity, CA
    flag, keyCertSign, pathLen) by ``cryptography``'s verifier, or None when there is none.

    The web PKI's profile is kept (a stricter reading than DPS documents) except that a device certificate may
    lack a subjectAltName: DPS identifies devices by CN. The verified certificate must be among the certificates
    the device presented: DPS's docs have the device present its chain "up to and including" the verified one,
    and a chain that only reaches it through the instance's store is the lenient reading.
    """
    if not anchors:
        return None
    leaf_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    verifier = (verification.PolicyBuilder().store(verification.Store(anchors)).time(now)
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
                .build_client_verifier())
    try:
        path = verifier.verify(chain[0], chain[1:]).chain
    except verification.VerificationError:
        return None
    presented = {der(c) for c in chain}
    return path if der(path[-1]) in presented else None


# DPS's throttling answer: 429 with errorCode 429001 and Retry-After (learn.microsoft.com/azure/iot-dps/
# how-to-troubleshoot-dps, "429001 ThrottledRequests"); its answer to a server fault, 503.
THROTTLED = 429001
SERVICE_UNAVAILABLE = 503000


def dps_refusal(status: int, message: str) -> Response:
    """An injected fault in DPS's error shape (``core.FaultGate``)."""
    code = {429: THROTTLED, 503: SERVICE_UNAVAILABLE}.get(status, status * 1000)
    return dps_error(status, code, message).response


def dps_error(status: int, code: int, message: str) -> HttpError:
    return HttpError(status, {"errorCode": code, "trackingId": str(uuid.uuid4()), "message": message,
                              "timestampUtc": iso(utc_now())})


def etag_matches(if_match: str, etag: str) -> bool:
    return if_match.strip() == "*" or if_match.strip().removeprefix("W/").strip('"') == etag.strip('"')


def _certificate_info(cert: x509.Certificate) -> dict:
    """What DPS returns instead of the certificate it was given (X509CertificateInfo)."""
    def name(value: x509.Name) -> str:  # .NET's form: most specific RDN first, ", " between them
        return ", ".join(rdn.rfc4514_string() for rdn in reversed(value.rdns))

    prints = thumbprints(cert)
    return {"subjectName": name(cert.subject), "sha1Thumbprint": prints["sha1"],
            "sha256Thumbprint": prints["sha256"], "issuerName": name(cert.issuer),
            "notBeforeUtc": iso(cert.not_valid_before_utc), "notAfterUtc": iso(cert.not_valid_after_utc),
            "serialNumber": format(cert.serial_number, "X"), "version": cert.version.value + 1}


def _parse_certificate(entry: Any, where: str, previous: x509.Certificate | None) -> x509.Certificate:
    """The certificate of one attestation slot: PEM or base64 DER, as DPS accepts.

    A slot holding only ``info`` (what a GET returns, sent back by a get-modify-put update) keeps the stored
    certificate when the thumbprint is the same.
    """
    if not isinstance(entry, dict):
        raise dps_error(400, INVALID_ARGUMENT, f"{where} must be an object with a certificate")
    text = entry.get("certificate")
    if not text:
        info = entry.get("info") or {}
        if previous is not None and info.get("sha256Thumbprint") == thumbprints(previous)["sha256"]:
            return previous
        raise dps_error(400, INVALID_ARGUMENT, f"{where}.certificate is required")
    try:
        if not isinstance(text, str):
            raise ValueError("not a string")
        if "-----BEGIN" in text:
            return x509.load_pem_x509_certificate(text.encode())
        return x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        raise dps_error(400, INVALID_ARGUMENT,
                        f"{where}.certificate is not an X.509 certificate (PEM or base64 DER)") from None


@dataclass
class _Record:
    """An enrollment or enrollment group: its JSON (without certificate bodies) and parsed certificates."""

    body: dict
    certificates: dict[str, x509.Certificate]  # "primary" / "secondary"

    @property
    def enabled(self) -> bool:
        return self.body.get("provisioningStatus", "enabled") == "enabled"

    def holds(self, cert: x509.Certificate) -> bool:
        return any(der(c) == der(cert) for c in self.certificates.values())


@dataclass(frozen=True)
class _Kind:
    """What differs between individual enrollments and enrollment groups."""

    name: str  # in messages
    id_field: str
    certificate_field: str  # attestation.x509.<this>
    item_type: str  # x-ms-item-type of query answers
    id_rule: re.Pattern
    id_rule_text: str


_GROUP = _Kind("enrollment group", "enrollmentGroupId", "signingCertificates", "enrollmentGroup",
               _RECORD_ID, "up to 128 of A-Z a-z 0-9 : . _ -, starting and ending with a letter or digit")
_INDIVIDUAL = _Kind("enrollment", "registrationId", "clientCertificates", "enrollment", _REGISTRATION_ID,
                    "up to 128 of A-Z a-z 0-9 - . _ :, ending with a letter, digit or '-'")


@dataclass
class _Registration:
    state: dict
    enrollment_group_id: str | None


def _query_page(request: Request, items: list[dict], item_type: str) -> Response:
    """One page of a query answer; ``x-ms-continuation`` is the offset of the next page."""
    top = request.header("x-ms-max-item-count")
    start = request.header("x-ms-continuation") or "0"
    if (top is not None and (not top.isdigit() or int(top) < 1)) or not start.isdigit():
        raise dps_error(400, INVALID_ARGUMENT, "x-ms-max-item-count must be a positive integer and "
                        "x-ms-continuation a token from a previous page")
    end = int(start) + int(top) if top else len(items)
    headers = {"x-ms-item-type": item_type}
    if top:
        headers["x-ms-max-item-count"] = top
    if end < len(items):
        headers["x-ms-continuation"] = str(end)
    return Response(200, items[int(start):end], headers)


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


class DpsInstance:
    """One DPS instance in memory: enrollment groups, individual enrollments, registration states.

    Thread-safe: every read and write holds ``_lock``. Linked to one ``IotHubEmulator``, where it creates the
    devices it assigns.
    """

    def __init__(self, name: str, id_scope: str, shared_access_key: str, hub: IotHubEmulator, guard: EntraGuard,
                 max_groups: int = 100, *, policy_name: str = "provisioningserviceowner"):
        if guard.resource != DPS:
            raise ValueError(f"guard: DPS tokens are for {DPS}, not {guard.resource}")
        self.guard = guard
        self.name = name
        self.id_scope = id_scope
        self.shared_access_key = shared_access_key
        self.hub = hub
        self.max_groups = max_groups  # DPS allows 100 enrollment groups per instance (DESIGN.md section 4)
        self.policy_name = policy_name
        self.endpoint = ""  # "https://127.0.0.1:PORT", set once the server listens
        self._lock = threading.RLock()
        self._groups: dict[str, _Record] = {}  # keyed by lower-case id: DPS ids are case-insensitive
        self._enrollments: dict[str, _Record] = {}
        self._registrations: dict[str, _Registration] = {}
        self.ca_certificates: dict[str, CaCertificate] = {}  # by lower-case name; see emulators/arm.py

    @property
    def lock(self) -> threading.RLock:
        """Guards the instance's records, registration states and CA certificates (``emulators/arm.py`` takes it)."""
        return self._lock

    def linked_hubs(self) -> list[str]:
        """The IoT hubs linked to the instance (one here: the hub emulator)."""
        return [self.hub.hostname]

    def _one_entry_per_certificate(self, kind: _Kind, record_id: str, certificates: dict) -> None:
        """"A certificate can be specified in only one enrollment entry" (learn.microsoft.com/azure/iot-dps/
        concepts-x509-attestation): no other group or individual enrollment may hold the same certificate."""
        wanted = {der(c) for c in certificates.values()}
        for other_kind, store in ((_GROUP, self._groups), (_INDIVIDUAL, self._enrollments)):
            for key, record in store.items():
                if other_kind is kind and key == record_id.lower():
                    continue
                if any(der(c) in wanted for c in record.certificates.values()):
                    # a verdict on the request (400), not "it exists" (409): retrying cannot help, nor is it done
                    raise dps_error(400, INVALID_ARGUMENT, f"a certificate can be specified in only one enrollment "
                                    f"entry: it is in {other_kind.name} {record.body[other_kind.id_field]!r}")

    def trust(self, certificate: x509.Certificate, name: str | None = None) -> None:
        """Test set-up: upload ``certificate`` as already verified (what ``isVerified: true`` on upload does)."""
        now = utc_now()
        name = name or f"ca-{thumbprints(certificate)['sha1'][:16].lower()}"
        with self._lock:
            self.ca_certificates[name.lower()] = CaCertificate(name, certificate, der(certificate), True,
                                                               secrets.token_hex(8), now, now)

    def group_ids(self) -> list[str]:
        """Test inspection: the ids of every enrollment group on this instance."""
        with self._lock:
            return sorted(record.body["enrollmentGroupId"] for record in self._groups.values())

    def routes(self) -> list[Route]:
        def records(collection: str, kind: _Kind, store: dict[str, _Record]) -> list[Route]:
            one = rf"/{collection}/(?P<record_id>[^/]+)"

            def guarded(action: str, handler):
                def run(request: Request, **groups: str) -> Response:
                    self._authorize(request, f"{collection}/{action}")
                    return handler(request, **groups)
                return run

            return [
                route("POST", rf"/{collection}/query", guarded("read", lambda r: self._query(r, kind, store))),
                route("GET", one, guarded("read", lambda r, record_id: self._get(r, kind, store, record_id))),
                route("PUT", one, guarded("write", lambda r, record_id: self._put(r, kind, store, record_id))),
                route("DELETE", one, guarded("delete",
                                             lambda r, record_id: self._delete(r, kind, store, record_id))),
            ]

        registration = r"/registrations/(?P<registration_id>[^/]+)"
        return [
            *records("enrollmentGroups", _GROUP, self._groups),
            *records("enrollments", _INDIVIDUAL, self._enrollments),
            route("POST", r"/registrations/(?P<group_id>[^/]+)/query", self._query_registrations),
            route("GET", registration, self._get_registration),
            route("DELETE", registration, self._delete_registration),
        ]

    # --- service API ----------------------------------------------------------------------------------
    def _authorize(self, request: Request, action: str) -> None:
        """DPS documents 401 as its answer when authorization fails ("the authorization token can't be validated",
        learn.microsoft.com/azure/iot-dps/how-to-troubleshoot-dps) and no 403 for the service API; a principal
        without a role is answered 401 as well, in the words of its sibling IoT Hub."""
        host = self.endpoint.removeprefix("https://")
        problem = access_problem(request, sas_resource=f"{host}{request.path}", key=self.shared_access_key,
                                 policy_name=self.policy_name, guard=self.guard,
                                 actions=(f"Microsoft.Devices/provisioningServices/{action}",))
        if problem:
            raise dps_error(401, UNAUTHORIZED, f"Unauthorized: {problem[1]}")
        if not request.query.get("api-version"):
            raise dps_error(400, INVALID_ARGUMENT, "api-version is required")

    @staticmethod
    def _response(kind: _Kind, record: _Record) -> Response:
        body = copy.deepcopy(record.body)
        slots = body["attestation"]["x509"][kind.certificate_field]
        for slot, cert in record.certificates.items():
            slots[slot] = {"info": _certificate_info(cert)}
        definition = body.get("customAllocationDefinition")
        if isinstance(definition, dict) and "?" in str(definition.get("webhookUrl")):
            # DPS shows the webhook's query (its function key) as "?****" (learn.microsoft.com/azure/iot-dps/
            # concepts-custom-allocation, the AllocationRequest example); it calls the URL as given.
            definition["webhookUrl"] = definition["webhookUrl"].split("?", 1)[0] + "?****"
        return Response(200, body, {"ETag": body["etag"]})

    def _find(self, kind: _Kind, store: dict[str, _Record], record_id: str) -> _Record:
        record = store.get(record_id.lower())
        if record is None:
            raise dps_error(404, NOT_FOUND, f"{kind.name} {record_id!r} not found")
        return record

    def _get(self, request: Request, kind: _Kind, store: dict[str, _Record], record_id: str) -> Response:
        with self._lock:
            return self._response(kind, self._find(kind, store, unquote(record_id)))

    def _query(self, request: Request, kind: _Kind, store: dict[str, _Record]) -> Response:
        spec = request.json()
        query = spec.get("query") if isinstance(spec, dict) else None
        collection = "enrollmentGroups" if kind is _GROUP else "enrollments"
        # DPS's query language selects whole collections only: "*" or "SELECT * FROM <collection>".
        if not isinstance(query, str) or not re.fullmatch(rf"\*|\s*SELECT\s+\*\s+FROM\s+{collection}\s*", query,
                                                          re.I):
            raise dps_error(400, INVALID_ARGUMENT, f"query must be '*' or 'SELECT * FROM {collection}', "
                            f"got {query!r}")
        with self._lock:
            items = [self._response(kind, record).body for record in store.values()]
        return _query_page(request, items, kind.item_type)

    def _put(self, request: Request, kind: _Kind, store: dict[str, _Record], record_id: str) -> Response:
        """Create (no If-Match; 409 if it exists, as DPS answers) or replace (If-Match: its etag or "*")."""
        record_id = unquote(record_id)
        if not kind.id_rule.fullmatch(record_id):
            raise dps_error(400, INVALID_ARGUMENT, f"{kind.id_field} {record_id!r}: {kind.id_rule_text}")
        body = request.json()
        if not isinstance(body, dict):
            raise dps_error(400, INVALID_ARGUMENT, f"the body must be an {kind.name} JSON object")
        if_match = request.header("if-match")
        with self._lock:
            existing = store.get(record_id.lower())
            if existing is None and if_match is not None:
                # RFC 7232 3.1: If-Match fails when there is no current representation.
                raise dps_error(412, PRECONDITION_FAILED, f"{kind.name} {record_id!r} does not exist; "
                                "send no If-Match to create it")
            if existing is not None and if_match is None:
                raise dps_error(409, ALREADY_EXISTS, f"{kind.name} {record_id!r} already exists; send its etag "
                                "in If-Match to replace it")
            if existing is not None and not etag_matches(if_match, existing.body["etag"]):
                raise dps_error(412, PRECONDITION_FAILED, f"{kind.name} {record_id!r} has etag "
                                f"{existing.body['etag']}, the request sent If-Match {if_match}")
            if existing is None and kind is _GROUP and len(store) >= self.max_groups:
                raise dps_error(400, GROUP_QUOTA_EXCEEDED, f"{kind.name} {record_id!r} cannot be created: this "
                                f"instance holds {len(store)} of them")
            record = self._validated(kind, record_id, body, existing)
            store[record_id.lower()] = record
            return self._response(kind, record)

    def _validated(self, kind: _Kind, record_id: str, body: dict, existing: _Record | None) -> _Record:
        body = copy.deepcopy(body)
        given_id = body.setdefault(kind.id_field, record_id)
        if not isinstance(given_id, str) or given_id.lower() != record_id.lower():
            raise dps_error(400, INVALID_ARGUMENT, f"{kind.id_field} in the body ({given_id!r}) differs from the "
                            f"one in the URI ({record_id!r})")
        attestation = body.get("attestation")
        if not isinstance(attestation, dict) or attestation.get("type") != "x509":
            raise dps_error(400, INVALID_ARGUMENT, "attestation.type: the emulator supports 'x509' only")
        slots = (attestation.get("x509") or {}).get(kind.certificate_field)
        where = f"attestation.x509.{kind.certificate_field}"
        if not isinstance(slots, dict) or not slots.get("primary"):
            raise dps_error(400, INVALID_ARGUMENT, f"{where}.primary is required")
        previous = existing.certificates if existing else {}
        certificates = {slot: _parse_certificate(slots[slot], f"{where}.{slot}", previous.get(slot))
                        for slot in ("primary", "secondary") if slots.get(slot)}
        attestation["x509"] = {kind.certificate_field: {slot: {} for slot in certificates}}
        status = body.setdefault("provisioningStatus", "enabled")
        if status not in ("enabled", "disabled"):
            raise dps_error(400, INVALID_ARGUMENT, f"provisioningStatus must be 'enabled' or 'disabled', "
                            f"not {status!r}")
        policy = body.get("allocationPolicy")
        if policy is not None:
            if str(policy).lower() not in _ALLOCATION_POLICIES:
                raise dps_error(400, INVALID_ARGUMENT, f"allocationPolicy must be one of "
                                f"{', '.join(_ALLOCATION_POLICIES.values())}, not {policy!r}")
            body["allocationPolicy"] = _ALLOCATION_POLICIES[str(policy).lower()]
        if body.get("iotHubs") and policy is None:
            # DPS's own wording for this rule (Azure/azure-sdk-for-python#35368).
            raise dps_error(400, INVALID_ARGUMENT, "Enrollment allocationPolicy must be specified when iotHubs "
                            "are specified.")
        hubs = body.get("iotHubs") or []
        if not isinstance(hubs, list) or not all(isinstance(h, str) for h in hubs):
            raise dps_error(400, INVALID_ARGUMENT, "iotHubs must be a list of IoT hub host names")
        unlinked = sorted({h.lower() for h in hubs} - {h.lower() for h in self.linked_hubs()})
        if unlinked:
            # "The IoT hubs ... must be linked to the DPS instance" (learn.microsoft.com/azure/iot-dps/
            # how-to-use-allocation-policies)
            raise dps_error(400, INVALID_ARGUMENT, f"iotHubs {', '.join(unlinked)} are not linked to this instance "
                            f"(linked: {', '.join(self.linked_hubs())})")
        definition = body.get("customAllocationDefinition")
        if body.get("allocationPolicy") == "custom" and not (
                isinstance(definition, dict) and all(isinstance(definition.get(k), str) and definition[k]
                                                     for k in ("webhookUrl", "apiVersion"))):
            # CustomAllocationDefinition requires both (service.json 2021-10-01); a custom policy without them has
            # nothing to call, which the stricter reading refuses rather than stores
            raise dps_error(400, INVALID_ARGUMENT, "allocationPolicy custom needs customAllocationDefinition with "
                            "webhookUrl and apiVersion")
        if body.get("allocationPolicy") == "static" and len(hubs) != 1:
            raise dps_error(400, INVALID_ARGUMENT, "allocationPolicy static assigns to exactly one IoT hub: give "
                            "iotHubs with one linked hub")
        self._one_entry_per_certificate(kind, record_id, certificates)
        if body.get("initialTwin") is not None and not isinstance(body["initialTwin"], dict):
            raise dps_error(400, INVALID_ARGUMENT, "initialTwin must be an object")
        body.setdefault("reprovisionPolicy", {"updateHubAssignment": True, "migrateDeviceData": True})
        body.setdefault("capabilities", {"iotEdge": False})
        now = iso(utc_now())
        body["createdDateTimeUtc"] = existing.body["createdDateTimeUtc"] if existing else now
        body["lastUpdatedDateTimeUtc"] = now
        body["etag"] = f'"{uuid.uuid4()}"'  # a new etag on every write
        return _Record(body, certificates)

    def _delete(self, request: Request, kind: _Kind, store: dict[str, _Record], record_id: str) -> Response:
        record_id = unquote(record_id)
        if_match = request.header("if-match")
        with self._lock:
            record = self._find(kind, store, record_id)
            if if_match is not None and not etag_matches(if_match, record.body["etag"]):
                raise dps_error(412, PRECONDITION_FAILED, f"{kind.name} {record_id!r} has etag "
                                f"{record.body['etag']}, the request sent If-Match {if_match}")
            del store[record_id.lower()]
        return Response(204)

    def _find_registration(self, registration_id: str) -> _Registration:
        registration = self._registrations.get(registration_id.lower())
        if registration is None:
            raise dps_error(404, NOT_FOUND, f"registration {registration_id!r} not found")
        return registration

    def _get_registration(self, request: Request, registration_id: str) -> Response:
        self._authorize(request, "registrationStates/read")
        with self._lock:
            state = copy.deepcopy(self._find_registration(unquote(registration_id)).state)
        return Response(200, state, {"ETag": state["etag"]})

    def _delete_registration(self, request: Request, registration_id: str) -> Response:
        self._authorize(request, "registrationStates/delete")
        registration_id = unquote(registration_id)
        if_match = request.header("if-match")
        with self._lock:
            registration = self._find_registration(registration_id)
            if if_match is not None and not etag_matches(if_match, registration.state["etag"]):
                raise dps_error(412, PRECONDITION_FAILED, f"registration {registration_id!r} has etag "
                                f"{registration.state['etag']}, the request sent If-Match {if_match}")
            del self._registrations[registration_id.lower()]
        return Response(204)

    def _query_registrations(self, request: Request, group_id: str) -> Response:
        """The registration states of the devices that registered through one enrollment group."""
        self._authorize(request, "registrationStates/read")
        group_id = unquote(group_id).lower()
        with self._lock:
            items = [copy.deepcopy(r.state) for r in self._registrations.values()
                     if (r.enrollment_group_id or "").lower() == group_id]
        return _query_page(request, items, "deviceRegistration")

    # --- device registration --------------------------------------------------------------------------
    def register(self, registration_id: str, chain: list[x509.Certificate], now: dt.datetime,
                 payload: Any = None) -> dict:
        """X.509 attestation as DPS does it. A failed attestation is an ``HttpError`` with DPS's error body (the
        register call itself is refused); otherwise the registration state of the attempt, whose ``status`` the
        operation then reports: ``assigned`` (the device is in the hub), ``disabled`` (its enrollment or group is
        disabled) or ``failed`` (the hub did not take it). Every attempt is recorded as the device's registration
        state, refused ones included (``status``, ``errorCode``, ``errorMessage``, no ``assignedHub``).

        Order (learn.microsoft.com/azure/iot-dps/concepts-x509-attestation): the leaf's CN is the
        registration id; an individual enrollment for that id decides alone (its certificate must be the
        leaf; disabled refuses - the documented way to block one device of a group); otherwise the enrollment
        group whose signing certificate is on the device's chain to a verified CA certificate (``verified_path``).
        An entry with ``allocationPolicy`` custom asks its webhook (``_allocation``), outside the lock, with the
        device's ``payload``; the webhook's answer decides the hub and the initial twin, and its payload is returned
        to the device in the registration state.
        """
        if not _REGISTRATION_ID.fullmatch(registration_id):
            raise dps_error(400, INVALID_ARGUMENT, f"registrationId {registration_id!r}: {_INDIVIDUAL.id_rule_text}")
        if not chain:
            raise dps_error(401, UNAUTHORIZED, "Unauthorized: the device presented no client certificate")
        leaf = chain[0]
        cn = common_name(leaf)
        if cn != registration_id:
            raise dps_error(401, UNAUTHORIZED, f"Unauthorized: the certificate's CN ({cn!r}) is not the "
                            f"registration id ({registration_id!r})")
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise dps_error(401, UNAUTHORIZED, f"Unauthorized: the device certificate is not valid at {iso(now)} "
                            f"(valid {iso(leaf.not_valid_before_utc)} to {iso(leaf.not_valid_after_utc)})")
        with self._lock:
            enrollment = self._enrollments.get(registration_id.lower())
            if enrollment is not None:
                if not enrollment.holds(leaf):
                    raise dps_error(401, UNAUTHORIZED, "Unauthorized: the device certificate is not the one in "
                                    f"the individual enrollment {registration_id!r}")
                if not enrollment.enabled:
                    return self._refused(registration_id, None, "disabled", ENROLLMENT_DISABLED,
                                         f"Enrollment {registration_id!r} is disabled", now)
                entry, group_id = enrollment, None
            else:
                entry, group_id = self._attested_group(registration_id, chain, now)
                if not entry.enabled:
                    return self._refused(registration_id, group_id, "disabled", ENROLLMENT_DISABLED,
                                         f"Enrollment group {group_id!r} is disabled", now)
            body = copy.deepcopy(entry.body)
            previous = self._registrations.get(registration_id.lower())
        allocation = None
        if body.get("allocationPolicy") == "custom":
            allocation, problem = self._allocation(body, group_id, registration_id, leaf, previous, payload)
            if problem:
                with self._lock:
                    return self._refused(registration_id, group_id, "failed", CUSTOM_ALLOCATION_FAILED, problem, now)
        with self._lock:
            return self._assign(registration_id, entry, group_id, now, allocation)

    def _attested_group(self, registration_id: str, chain: list[x509.Certificate],
                        now: dt.datetime) -> tuple[_Record, str]:
        anchors = [c.certificate for c in self.ca_certificates.values() if c.verified]
        path = verified_path(chain, anchors, now)
        if path is None:
            # DPS answers every failed X.509 group attestation the same way: no verified CA reached, a link
            # missing or forged, a CA rule broken.
            raise dps_error(401, UNAUTHORIZED, CHAIN_MISMATCH)
        group_id, group = self._matching_group(path)
        if group is None:
            raise dps_error(401, UNAUTHORIZED, CHAIN_MISMATCH)
        return group, group_id

    def _allocation(self, body: dict, group_id: str | None, registration_id: str, leaf: x509.Certificate,
                    previous: _Registration | None, payload: Any) -> tuple[dict | None, str | None]:
        """POST the AllocationRequest (concepts-custom-allocation) to the entry's webhook; its answer, or why the
        registration fails: the webhook unreachable or answering non-2xx, or a hub that is not linked."""
        shown = self._response(_GROUP if group_id is not None else _INDIVIDUAL, _Record(body, {})).body
        shown["attestation"] = {"type": "x509"}  # as the docs' example shows it: the type, no certificates
        # concepts-custom-allocation says only that x509 "contains certificate details"; webhooks in the field read
        # the presented certificate from x509.clientCertificate as base64 DER, which is what is sent here
        context: dict[str, Any] = {"registrationId": registration_id,
                                   "x509": {"clientCertificate": base64.b64encode(der(leaf)).decode()}}
        if previous is not None and previous.state.get("assignedHub"):
            context["currentIotHubHostName"] = previous.state["assignedHub"]
            context["currentDeviceId"] = previous.state.get("deviceId")
        if payload is not None:
            context["payload"] = payload
        request = {"enrollmentGroup" if group_id is not None else "individualEnrollment": shown,
                   "deviceRuntimeContext": context, "linkedHubs": self.linked_hubs()}
        url = body["customAllocationDefinition"]["webhookUrl"]
        try:
            answer = requests.post(url, json=request, timeout=WEBHOOK_TIMEOUT_S)
        except requests.RequestException as exc:
            return None, f"The custom allocation webhook could not be reached: {type(exc).__name__}"
        if not answer.ok:
            return None, f"The custom allocation webhook answered {answer.status_code}"
        try:
            allocation = answer.json()
        except ValueError:
            return None, "The custom allocation webhook did not answer JSON"
        hub = allocation.get("iotHubHostName") if isinstance(allocation, dict) else None
        if hub not in self.linked_hubs():
            return None, f"The custom allocation webhook chose {hub!r}, which is not a hub linked to this instance"
        return allocation, None

    def _refused(self, registration_id: str, group_id: str | None, status: str, code: int, message: str,
                 now: dt.datetime) -> dict:
        """Record an attempt that did not end in an assignment (it replaces the previous state, hub and all)."""
        previous = self._registrations.get(registration_id.lower())
        state = {"registrationId": registration_id,
                 "createdDateTimeUtc": previous.state["createdDateTimeUtc"] if previous else iso(now),
                 "status": status, "errorCode": code, "errorMessage": message,
                 "lastUpdatedDateTimeUtc": iso(now), "etag": f'"{uuid.uuid4()}"'}
        self._registrations[registration_id.lower()] = _Registration(state, group_id)
        return copy.deepcopy(state)

    def _matching_group(self, path: list[x509.Certificate]) -> tuple[str, _Record | None]:
        """The group holding the signing certificate closest to the leaf on the validated path (which holds only
        certificates the device presented, up to a verified one)."""
        for cert in path[1:]:
            for record in self._groups.values():
                if record.holds(cert):
                    return record.body["enrollmentGroupId"], record
        return "", None

    def _assign(self, registration_id: str, enrollment: _Record, group_id: str | None, now: dt.datetime,
                allocation: dict | None = None) -> dict:
        body = enrollment.body
        twin = (allocation or {}).get("initialTwin") or body.get("initialTwin")
        device_id = body.get("deviceId") or registration_id
        previous = self._registrations.get(registration_id.lower())
        migrate = (body.get("reprovisionPolicy") or {}).get("migrateDeviceData", True)
        if not self.hub.reachable:
            return self._refused(registration_id, group_id, "failed", ASSIGNMENT_FAILED,
                                 f"The IoT hub {self.hub.hostname} did not accept device {device_id!r}.", now)
        self.hub.provision_device(device_id, initial_twin=twin,
                                  iot_edge=bool((body.get("capabilities") or {}).get("iotEdge")),
                                  reset_twin=not migrate)
        state = {
            "registrationId": registration_id,
            "createdDateTimeUtc": previous.state["createdDateTimeUtc"] if previous else iso(now),
            "assignedHub": self.hub.hostname, "deviceId": device_id, "status": "assigned",
            # Re-registering to the same (only) hub is "reprovisionedToInitialAssignment" in DPS's terms.
            "substatus": "reprovisionedToInitialAssignment" if previous else "initialAssignment",
            "lastUpdatedDateTimeUtc": iso(now), "etag": f'"{uuid.uuid4()}"',
        }
        if allocation and allocation.get("payload") is not None:
            state["payload"] = allocation["payload"]  # DeviceRegistrationResult.payload (device.json)
        self._registrations[registration_id.lower()] = _Registration(state, group_id)
        device_state = copy.deepcopy(state)
        if group_id is not None:
            device_state["x509"] = {"enrollmentGroupId": group_id}
        return device_state


@dataclass
class _Operation:
    id_scope: str
    registration_id: str
    registration_state: dict
    polls: int = 0


class DpsDeviceEndpoint:
    """The device-facing endpoint (global.azure-devices-provisioning.net), routing by ID scope. Thread-safe."""

    def __init__(self, instances: dict[str, DpsInstance], *, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        self.instances = instances
        self.retry_after_s = retry_after_s
        self._operations: dict[str, _Operation] = {}
        self._lock = threading.Lock()

    def routes(self) -> list[Route]:
        registration = r"/(?P<id_scope>[^/]+)/registrations/(?P<registration_id>[^/]+)"
        return [
            route("PUT", registration + r"/register", self._register),
            route("GET", registration + r"/operations/(?P<operation_id>[^/]+)", self._operation),
        ]

    def _instance(self, id_scope: str, api_version: str | None) -> DpsInstance:
        if not api_version:
            raise dps_error(400, INVALID_ARGUMENT, "api-version is required")
        instance = self.instances.get(id_scope)
        if instance is None:
            raise dps_error(404, UNKNOWN_ID_SCOPE, f"ID scope {id_scope!r} not found")
        return instance

    def _register(self, request: Request, id_scope: str, registration_id: str) -> Response:
        return self.register(unquote(id_scope), unquote(registration_id), request.query.get("api-version"),
                             request.peer_chain, request.json())

    def _operation(self, request: Request, id_scope: str, registration_id: str, operation_id: str) -> Response:
        return self.operation_status(unquote(id_scope), unquote(registration_id), request.query.get("api-version"),
                                     request.peer_chain, unquote(operation_id))

    def register(self, id_scope: str, registration_id: str, api_version: str | None,
                 peer_chain: list[x509.Certificate], body: Any) -> Response:
        """Attest now (DPS answers an X.509 refusal on the register call itself); the device then polls. The same
        for HTTPS and MQTT (emulators/dps_mqtt.py): only how the answer travels differs."""
        instance = self._instance(id_scope, api_version)
        if body is not None and (not isinstance(body, dict)
                                 or body.get("registrationId", registration_id) != registration_id):
            raise dps_error(400, INVALID_ARGUMENT, "registrationId in the body differs from the one in the URI")
        if body and body.get("payload") is not None and not isinstance(body["payload"], dict):
            # how-to-send-additional-data: "The payload property must be a JSON object"
            raise dps_error(400, INVALID_ARGUMENT, "payload must be a JSON object")
        state = instance.register(registration_id, peer_chain, utc_now(),
                                  payload=body.get("payload") if body else None)
        operation_id = f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"
        with self._lock:
            self._operations[operation_id] = _Operation(instance.id_scope, registration_id, state)
        return Response(202, {"operationId": operation_id, "status": "assigning"},
                        {"Retry-After": str(self.retry_after_s)})

    def operation_status(self, id_scope: str, registration_id: str, api_version: str | None,
                         peer_chain: list[x509.Certificate], operation_id: str) -> Response:
        """The first poll answers 202 "assigning" (so clients must honour Retry-After and poll again), then 200
        with the outcome: ``assigned``, ``disabled`` or ``failed``, and the registration state
        (device.json: OperationStatusLookup declares 202 while the operation runs and 200 when it is done)."""
        instance = self._instance(id_scope, api_version)
        if not peer_chain or common_name(peer_chain[0]) != registration_id:
            raise dps_error(401, UNAUTHORIZED, "Unauthorized: present the certificate of the registering device")
        with self._lock:
            operation = self._operations.get(operation_id)
            if operation is None or (operation.id_scope, operation.registration_id) != (instance.id_scope,
                                                                                        registration_id):
                raise dps_error(404, NOT_FOUND, f"operation {operation_id!r} not found for registration "
                                f"{registration_id!r}")
            operation.polls += 1
            if operation.polls == 1:
                return Response(202, {"operationId": operation_id, "status": "assigning"},
                                {"Retry-After": str(self.retry_after_s)})
            state = copy.deepcopy(operation.registration_state)
            return Response(200, {"operationId": operation_id, "status": state["status"],
                                  "registrationState": state})
