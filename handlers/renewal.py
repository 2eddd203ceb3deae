"""Use case: DPS's custom allocation webhook -> the hub a device goes to, and, when the device asks in its
registration payload, a renewed certificate from its customer's intermediate.

DPS calls the webhook for every registration through an enrollment group with custom allocation, after it has
authenticated the device over mutual TLS with its current certificate (learn.microsoft.com/azure/iot-dps/
concepts-custom-allocation: the AllocationRequest carries ``enrollmentGroup``, ``deviceRuntimeContext`` with the
registration id, the X.509 attestation and the device's ``payload``, and ``linkedHubs``; the AllocationResponse
carries ``iotHubHostName``, ``initialTwin`` and a ``payload`` DPS hands to the device).

A device asks with ``{"pkiRenewal": {"csr": "<base64 DER PKCS#10>"}}``. The answer is ``{"pkiRenewal": {"status":
"issued", "certificate", "chain", "serial", "notAfter"}}`` or ``{"pkiRenewal": {"status": "refused", "reason"}}``;
either way the registration itself goes ahead, so a refused renewal never strands a device whose certificate is
still valid. Every answer is audited (``renew-device``). The same CSR again (a lost response) gets the same
certificate.

The enrollment group id is the customer id (``enrollments.group_body``), and DPS, not the device, says which group
it is: a device can only renew as a device its own customer holds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki import export, profiles
from pki.csr import accept_csr
from pki.errors import InvalidInput

from .enrollments import intermediate_signer
from .errors import Conflict, InvalidMessage
from .leases import stamp
from .ports import AuditLog, DocumentStore, KeyStore
from .records import (
    CustomerRecord,
    CustomerStatus,
    DeviceRecord,
    DeviceStatus,
    IssuedBy,
    KeySource,
    customer_document,
    read_device,
)
from .root import ROOT_DOCUMENT

ROUTE = "dps-allocation"  # https://{app host}/api/dps-allocation?code={function key}: the group's webhookUrl
MAX_REQUEST_BYTES = 64 * 1024  # a group, a device's certificate and a payload: a few KiB
# The renewal request's own limit. DPS documents none for the registration payload (how-to-send-additional-data,
# concepts-custom-allocation, about-iot-dps#quotas-and-limits, iot-mqtt-connect-to-iot-dps say nothing of a size), so
# the service sets its own: an RSA-8192 CSR, larger than any a device would make, is under 3 KiB in base64.
MAX_RENEWAL_BYTES = 8 * 1024


@dataclass(frozen=True)
class RenewalSettings:
    validity_days: int = 365
    per_day: int = 3  # renewals one device may get in any 24 hours


@dataclass(frozen=True)
class AllocationRequest:
    """The parts of DPS's AllocationRequest this service reads."""

    customer_id: str  # enrollmentGroup.enrollmentGroupId
    registration_id: str
    linked_hubs: tuple[str, ...]
    group_hubs: tuple[str, ...]  # enrollmentGroup.iotHubs: the hubs the group may allocate to
    initial_twin: Mapping[str, Any] | None
    presented: x509.Certificate | None  # deviceRuntimeContext.x509.clientCertificate
    payload: Mapping[str, Any]

    @classmethod
    def parse(cls, body: bytes) -> AllocationRequest:
        """The webhook's request body; ``InvalidMessage`` naming the field that is wrong."""
        if len(body) > MAX_REQUEST_BYTES:
            raise InvalidMessage("body", f"is {len(body)} bytes; an AllocationRequest is at most {MAX_REQUEST_BYTES}")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidMessage("body", "is not JSON (DPS's AllocationRequest)") from None
        return cls.from_json(data)

    @classmethod
    def from_json(cls, body: Any) -> AllocationRequest:
        if not isinstance(body, Mapping):
            raise InvalidMessage("body", "must be a JSON object (DPS's AllocationRequest)")
        group = body.get("enrollmentGroup")
        if not isinstance(group, Mapping) or not isinstance(group.get("enrollmentGroupId"), str):
            raise InvalidMessage("enrollmentGroup.enrollmentGroupId", "is required: this webhook serves enrollment "
                                 "groups, one per customer")
        context = body.get("deviceRuntimeContext")
        if not isinstance(context, Mapping) or not isinstance(context.get("registrationId"), str):
            raise InvalidMessage("deviceRuntimeContext.registrationId", "is required")
        linked = body.get("linkedHubs")
        if not isinstance(linked, list) or not linked or not all(isinstance(h, str) for h in linked):
            raise InvalidMessage("linkedHubs", "must list the host names of the hubs linked to the DPS instance")
        payload = context.get("payload") or {}
        if not isinstance(payload, Mapping):
            raise InvalidMessage("deviceRuntimeContext.payload", "must be a JSON object")
        twin = group.get("initialTwin")
        return cls(customer_id=group["enrollmentGroupId"], registration_id=context["registrationId"],
                   linked_hubs=tuple(linked), group_hubs=tuple(h for h in group.get("iotHubs") or () if h in linked),
                   initial_twin=twin if isinstance(twin, Mapping) else None,
                   presented=_presented(context.get("x509")), payload=payload)


