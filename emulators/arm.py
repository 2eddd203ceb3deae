"""Azure Resource Manager, the part of it this project drives: the CA certificates of DPS instances.

Routes (``Microsoft.Devices/provisioningServices`` 2022-02-05, ``iotdps.json``; what
``azure.mgmt.iothubprovisioningservices.IotDpsClient.dps_certificate`` sends; paths compared case-insensitively,
as ARM does)::

    GET    /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Devices/provisioningServices/{dps}/certificates
    GET    .../certificates/{name}
    PUT    .../certificates/{name}                          (If-Match to replace; ``properties.isVerified`` true
                                                              uploads it verified, as the portal's checkbox does)
    DELETE .../certificates/{name}                          (If-Match required)
    POST   .../certificates/{name}/generateVerificationCode (If-Match required)
    POST   .../certificates/{name}/verify                   (If-Match required; body {"certificate": PEM or base64})

Proof of possession (learn.microsoft.com/azure/iot-dps/how-to-verify-certificates): the verification certificate's
subject CN is the code last generated for that certificate and it is signed by the uploaded certificate's key;
then ``isVerified`` is true. A certificate changed by a PUT is unverified again.

Callers need a Microsoft Entra token for ``https://management.azure.com`` and a role on the DPS instance whose
``actions`` grant the operation (``Microsoft.Devices/provisioningServices/certificates/write``...); ARM answers
401 ``InvalidAuthenticationToken`` / 403 ``AuthorizationFailed`` in its own words. The resource provider's errors
use DPS's ``ErrorDetails`` shape ``{"code", "httpStatusCode", "message", "details"}``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
import secrets
from email.utils import format_datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from pki.export import thumbprints

from .core import HttpError, Request, Response, Route
from .dps import MAX_CA_CERTIFICATES, CaCertificate, DpsInstance, etag_matches
from .identity import MANAGEMENT, TokenIssuer, TokenRejected
from .iothub import utc_now

API_VERSIONS = frozenset({"2022-02-05"})
_PROVIDER = "Microsoft.Devices/provisioningServices"
_CERT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the portal's rule for certificate names
_BASE = (r"/subscriptions/(?P<subscription>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/"
         r"Microsoft\.Devices/provisioningServices/(?P<dps>[^/]+)/certificates")


def _rfc7231(moment) -> str:
    return format_datetime(moment, usegmt=True)


def arm_refusal(status: int, message: str) -> Response:
    """An injected fault as ARM answers it (429 ``TooManyRequests``, 503 ``ServiceUnavailable``)."""
    return _arm_error(status, {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(status, "InternalServerError"),
                      message).response


def _arm_error(status: int, code: str, message: str) -> HttpError:
    return HttpError(status, {"error": {"code": code, "message": message}})


def _rp_error(status: int, code: int, message: str) -> HttpError:
    reasons = {400: "BadRequest", 404: "NotFound", 409: "Conflict", 412: "PreconditionFailed"}
    # ErrorDetails.code is a string in the 2022-02-05 spec (the SDK 2.1 models an int from a newer version)
    return HttpError(status, {"code": str(code), "httpStatusCode": reasons.get(status, str(status)), "message": message,
                              "details": None})


def _certificate_bytes(text: Any, where: str) -> tuple[bytes, x509.Certificate]:
    """A certificate as the API takes it: PEM text, base64 of PEM text, or base64 of DER."""
    if not isinstance(text, str) or not text.strip():
        raise _rp_error(400, 400004, f"{where} is required (PEM or base64)")
    candidates = [text.encode()]
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    for raw in candidates:
        try:
            if b"-----BEGIN CERTIFICATE-----" in raw:
                return raw, x509.load_pem_x509_certificate(raw)
            return raw, x509.load_der_x509_certificate(raw)
        except ValueError:
            continue
    raise _rp_error(400, 400004, f"{where} is not an X.509 certificate (PEM or base64)")


class ResourceManagerEmulator:
    """ARM for the DPS instances of one local subscription and resource group."""

    def __init__(self, issuer: TokenIssuer, instances: list[DpsInstance], *, resource_group: str = "pki-local"):
        self.issuer = issuer
        self.subscription_id = issuer.subscription_id
        self.resource_group = resource_group
        self.instances = {d.name.lower(): d for d in instances}
        self._etags = itertools.count(secrets.randbelow(10 ** 6))

    def resource_id(self, instance: DpsInstance) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
                f"{_PROVIDER}/{instance.name}")

    def routes(self) -> list[Route]:
        one = _BASE + r"/(?P<name>[^/]+)"
        return [(method, re.compile(pattern + "/?", re.IGNORECASE), self._guarded(handler, action))
                for method, pattern, handler, action in (
                    ("GET", _BASE, self._list, "certificates/read"),
                    ("GET", one, self._get, "certificates/read"),
                    ("PUT", one, self._put, "certificates/write"),
                    ("DELETE", one, self._delete, "certificates/delete"),
                    ("POST", one + "/generateVerificationCode", self._code,
                     "certificates/generateVerificationCode/action"),
                    ("POST", one + "/verify", self._verify, "certificates/verify/action"))]

    # -- what every request goes through -------------------------------------------------------------
    def _guarded(self, handler, action: str):
        def run(request: Request, subscription: str, group: str, dps: str, **groups: str) -> Response:
            try:
                claims = self.issuer.verify(request.header("authorization"), MANAGEMENT)
            except TokenRejected as exc:
                code = "AuthenticationFailed" if exc.kind == "missing" else "InvalidAuthenticationToken"
                raise HttpError(401, {"error": {"code": code, "message": str(exc)}},
                                {"WWW-Authenticate": f'Bearer authorization_uri="https://login.microsoftonline.com/'
                                                    f'{self.issuer.tenant_id}", error="invalid_token"'}) from None
            if request.query.get("api-version") not in API_VERSIONS:
                raise _arm_error(400, "InvalidApiVersionParameter",
                                 f"The api-version '{request.query.get('api-version')}' is invalid. The supported "
                                 f"versions are '{', '.join(sorted(API_VERSIONS))}'.")
            instance = self.instances.get(dps.lower())
            if subscription.lower() != self.subscription_id.lower() or group.lower() != self.resource_group.lower() \
                    or instance is None:
                raise _arm_error(404, "ResourceNotFound", f"The Resource '{_PROVIDER}/{dps}' under resource group "
                                                          f"'{group}' was not found.")
            scope = f"{self.resource_id(instance)}/certificates/{groups.get('name', '')}".rstrip("/")
            full_action = f"{_PROVIDER}/{action}"
            if not instance.guard.roles.allows(claims["oid"], full_action, management=True):
                raise _arm_error(403, "AuthorizationFailed",
                                 f"The client '{claims.get('appid')}' with object id '{claims['oid']}' does not have "
                                 f"authorization to perform action '{full_action}' over scope '{scope}' or the scope "
                                 "is invalid. If access was recently granted, please refresh your credentials.")
            return handler(request, instance, **groups)

        return run

    # -- the certificates resource --------------------------------------------------------------------
    def _resource(self, instance: DpsInstance, record: CaCertificate) -> dict:
        return {"id": f"{self.resource_id(instance)}/certificates/{record.name}", "name": record.name,
                "type": "Microsoft.Devices/ProvisioningServices/Certificates", "etag": record.etag,
                "properties": self._properties(record)}

    @staticmethod
    def _properties(record: CaCertificate) -> dict:
        cert = record.certificate
        subject = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return {"subject": str(subject[0].value) if subject else cert.subject.rfc4514_string(),
                "expiry": _rfc7231(cert.not_valid_after_utc), "thumbprint": thumbprints(cert)["sha1"],
                "isVerified": record.verified, "certificate": base64.b64encode(record.raw).decode(),
                "created": _rfc7231(record.created), "updated": _rfc7231(record.updated)}

    def _new_etag(self) -> str:
        return base64.b64encode(next(self._etags).to_bytes(8, "big")).decode()

    @staticmethod
    def _find(instance: DpsInstance, name: str) -> CaCertificate:
        record = instance.ca_certificates.get(name.lower())
        if record is None:
            raise _rp_error(404, 404001, f"Certificate {name!r} not found on {instance.name}.")
        return record

    @staticmethod
    def _if_match(request: Request, record: CaCertificate, required: bool) -> None:
        if_match = request.header("if-match")
        if if_match is None and required:
            raise _rp_error(412, 412001, "The If-Match header with the certificate's etag is required.")
        if if_match is not None and not etag_matches(if_match, record.etag):
            raise _rp_error(412, 412001, f"Precondition failed: the certificate's etag is {record.etag}.")

    def _list(self, request: Request, instance: DpsInstance) -> Response:
        with instance.lock:
            records = list(instance.ca_certificates.values())
        return Response(200, {"value": [self._resource(instance, r) for r in records]})

    def _get(self, request: Request, instance: DpsInstance, name: str) -> Response:
        with instance.lock:
            record = self._find(instance, name)
            return Response(200, self._resource(instance, record), {"ETag": record.etag})

    def _put(self, request: Request, instance: DpsInstance, name: str) -> Response:
        if not _CERT_NAME.fullmatch(name):
            raise _rp_error(400, 400004, f"certificate name {name!r}: 1-64 of A-Z a-z 0-9 _ . -")
        body = request.json()
        properties = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(properties, dict):
            raise _rp_error(400, 400004, "properties is required")
        raw, certificate = _certificate_bytes(properties.get("certificate"), "properties.certificate")
        verified = properties.get("isVerified", False)
        if not isinstance(verified, bool):
            raise _rp_error(400, 400004, "properties.isVerified must be true or false")
        now = utc_now()
        with instance.lock:
            existing = instance.ca_certificates.get(name.lower())
            if existing is not None:
                self._if_match(request, existing, required=True)
            elif len(instance.ca_certificates) >= MAX_CA_CERTIFICATES:
                raise _rp_error(400, 400014, f"{instance.name} holds {MAX_CA_CERTIFICATES} CA certificates already, "
                                             "the most a DPS instance may")
            same = existing is not None and existing.raw == raw
            record = CaCertificate(name, certificate, raw, verified or (same and existing.verified), self._new_etag(),
                                   existing.created if existing else now, now)
            instance.ca_certificates[name.lower()] = record
            return Response(200, self._resource(instance, record),  # the spec declares 200 for both
                            {"ETag": record.etag})

    def _delete(self, request: Request, instance: DpsInstance, name: str) -> Response:
        with instance.lock:
            self._if_match(request, self._find(instance, name), required=True)
            del instance.ca_certificates[name.lower()]
        return Response(200)

    def _code(self, request: Request, instance: DpsInstance, name: str) -> Response:
        with instance.lock:
            record = self._find(instance, name)
            self._if_match(request, record, required=True)
            record.verification_code = secrets.token_hex(24).upper()
            record.etag, record.updated = self._new_etag(), utc_now()
            return Response(200, {"name": record.name, "etag": record.etag,
                                  "type": self._resource(instance, record)["type"],
                                  "id": self._resource(instance, record)["id"],
                                  "properties": {**self._properties(record),
                                                 "verificationCode": record.verification_code}})

    def _verify(self, request: Request, instance: DpsInstance, name: str) -> Response:
        body = request.json()
        _, proof = _certificate_bytes(body.get("certificate") if isinstance(body, dict) else None, "certificate")
        with instance.lock:
            record = self._find(instance, name)
            self._if_match(request, record, required=True)
            names = proof.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if record.verification_code is None:
                raise _rp_error(400, 400004, "No verification code was generated for this certificate.")
            if not names or str(names[0].value) != record.verification_code:
                raise _rp_error(400, 400027, "The verification certificate's subject CN is not the verification code.")
            try:
                proof.verify_directly_issued_by(record.certificate)
            except (ValueError, TypeError, InvalidSignature):
                raise _rp_error(400, 400027, "The verification certificate is not signed by the certificate's private "
                                             "key.") from None
            now = utc_now()
            if not proof.not_valid_before_utc <= now <= proof.not_valid_after_utc:
                raise _rp_error(400, 400027, "The verification certificate is not valid now.")
            record.verified, record.verification_code = True, None
            record.etag, record.updated = self._new_etag(), now
            return Response(200, self._resource(instance, record), {"ETag": record.etag})
