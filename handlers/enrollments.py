"""The customer's intermediate and its DPS enrollment group, as onboarding, commands, renewals and the sweep make
them: which instance holds the group, the intermediate the root signs, the group's body, and bringing the group
in line with the customer record."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pki import export, profiles
from pki.keys import PrivateKey
from pki.signing import remote_key

from .dps_pool import DpsInstance, OnboardingSettings
from .errors import Conflict, Rejected, TransientError
from .leases import stamp
from .ports import DocumentStore, KeyStore, Ports
from .records import CustomerRecord
from .root import load_root, root_signer

_ATTEMPTS = 8

def placed_instance(pool: Sequence[DpsInstance], record: dict) -> DpsInstance:
    """The DPS instance a customer record is placed on; ``Rejected`` if it left the pool."""
    for instance in pool:
        if instance.name == record["dps"]["name"]:
            return instance
    raise Rejected(f"customer {record['customerId']} is placed on DPS instance {record['dps']['name']!r}, which is "
                   "no longer in DPS_INSTANCES; restore it there")


def intermediate_signer(customer: CustomerRecord, keys: KeyStore) -> PrivateKey:
    """The customer's current intermediate key as a signer: each signature is made in the key store."""
    key = keys.get_key(customer.key["name"], customer.key["version"])
    return remote_key(key.public_key, keys.signer(key))


def issue_intermediate(record: dict, public_key, *, store: DocumentStore, keys: KeyStore,
                       settings: OnboardingSettings, now: dt.datetime) -> dict:
    """A new intermediate for the customer ``record`` (signed by the root), as the record keeps it."""
    root = load_root(store, keys)
    parameters = record["parameters"]
    issued = profiles.issue_intermediate(
        issuer=root.certificate, issuer_key=root_signer(root, keys), public_key=public_key,
        customer_id=record["customerId"], organization=parameters.get("displayName"),
        country=parameters.get("country"), now=now, validity_days=settings.intermediate_validity_days)
    # The issuer travels with the intermediate: devices get their chain up to and including the root that signed
    # it, which stays right after a root is replaced (`root create --force`).
    return {"certificatePem": export.cert_pem(issued.certificate).decode(), **export.summary(issued.certificate),
            "notice": issued.notice, "issuerCertificatePem": export.cert_pem(root.certificate).decode()}


# The AllocationRequest's shape the webhook reads (service API version of the enrollment sent to it).
WEBHOOK_API_VERSION = "2021-10-01"


def wants_webhook(record: dict) -> bool:
    """Whether the customer's group should allocate through the app's webhook when the app has one: unless the
    record says ``direct`` (``disable-custom-allocation``); a record without a choice follows the app."""
    return record.get("allocation") != "direct"


def group_body(record: dict, instance: DpsInstance, now: dt.datetime | None = None,
               webhook_url: str | None = None) -> dict:
    """The DPS enrollment group for a customer (camelCase, as the DPS REST API takes it): its intermediate as
    primary, the one it replaced as secondary until that expires (DPS rolling), disabled with the customer. With
    ``webhook_url`` (``DPS_ALLOCATION_WEBHOOK_URL``) DPS allocates through the app's webhook (``allocationPolicy``
    custom), which applies the customer's recorded policy itself and renews certificates devices ask for."""
    parameters = record["parameters"]
    slots = {"primary": {"certificate": record["intermediate"]["certificatePem"]}}
    previous = (record.get("previousIntermediates") or [None])[0]
    if previous and (now is None or previous["notAfter"] > stamp(now)):
        slots["secondary"] = {"certificate": previous["certificatePem"]}
    body: dict[str, Any] = {
        "enrollmentGroupId": record["customerId"],
        "attestation": {"type": "x509", "x509": {"signingCertificates": slots}},
        "provisioningStatus": "disabled" if record.get("status") == "disabled" else "enabled",
        "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
        "capabilities": {"iotEdge": bool(parameters.get("iotEdge"))},
        "allocationPolicy": parameters.get("allocationPolicy") or "hashed",
        "iotHubs": parameters.get("iotHubs") or list(instance.iot_hubs),
    }
    if parameters.get("initialTwin"):
        body["initialTwin"] = parameters["initialTwin"]
    if webhook_url and wants_webhook(record):
        body["allocationPolicy"] = "custom"
        body["customAllocationDefinition"] = {"webhookUrl": webhook_url, "apiVersion": WEBHOOK_API_VERSION}
    return body


# --- customers -----------------------------------------------------------------------------------------------
def sync_group(ports: Ports, customer: dict, now: dt.datetime) -> None:
    """Make the customer's enrollment group match its record: status, primary and (unexpired) secondary."""
    dps = customer["dps"]["name"]
    wanted = group_body(customer, placed_instance(ports.settings.pool, customer), now=now,
                        webhook_url=ports.settings.allocation_webhook_url)
    for _ in range(_ATTEMPTS):
        group = ports.dps.get_group(dps, customer["customerId"])
        if group is None:
            raise Rejected(f"enrollment group {customer['customerId']} is missing on {dps}: it was deleted by hand")
        if (group.data.get("allocationPolicy") == "custom" and wanted["allocationPolicy"] != "custom"
                and wants_webhook(customer)):
            # DPS shows the webhook's key masked, so a group switched away from it cannot be switched back without
            # the setting: refuse rather than let a run without it (a person's sweep, say) drop the webhook (unless
            # the record asks for direct allocation: disable-custom-allocation)
            raise Rejected(f"enrollment group {customer['customerId']} allocates through the custom allocation "
                           "webhook: run with DPS_ALLOCATION_WEBHOOK_URL set as the app has it")
        if _same_group(group.data, wanted):
            return
        try:
            ports.dps.replace_group(dps, wanted, group.etag)
            return
        except Conflict:
            continue
    raise TransientError(f"enrollment group {customer['customerId']} on {dps} kept changing; retry")


def _same_group(found: dict, wanted: dict) -> bool:
    """Status and certificates (DPS returns thumbprints, not PEM) already as wanted."""
    from cryptography import x509

    from pki.export import thumbprints

    if found.get("provisioningStatus", "enabled") != wanted["provisioningStatus"]:
        return False
    if found.get("allocationPolicy") != wanted["allocationPolicy"]:  # custom allocation switched on or off
        return False
    found_slots = ((found.get("attestation") or {}).get("x509") or {}).get("signingCertificates") or {}
    wanted_slots = wanted["attestation"]["x509"]["signingCertificates"]
    for slot in ("primary", "secondary"):
        have = ((found_slots.get(slot) or {}).get("info") or {}).get("sha1Thumbprint", "").upper()
        pem = (wanted_slots.get(slot) or {}).get("certificate")
        want = thumbprints(x509.load_pem_x509_certificate(pem.encode()))["sha1"].upper() if pem else ""
        if have != want:
            return False
    return True
