"""Use case: a "new customer" message -> the customer's intermediate CA (key in Key Vault) + DPS enrollment group.

The customer record ``customers/{id}.json`` is a resumable state machine,
``pending -> key_created -> certificate_issued -> group_created -> active``, advanced with
conditional writes by whoever holds its lease. Redelivery and concurrent runs therefore converge
on one key (one version), one intermediate and one group; a crash resumes at the last recorded
step; every transition and every duplicate is audit-logged.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pki.countries import ISO_3166_ALPHA2

from .dps_pool import OnboardingSettings, choose_instance
from .enrollments import group_body, issue_intermediate, placed_instance
from .errors import AlreadyExists, CapacityExhausted, Conflict, InvalidMessage, NotFound, Rejected, TransientError
from .leases import held_by_other, lease_for, release, stamp
from .messages import REQUEST_ID, REQUEST_ID_RULE, Fields, decode_json_message
from .ports import AuditLog, Document, DocumentStore, Enrollment, EnrollmentGroups, KeyStore
from .records import ONBOARDED, ONBOARDING_STEPS, check_customer_id, customer_document, customer_tags, key_name

QUEUE = "customer-onboarding"
ALLOCATION_POLICIES = ("hashed", "geoLatency", "static")  # "custom" needs an Azure Function webhook: not offered
# At least the function timeout (host.json: 10 min): a run throttled for minutes in Key Vault or DPS must not
# lose its lease to a duplicate message, which would repeat its step. A failed run releases it at once.
LEASE = dt.timedelta(minutes=10)
LEASE_WAIT_S = 20.0  # wait this long for a concurrent run to finish before asking the host to retry
_ATTEMPTS = 8


@dataclass(frozen=True)
class OnboardingRequest:
    customer_id: str
    display_name: str | None = None
    country: str | None = None
    iot_hubs: tuple[str, ...] | None = None
    allocation_policy: str | None = None
    initial_twin: dict | None = field(default=None, hash=False)
    iot_edge: bool = False
    request_id: str | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> OnboardingRequest:
        """Check a message against the contract; ``InvalidMessage`` names the first bad field."""
        fields = Fields(decode_json_message(raw))
        customer_id = check_customer_id(fields.text("customerId", required=True, max_length=63))
        display_name = fields.text("displayName", max_length=64)
        if display_name is not None and (not display_name.strip() or not display_name.isprintable()):
            raise InvalidMessage("displayName", "must be printable text, not empty")
        country = fields.text("country", max_length=64)  # a long value reaches the ISO check, which names it
        if country is not None and country not in ISO_3166_ALPHA2:
            raise InvalidMessage("country", f"{country!r} is not an ISO 3166 alpha-2 code such as 'DE'")
        policy = fields.text("allocationPolicy", max_length=32)
        if policy is not None and policy not in ALLOCATION_POLICIES:
            raise InvalidMessage("allocationPolicy", f"{policy!r} must be one of {', '.join(ALLOCATION_POLICIES)}")
        twin = fields.obj("initialTwin")
        if twin is not None:
            twin_fields = Fields(twin, prefix="initialTwin.")
            twin_fields.obj("tags")
            properties = twin_fields.obj("properties")
            twin_fields.reject_unknown()
            if properties is not None:
                desired = Fields(properties, prefix="initialTwin.properties.")
                desired.obj("desired")
                desired.reject_unknown()
        hubs = fields.text_list("iotHubs")
        if policy == "static" and len(hubs or ()) != 1:
            # DPS's static allocation assigns every device to exactly one linked hub, which the group must name
            raise InvalidMessage("iotHubs", "allocationPolicy static needs exactly one IoT hub host name in iotHubs")
        request = cls(customer_id=customer_id, display_name=display_name, country=country,
                      iot_hubs=hubs, allocation_policy=policy, initial_twin=twin,
                      iot_edge=fields.boolean("iotEdge"),
                      request_id=fields.text("requestId", max_length=128, pattern=REQUEST_ID, rule=REQUEST_ID_RULE))
        fields.reject_unknown()
        return request

    def parameters(self) -> dict[str, Any]:
        """What defines the customer; a redelivery must match it exactly (``requestId`` may differ)."""
        return {"displayName": self.display_name, "country": self.country,
                "iotHubs": list(self.iot_hubs) if self.iot_hubs else None,
                "allocationPolicy": self.allocation_policy, "initialTwin": self.initial_twin, "iotEdge": self.iot_edge}


@dataclass(frozen=True)
class Outcome:
    status: str  # "onboarded" | "already_active"
    record: dict


def _differences(recorded: dict, asked: dict) -> str:
    return "; ".join(f"{k}: recorded {recorded.get(k)!r}, message {asked.get(k)!r}"
                     for k in sorted(set(recorded) | set(asked)) if recorded.get(k) != asked.get(k))


class _Run:
    """One attempt to advance a customer's record, as the holder of its lease."""

    def __init__(self, request: OnboardingRequest, *, store: DocumentStore, keys: KeyStore, groups: EnrollmentGroups,
                 audit: AuditLog, settings: OnboardingSettings, now: dt.datetime, message_id: str | None):
        self.request, self.store, self.keys, self.groups = request, store, keys, groups
        self.audit_log, self.settings, self.now, self.message_id = audit, settings, now, message_id
        # One owner per run, never per message: the same message can be delivered twice at once (a visibility
        # lapse), and both deliveries must not count as the lease holder.
        self.owner = secrets.token_hex(8)
        self.name = customer_document(request.customer_id)

    def audit(self, effect: str, before: str | None, after: str | None, **extra: Any) -> None:
        self.audit_log.append({"at": stamp(self.now), "action": "customer.onboard", "effect": effect,
                               "customer": self.request.customer_id, "before": before, "after": after,
                               "requestId": self.request.request_id, "messageId": self.message_id, **extra})

    def lease(self) -> dict:
        return lease_for(self.owner, self.now + LEASE)

    def write(self, doc: Document, status: str, **changes: Any) -> Document:
        data = {**doc.data, **changes, "status": status, "updatedAt": stamp(self.now)}
        updated = self.store.replace(doc, data, tags=customer_tags(data))
        self.audit("changed", doc.data["status"], status, **{k: v for k, v in changes.items() if k in ("dps", "key")})
        return updated

    def pending(self, groups_per_dps: dict[str, int], exclude: frozenset[str] = frozenset()) -> dict:
        instance = choose_instance(self.settings.pool, groups_per_dps, hubs=self.request.iot_hubs, exclude=exclude,
                                   limit=self.settings.max_groups_per_dps)
        return {"customerId": self.request.customer_id, "status": "pending", "parameters": self.request.parameters(),
                "requestId": self.request.request_id, "createdAt": stamp(self.now), "updatedAt": stamp(self.now),
                "dps": {"name": instance.name, "idScope": instance.id_scope}, "lease": self.lease()}

    def advance(self, doc: Document, groups_per_dps: Callable[[], dict[str, int]]) -> Outcome:
        customer_id = self.request.customer_id
        if doc.data["status"] == "pending":
            try:  # a run that crashed after creating the key left it there: reuse it, never a second version
                key = self.keys.get_key(key_name(customer_id))
            except NotFound:
                key = self.keys.create_key(key_name(customer_id), self.settings.intermediate_key_type)
            doc = self.write(doc, "key_created", key={"name": key.name, "version": key.version,
                                                      "keyType": key.key_type.value})
        if doc.data["status"] == "key_created":
            key = self.keys.get_key(doc.data["key"]["name"], doc.data["key"]["version"])
            doc = self.write(doc, "certificate_issued", intermediate=issue_intermediate(
                doc.data, key.public_key, store=self.store, keys=self.keys, settings=self.settings, now=self.now))
        if doc.data["status"] == "certificate_issued":
            doc = self.create_group(doc, groups_per_dps)
        if doc.data["status"] == "group_created":
            doc = self.write(doc, "active", lease=None)
            return Outcome("onboarded", doc.data)
        raise Conflict(f"customer {customer_id}: unexpected status {doc.data['status']!r}")

    def create_group(self, doc: Document, groups_per_dps: Callable[[], dict[str, int]]) -> Document:
        tried: set[str] = set()
        while True:
            instance = placed_instance(self.settings.pool, doc.data)
            body = group_body(doc.data, instance, webhook_url=self.settings.allocation_webhook_url)
            try:
                group = self.groups.create_group(instance.name, body)
            except AlreadyExists:
                group = self.groups.get_group(instance.name, body["enrollmentGroupId"])
                if group is None:
                    raise TransientError(
                        f"enrollment group {body['enrollmentGroupId']} exists and vanished; retry") from None
                self.check_ours(group, doc.data["intermediate"]["thumbprintSha1"], instance.name)
            except CapacityExhausted:
                # Another customer took the last slot between our count and our create: move before the group
                # exists (the placement is only fixed once the group is there).
                tried.add(instance.name)
                moved = self.pending(groups_per_dps(), exclude=frozenset(tried))["dps"]
                doc = self.write(doc, "certificate_issued", dps=moved)
                continue
            return self.write(doc, "group_created", groupId=body["enrollmentGroupId"], groupEtag=group.etag)

    def check_ours(self, group: Enrollment, thumbprint: str, dps: str) -> None:
        primary = group.data.get("attestation", {}).get("x509", {}).get("signingCertificates", {}).get("primary", {})
        found = (primary.get("info") or {}).get("sha1Thumbprint", "")
        if found.upper() != thumbprint.upper():
            raise Rejected(f"enrollment group {group.data.get('enrollmentGroupId')} exists on {dps} with another "
                           f"signing certificate (thumbprint {found or 'unknown'}, ours {thumbprint}); it was not "
                           "made for this customer by this service: remove or rename it", field="customerId")


