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

from .dps_pool import OnboardingSettings
from .enrollments import issue_intermediate
from .errors import Conflict, Rejected, TransientError
from .leases import held_by_other, lease_for, release, stamp
from .ports import AuditLog, DocumentStore, KeyStore
from .records import ONBOARDED, customer_document, customer_tags, key_name

LEASE = dt.timedelta(minutes=10)
HISTORY = 50  # renewal ids remembered per customer
_ATTEMPTS = 12
NAMED = 10  # devices a refusal names (it counts them all)


class RenewalRefused(Rejected):
    """A renewal that would strand devices or come too soon after the last one; ``"force": true`` overrides."""


def active_devices_of(store: DocumentStore, customer_id: str, serial: str, now: dt.datetime) -> list[str]:
    """Names of the customer's devices issued by intermediate ``serial`` that are still in use: status ``issued``
    (not disabled, expired or revoked) and not yet expired. One blob index tag query (device tags carry the issuer)."""
    return sorted(store.find(f"\"kind\" = 'device' AND \"customer\" = '{customer_id}' AND \"issuer\" = '{serial}' "
                             f"AND \"status\" = 'issued' AND \"notAfter\" > '{now:%Y%m%d}'"))


def _refusal(data: dict, *, force: bool, min_interval: dt.timedelta, store: DocumentStore,
             now: dt.datetime) -> tuple[str, dict] | None:
    """Why a new renewal must not start now, and what it would cut off; ``None`` when it may (or is forced)."""
    if force:
        return None
    last = (data.get("renewals") or [None])[0]
    if last and stamp(now - min_interval) < last["at"]:
        why = (f"the intermediate was renewed at {last['at']} by {last['id']}; renewals of one customer are limited "
               f"to one per {min_interval.total_seconds() / 3600:g} h (RENEWAL_MIN_INTERVAL_HOURS). Send "
               "\"force\": true to renew anyway")
        return why, {"lastRenewal": last}
    secondary = (data.get("previousIntermediates") or [None])[0]
    if secondary and secondary["notAfter"] > stamp(now):
        devices = active_devices_of(store, data["customerId"], secondary["serial"], now)
        if devices:
            named = [n.rsplit("/", 1)[-1].removesuffix(".json") for n in devices[:NAMED]]
            why = (f"renewing now would drop intermediate {secondary['serial']} (the enrollment group's secondary) "
                   f"from the group while {len(devices)} active, unexpired device(s) issued by it still provision "
                   f"with it ({', '.join(named)}{', ...' if len(devices) > NAMED else ''}); the group holds only the "
                   "current and the previous intermediate. Re-issue or disable those devices first, or send "
                   "\"force\": true to cut them off")
            return why, {"wouldCutOff": {"intermediate": secondary["serial"], "devices": len(devices), "named": named}}
    return None


def renew_intermediate(customer_id: str, *, renewal_id: str, reason: str, store: DocumentStore, keys: KeyStore,
                       audit: AuditLog, now: dt.datetime, sync: Callable[[dict], None], settings: OnboardingSettings,
                       request_id: str | None = None, message_id: str | None = None, wait_s: float = 20.0,
                       force: bool = False, sleep: Callable[[float], None] = time.sleep) -> str:
    """Renew once per ``renewal_id``; ``sync(record)`` makes the enrollment group match a customer record.

    A new renewal is refused (``RenewalRefused``) within ``settings.renewal_min_interval`` of the last one, or while
    the group's secondary intermediate still has active, unexpired devices, unless ``force``. Concurrent renewals
    therefore make one: the others find it done, too recent."""
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
        if renewal and held_by_other(lease, owner, now):
            if waited < wait_s:  # another run (a duplicate delivery, a second sweep) is renewing: let it finish
                sleep(0.5)
                waited += 0.5
                attempts -= 1
                continue
            raise TransientError(f"customer {customer_id}: renewal {renewal['id']} is in progress elsewhere "
                                 f"(lease until {lease['until']}); retry later")
        if not renewal:  # (a renewal left by a crashed run, any id, was checked when it started: finish it first)
            refused = _refusal(data, force=force, min_interval=settings.renewal_min_interval, store=store, now=now)
            if refused is not None:
                why, detail = refused
                log("rejected", data["intermediate"]["serial"], data["intermediate"]["serial"], why=why, **detail)
                raise RenewalRefused(why)
        renewal = renewal or {"id": renewal_id, "status": "pending", "reason": reason, "startedAt": stamp(now),
                              "forced": force}
        try:
            lease = lease_for(owner, now + LEASE)
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
               "previousIntermediates": previous, "renewal": None, "lease": None,  # all kept: issuers of devices
               "updatedAt": stamp(now),
               "renewals": [{"id": renewal["id"], "at": stamp(now), "serial": renewal["intermediate"]["serial"]},
                            *data.get("renewals", [])][:HISTORY]}
    sync(swapped)  # the group first: a crash here resumes at certificate_issued and syncs again
    return store.replace(doc, swapped, tags=customer_tags(swapped)).data