def _presented(attestation: Any) -> x509.Certificate | None:
    """The certificate the device authenticated with: ``clientCertificate``, base64 DER (what DPS sends, as read by
    webhooks in the field) or PEM. ``None`` when absent or unreadable: a renewal then refuses."""
    value = attestation.get("clientCertificate") if isinstance(attestation, Mapping) else None
    if not isinstance(value, str):
        return None
    try:
        if value.lstrip().startswith("-----BEGIN"):
            return x509.load_pem_x509_certificate(value.encode())
        return x509.load_der_x509_certificate(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error):
        return None


def allocated_hub(request: AllocationRequest, policy: str | None) -> str:
    """The hub for the device: ``static`` the group's one hub; ``hashed`` (and ``geoLatency``, which needs the
    device's network position this webhook does not get) a stable hash of the registration id over the group's
    hubs, so a device re-registering lands where it was."""
    hubs = sorted(request.group_hubs or request.linked_hubs)
    if policy == "static":
        return hubs[0]
    digest = hashlib.sha256(request.registration_id.encode()).digest()
    return hubs[int.from_bytes(digest[:8], "big") % len(hubs)]


def handle_allocation(request: AllocationRequest, *, store: DocumentStore, keys: KeyStore, audit: AuditLog,
                      settings: RenewalSettings, now: dt.datetime) -> dict[str, Any]:
    """DPS's AllocationResponse for ``request``: the hub, the group's initial twin, and the renewal's answer."""
    doc = store.get(customer_document(request.customer_id))
    customer = CustomerRecord.from_json(doc.data) if doc is not None else None
    policy = (customer.parameters.get("allocationPolicy") if customer else None) or "hashed"
    response: dict[str, Any] = {"iotHubHostName": allocated_hub(request, policy)}
    twin = request.initial_twin or (customer.parameters.get("initialTwin") if customer else None)
    if twin:
        response["initialTwin"] = dict(twin)
    asked = request.payload.get("pkiRenewal")
    if asked is not None:
        response["payload"] = {"pkiRenewal": _Renewal(request, customer, store=store, keys=keys, audit=audit,
                                                      settings=settings, now=now).answer(asked)}
    return response


class _Refused(Exception):
    """A renewal this service will not carry out; the reason goes back to the device and into the audit log."""


