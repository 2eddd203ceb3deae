"""Use case: renew a customer's intermediate CA. One code path for the ``renew-intermediate`` command and
the expiry sweep.

A renewal is a resumable state machine kept in the customer record under ``renewal``
(``pending -> key_created -> certificate_issued``, then swapped in), advanced by the holder of the record's
``lease``:
a new Key Vault key version, a new intermediate signed by the root, the enrollment group updated to hold
the new certificate as primary and the previous one as secondary (DPS rolling: devices of both keep
provisioning), then the record swapped so new device certificates come from the new intermediate. A
crash resumes at the last recorded step and reuses a key version it created but did not record. Every
renewal has an id (the command's requestId or message id, or ``sweep-DATE``); the ids of recent renewals
are kept, so a redelivered command or a second sweep of the same day renews nothing twice.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable

from .errors import Conflict, Rejected, TransientError
from .leases import release, stamp
from .onboarding import ONBOARDED, OnboardingSettings, customer_document, customer_tags, issue_intermediate, key_name
from .ports import AuditLog, DocumentStore, KeyStore

LEASE = dt.timedelta(minutes=10)
HISTORY = 50  # renewal ids remembered per customer
PREVIOUS_KEPT = 5  # earlier intermediates kept in the record (the newest is the group's secondary)
_ATTEMPTS = 12


def renew_intermediate(customer_id: str, *, renewal_id: str, reason: str, store: DocumentStore, keys: KeyStore,
                       audit: AuditLog, now: dt.datetime, sync: Callable[[dict], None], settings: OnboardingSettings,
                       request_id: str | None = None, message_id: str | None = None, wait_s: float = 20.0,
                       sleep: Callable[[float], None] = time.sleep) -> str:
    """Renew once per ``renewal_id``; ``sync(record)`` makes the enrollment group match a customer record."""
    name = customer_document(customer_id)
    owner = secrets.token_hex(8)

    def log(effect: str, before, after, **extra) -> None:
        audit.append({"at": stamp(now), "action": "renew-intermediate", "effect": effect, "customer": customer_id,
                      "before": before, "after": after, "reason": reason, "renewalId": renewal_id,
                      "requestId": request_id, "messageId": message_id, **extra})

    waited = 0.0
    attempts = 0
    while attempts < _ATTEMPTS:
        attempts += 1
        doc = store.get(name)
        if doc is None or doc.data.get("status") not in ONBOARDED:
            raise Rejected(f"customer {customer_id!r} is {'unknown' if doc is None else doc.data['status']}: "
                           "only an onboarded customer's intermediate can be renewed", field="customerId")
        data = doc.data
        done = next((r for r in data.get("renewals", []) if r["id"] == renewal_id), None)
        if done is not None:
            log("no-op", data["intermediate"]["serial"], data["intermediate"]["serial"],
                why=f"renewal {renewal_id} already done at {done['at']} (serial {done['serial']})")
            return f"intermediate already renewed by {renewal_id} (no-op)"
        renewal = data.get("renewal")
        lease = data.get("lease") or {}
        if renewal and lease and lease.get("owner") != owner and lease.get("until", "") > stamp(now):
            if waited < wait_s:  # another run (a duplicate delivery, a second sweep) is renewing: let it finish
                sleep(0.5)
                waited += 0.5
                attempts -= 1
                continue
            raise TransientError(f"customer {customer_id}: renewal {renewal['id']} is in progress elsewhere "
                                 f"(lease until {lease['until']}); retry later")
        # A renewal left by a crashed run (any id) is finished first, under its own id; then this one runs.
        renewal = renewal or {"id": renewal_id, "status": "pending", "reason": reason, "startedAt": stamp(now)}
        try:
            lease = {"owner": owner, "until": stamp(now + LEASE)}
            doc = store.replace(doc, {**data, "renewal": renewal, "lease": lease}, tags=customer_tags(data))
            finished = _advance(doc, keys=keys, store=store, sync=sync, settings=settings, now=now)
        except Conflict:
            sleep(0.2)
            continue  # the record changed (a command, a concurrent run): read it again
        except BaseException:
            release(store, name, owner, customer_tags)
            raise
        log("changed", data["intermediate"]["serial"], finished["intermediate"]["serial"],
            renewalId=renewal["id"], notAfter=finished["intermediate"]["notAfter"])
        if renewal["id"] == renewal_id:
            return (f"intermediate renewed: serial {finished['intermediate']['serial']} (primary), "
                    f"{data['intermediate']['serial']} kept as secondary")
    raise TransientError(f"customer {customer_id}: the record kept changing during renewal; retry")


def _advance(doc, *, keys: KeyStore, store: DocumentStore, sync: Callable[[dict], None],
             settings: OnboardingSettings, now: dt.datetime) -> dict:
    data = doc.data
    renewal = data["renewal"]
    customer_id = data["customerId"]

    def save(**changes) -> None:
        nonlocal doc, data, renewal
        renewal = {**renewal, **changes}
        doc = store.replace(doc, {**data, "renewal": renewal}, tags=customer_tags(data))
        data = doc.data

    if renewal["status"] == "pending":
        latest = keys.get_key(key_name(customer_id))
        earlier = {p.get("key", {}).get("version") for p in data.get("previousIntermediates", [])}
        if latest.version == data["key"]["version"] or latest.version in earlier:
            latest = keys.create_key(key_name(customer_id), settings.intermediate_key_type)
        # else: a version a crashed run created and never recorded; reuse it rather than make another
        save(status="key_created", key={"name": latest.name, "version": latest.version,
                                        "keyType": latest.key_type.value})
    if renewal["status"] == "key_created":
        key = keys.get_key(renewal["key"]["name"], renewal["key"]["version"])
        save(status="certificate_issued", intermediate=issue_intermediate(
            data, key.public_key, store=store, keys=keys, settings=settings, now=now))
    previous = [{**data["intermediate"], "key": data["key"]}, *data.get("previousIntermediates", [])]
    swapped = {**data, "intermediate": renewal["intermediate"], "key": renewal["key"],
               "previousIntermediates": previous[:PREVIOUS_KEPT], "renewal": None, "lease": None,
               "updatedAt": stamp(now),
               "renewals": [{"id": renewal["id"], "at": stamp(now), "serial": renewal["intermediate"]["serial"]},
                            *data.get("renewals", [])][:HISTORY]}
    sync(swapped)  # the group first: a crash here resumes at certificate_issued and syncs again
    return store.replace(doc, swapped, tags=customer_tags(swapped)).data