def onboard_customer(request: OnboardingRequest, *, store: DocumentStore, keys: KeyStore, groups: EnrollmentGroups,
                     audit: AuditLog, settings: OnboardingSettings, now: dt.datetime, message_id: str | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Carry a customer to ``active`` (or confirm it is); raises Rejected / TransientError for the edge."""
    run = _Run(request, store=store, keys=keys, groups=groups, audit=audit, settings=settings, now=now,
               message_id=message_id)

    def groups_per_dps() -> dict[str, int]:
        return {i.name: sum(1 for _ in store.find(f"\"kind\" = 'customer' AND \"dps\" = '{i.name}'"))
                for i in settings.pool}

    waited = 0.0
    for _ in range(_ATTEMPTS + int(LEASE_WAIT_S / 0.5)):
        doc = store.get(run.name)
        status = doc.data["status"] if doc else None
        if doc is not None and doc.data["parameters"] != request.parameters() and status != "rejected":
            raise Rejected(f"customer {request.customer_id} exists with other parameters "
                           f"({_differences(doc.data['parameters'], request.parameters())}); "
                           "a change needs an operator command, not a second onboarding message",
                           field="customerId")
        if status in ONBOARDED:
            run.audit("no-op", status, status, reason=f"already onboarded ({status}) with the same parameters")
            return Outcome("already_active", doc.data)
        lease = (doc.data.get("lease") or {}) if doc else {}
        if held_by_other(lease, run.owner, now) and status != "rejected":
            if waited >= LEASE_WAIT_S:
                run.audit("no-op", status, status, reason="another run holds the lease; the host will retry")
                raise TransientError(f"customer {request.customer_id}: onboarding in progress elsewhere "
                                     f"(lease until {lease['until']}); retry later")
            sleep(0.5)  # a concurrent run is working on it: give it a moment to finish
            waited += 0.5
            continue
        try:
            if doc is None:
                data = run.pending(groups_per_dps())
                doc = store.create(run.name, data, tags=customer_tags(data))
                run.audit("changed", None, "pending", dps=data["dps"])
            elif status == "rejected":
                # Resume where the rejected run stopped, with a fresh placement: its key and intermediate stand.
                resume = ("certificate_issued" if doc.data.get("intermediate") else
                          "key_created" if doc.data.get("key") else "pending")
                kept = {k: doc.data[k] for k in ("key", "intermediate") if doc.data.get(k)}
                data = {**run.pending(groups_per_dps()), **kept, "status": resume, "createdAt": doc.data["createdAt"]}
                doc = store.replace(doc, data, tags=customer_tags(data))
                run.audit("changed", "rejected", resume, dps=data["dps"])
            elif lease.get("owner") != run.owner:  # free or expired: take over where the last run stopped
                doc = store.replace(doc, {**doc.data, "lease": run.lease()}, tags=customer_tags(doc.data))
            try:
                return run.advance(doc, groups_per_dps)
            except (AlreadyExists, Conflict):
                raise  # a race on the record: the loop re-reads and follows the winner
            except CapacityExhausted:
                raise  # handled below: the record is marked rejected
            except Exception:
                # let the next delivery resume at once instead of waiting out the lease
                release(store, run.name, run.owner, customer_tags)
                raise
        except (AlreadyExists, Conflict):
            continue  # another run wrote first: read again and follow its state
        except CapacityExhausted as exc:
            current = store.get(run.name)
            holder = ((current.data.get("lease") or {}).get("owner") if current else None)
            # Only a record this run holds (or nobody does), and only before its group exists, is rejected; its
            # placement is dropped so it no longer counts against the instance.
            before_group = ONBOARDING_STEPS[:3]
            if current is not None and current.data.get("status") in before_group and holder in (None, run.owner):
                rejected = {**current.data, "status": "rejected", "reason": str(exc), "lease": None, "dps": {}}
                try:
                    store.replace(current, rejected, tags=customer_tags(rejected))
                except Conflict:
                    pass
            run.audit("rejected", status, "rejected", reason=str(exc))
            raise
    raise TransientError(f"customer {request.customer_id}: the record kept changing under this run; retry")