class _Renewal:
    def __init__(self, request: AllocationRequest, customer: CustomerRecord | None, *, store: DocumentStore,
                 keys: KeyStore, audit: AuditLog, settings: RenewalSettings, now: dt.datetime):
        self.request, self.customer, self.store, self.keys, self.audit = request, customer, store, keys, audit
        self.settings, self.now = settings, now

    def answer(self, asked: Any) -> dict[str, Any]:
        try:
            csr_der = self._csr(asked)
            for _ in range(2):  # a concurrent delivery of the same request may record first: then it is a repeat
                try:
                    return self._renew(csr_der)
                except Conflict:
                    continue
            raise _Refused("the device record kept changing; register again")
        except _Refused as refused:
            self._audit("rejected", reason=str(refused))
            return {"status": "refused", "reason": str(refused)}

    def _csr(self, asked: Any) -> bytes:
        size = len(json.dumps(asked).encode())
        if size > MAX_RENEWAL_BYTES:  # refused before anything is read from it, let alone issued
            raise _Refused(f"pkiRenewal: is {size} bytes; a renewal request is at most {MAX_RENEWAL_BYTES}")
        csr = asked.get("csr") if isinstance(asked, Mapping) else None
        if not isinstance(csr, str) or not csr:
            raise _Refused("pkiRenewal.csr: is required, a base64 DER PKCS#10 request")
        try:
            return base64.b64decode(csr, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused("pkiRenewal.csr: is not base64") from None

    def _renew(self, csr_der: bytes) -> dict[str, Any]:
        request, customer = self.request, self.customer
        doc = read_device(self.store, request.customer_id, request.registration_id)
        if doc is None or customer is None:  # another customer's device reads as no device at all
            raise _Refused(f"device {request.registration_id!r} was not issued by this service in this group")
        device = DeviceRecord.from_json(doc.data)
        fingerprint = hashlib.sha256(csr_der).hexdigest()
        last = device.events.get("lastRenewal") or {}
        if last.get("csrSha256") == fingerprint:
            if last.get("serial") != device.serial:
                raise _Refused(f"this request was answered with serial {last.get('serial')}, since replaced by "
                               f"{device.serial}; send a new request")
            self._audit("no-op", serial=device.serial, reason="the same request again: the same certificate")
            return self._issued(device, customer)
        self._check(device, customer)
        try:
            public_key = accept_csr(x509.load_der_x509_csr(csr_der), request.registration_id,
                                    field="pkiRenewal.csr")
        except ValueError as exc:  # InvalidInput included: unreadable, weak, unsigned, another CN
            raise _Refused(str(exc) if isinstance(exc, InvalidInput) else f"pkiRenewal.csr: unreadable ({exc})") \
                from None
        if device.certificate_pem and _spki(public_key) == _spki(
                x509.load_pem_x509_certificate(device.certificate_pem.encode()).public_key()):
            raise _Refused("pkiRenewal.csr: its key is the current certificate's; a renewal needs a new key")
        intermediate = x509.load_pem_x509_certificate(customer.intermediate["certificatePem"].encode())
        issued = profiles.issue_device(issuer=intermediate, issuer_key=intermediate_signer(customer, self.keys),
                                       public_key=public_key, device_id=request.registration_id, now=self.now,
                                       validity_days=self.settings.validity_days)
        summary = export.summary(issued.certificate)
        pem = export.cert_pem(issued.certificate).decode()
        renewed = dataclasses.replace(
            device, status=DeviceStatus.ISSUED, serial=summary.pop("serial"), not_after=summary.pop("notAfter"),
            issued_at=stamp(self.now), issued_by=IssuedBy.RENEWAL, key_source=KeySource.CSR, outputs={},
            certificate_pem=pem, intermediate_serial=customer.intermediate["serial"], batch=None, row=None,
            pfx_secret=None, certificate=summary,
            events={**device.events, "lastRenewal": {"csrSha256": fingerprint, "serial": format(
                issued.certificate.serial_number, "X"), "at": stamp(self.now)}}).replacing(doc.data)
        self.store.replace(doc, renewed.to_json(), tags=renewed.tags)  # Conflict: answer() reads again
        self._audit("changed", before=device.serial, after=renewed.serial, serial=renewed.serial)
        return self._issued(renewed, customer)

    def _check(self, device: DeviceRecord, customer: CustomerRecord) -> None:
        if customer.status is not CustomerStatus.ACTIVE:
            raise _Refused(f"customer {customer.customer_id!r} is {customer.status.value}")
        if device.status is not DeviceStatus.ISSUED:
            raise _Refused(f"device {device.device_id!r} is {device.status.value}")
        presented = self.request.presented
        if presented is None:
            raise _Refused("DPS reported no client certificate for this registration")
        thumbprint = export.thumbprints(presented)["sha256"]
        if thumbprint not in {entry.get("thumbprintSha256") for entry in device.certificates}:
            raise _Refused("the certificate the device presented is not one this service issued to it")
        since = stamp(self.now - dt.timedelta(days=1))
        recent = [c for c in device.certificates if c.get("issuedBy") == IssuedBy.RENEWAL and
                  (c.get("issuedAt") or "") > since]
        if len(recent) >= self.settings.per_day:
            raise _Refused(f"over the rate limit: {self.settings.per_day} renewals per device in 24 hours "
                           "(DEVICE_RENEWALS_PER_DAY)")

    def _issued(self, device: DeviceRecord, customer: CustomerRecord) -> dict[str, Any]:
        """The answer for the device's current certificate, with the chain above it up to the root."""
        root = self.store.get(ROOT_DOCUMENT)
        chain = customer.chain_above(device.intermediate_serial, root.data.get("certificatePem") if root else None)
        return {"status": "issued", "certificate": device.certificate_pem, "chain": chain or [],
                "serial": device.serial, "notAfter": device.not_after}

    def _audit(self, effect: str, **extra: Any) -> None:
        self.audit.append({"at": stamp(self.now), "action": "renew-device", "effect": effect,
                           "customer": self.request.customer_id, "device": self.request.registration_id, **extra})


def _spki(public_key) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

