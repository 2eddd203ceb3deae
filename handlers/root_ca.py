"""Use case: create the company root CA once (key in the key store, self-signed certificate in state).

The root record is a small state machine (``pending -> key_created -> active``) written with
conditional writes, so an interrupted run resumes where it stopped and two concurrent runs
converge on one root instead of two.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import asdict, dataclass

from pki import export, profiles
from pki.keys import KeyType
from pki.signing import remote_key

from .errors import AlreadyExists, Conflict, NotFound, TransientError
from .leases import held_by_other, lease_for, release, stamp
from .ports import Document, DocumentStore, KeyRef, KeyStore
from .root import ROOT_DOCUMENT, RootCa, load_root

_ATTEMPTS = 5
# Whoever writes the pending record holds a lease on the slow steps (key creation, signing), so a
# concurrent run waits instead of making a second key version; a crashed run's lease runs out.
LEASE = dt.timedelta(minutes=2)


@dataclass(frozen=True)
class RootRequest:
    key_name: str
    key_type: KeyType
    validity_years: int
    common_name: str
    organization: str | None = None
    country: str | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "key_type": self.key_type.value}


def _lease(owner: str, now: dt.datetime) -> dict:
    return lease_for(owner, now + LEASE)


def _pending(request: RootRequest, now: dt.datetime, owner: str, previous: list | None = None) -> dict:
    return {"status": "pending", "request": request.as_dict(), "createdAt": stamp(now), "updatedAt": stamp(now),
            "previous": previous or [], "lease": _lease(owner, now)}


def _unused_latest_key(request: RootRequest, data: dict, keys: KeyStore) -> KeyRef | None:
    """A version a crashed run created but never recorded: reuse it rather than make a second one."""
    try:
        latest = keys.get_key(request.key_name)
    except NotFound:
        return None
    used = {(p["key"]["name"], p["key"]["version"]) for p in data.get("previous", [])}
    if (latest.name, latest.version) in used or latest.key_type is not request.key_type:
        return None
    return latest


def _finish(doc: Document, request: RootRequest, store: DocumentStore, keys: KeyStore, now: dt.datetime) -> RootCa:
    data = dict(doc.data)
    if data["status"] == "pending":
        key = _unused_latest_key(request, data, keys) or keys.create_key(request.key_name, request.key_type)
        data.update(status="key_created", key={"name": key.name, "version": key.version}, updatedAt=stamp(now))
        doc = store.replace(doc, data)
    key = keys.get_key(data["key"]["name"], data["key"]["version"])
    certificate = profiles.issue_root(
        key=remote_key(key.public_key, keys.signer(key)), common_name=request.common_name,
        organization=request.organization, country=request.country, now=now,
        validity_days=request.validity_years * 365 + request.validity_years // 4)
    data.update(status="active", certificatePem=export.cert_pem(certificate).decode(),
                summary=export.summary(certificate), updatedAt=stamp(now), lease=None)
    doc = store.replace(doc, data)
    return RootCa(certificate, key, doc.data)


def create_root(request: RootRequest, *, store: DocumentStore, keys: KeyStore, now: dt.datetime,
                force: bool = False) -> RootCa:
    """Create (or resume creating) the root CA; with ``force``, replace an active one (kept in ``previous``)."""
    replaced = False
    owner = secrets.token_hex(8)
    for _ in range(_ATTEMPTS):
        doc = store.get(ROOT_DOCUMENT)
        active = doc is not None and doc.data.get("status") == "active"
        other = doc is not None and not active and doc.data.get("request") != request.as_dict()
        if active and replaced:
            return load_root(store, keys)  # a concurrent forced run finished the replacement
        if active and not force:
            summary = doc.data["summary"]
            raise AlreadyExists(f"a root CA exists already ({summary['subject']}, serial {summary['serial']}, "
                                f"notAfter {summary['notAfter']}); pass --force to replace it")
        if other and not force:
            raise Conflict("an interrupted root CA creation with other parameters is on record "
                           f"({doc.data.get('request')}); re-run it with those, or pass --force")
        lease = (doc.data.get("lease") or {}) if doc is not None and not active else {}
        if held_by_other(lease, owner, now):
            raise TransientError(f"another root CA creation is in progress (lease until {lease['until']}); "
                                 "try again after it")
        try:
            if doc is None:
                doc = store.create(ROOT_DOCUMENT, _pending(request, now, owner))
            elif active or other:
                previous = list(doc.data.get("previous", []))
                if active:
                    previous.append({"key": doc.data["key"], "summary": doc.data["summary"]})
                doc = store.replace(doc, _pending(request, now, owner, previous))
                replaced = True
            elif lease.get("owner") != owner:  # take over a crashed run's work
                doc = store.replace(doc, {**doc.data, "lease": _lease(owner, now)})
        except (AlreadyExists, Conflict):
            continue  # lost a race with a concurrent run: read again and resume from its state
        try:
            return _finish(doc, request, store, keys, now)
        except Conflict:
            continue
        except Exception:
            release(store, ROOT_DOCUMENT, owner)  # the user's retry should not wait out their own run's lease
            raise
    raise Conflict("the root CA record kept changing under this run; another `root create` is running")
