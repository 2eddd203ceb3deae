"""Use case: the root CA uploaded to each DPS instance and verified there by proof of possession.

DPS accepts a device through an enrollment group only when the device's chain reaches a CA certificate verified
in that instance (learn.microsoft.com/azure/iot-dps/concepts-x509-attestation). Verification is DPS's
proof-of-possession flow (how-to-verify-certificates): upload the certificate, ask for a verification code, send
back a certificate with CN = the code signed by the CA's key. Here the root key signs in Key Vault, so the
whole flow is one command (`pkictl root register`), idempotent and resumable: a root already verified is left
alone, an upload whose verification was interrupted is verified on the next run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from pki import export, profiles
from pki.keys import KeyType, generate_key

from .dps_pool import DpsInstance
from .errors import InvalidMessage
from .ports import CaCertificate, KeyStore
from .root import RootCa, root_signer


class CaCertificates(Protocol):
    """The CA certificates of the DPS instances (their management API)."""

    def get(self, dps: DpsInstance, name: str) -> CaCertificate | None: ...

    def upload(self, dps: DpsInstance, name: str, pem: str, etag: str | None) -> CaCertificate: ...

    def verification_code(self, dps: DpsInstance, name: str, etag: str) -> tuple[str, str]:
        """(the code, the certificate's new etag)."""

    def verify(self, dps: DpsInstance, name: str, etag: str, proof_pem: str) -> CaCertificate: ...

    def list(self, dps: DpsInstance) -> list[CaCertificate]: ...


def certificate_name(root: RootCa) -> str:
    """The root's name in DPS: stable for one root, another for a replaced root (the old one stays verified)."""
    return f"pki-root-{export.thumbprints(root.certificate)['sha1'][:16].lower()}"


def _managed(pool: Sequence[DpsInstance], names: Sequence[str] | None) -> list[DpsInstance]:
    chosen = list(pool) if names is None else [i for i in pool if i.name in names]
    unknown = sorted(set(names or ()) - {i.name for i in pool})
    if unknown:
        raise InvalidMessage("--dps", f"no DPS instance {', '.join(unknown)} in DPS_INSTANCES "
                                      f"({', '.join(i.name for i in pool) or 'none configured'})")
    missing = [i.name for i in chosen if not i.resource_id]
    if missing:
        raise InvalidMessage("DPS_INSTANCES", f"{', '.join(missing)} has no resourceId: its CA certificates "
                                              "are managed through Azure Resource Manager, which needs it")
    return chosen


def register_root(root: RootCa, pool: Sequence[DpsInstance], *, names: Sequence[str] | None,
                  certificates: CaCertificates, keys: KeyStore, now: dt.datetime) -> dict[str, str]:
    """Upload and verify the root in each instance named (all with None); what happened, by instance."""
    name, thumbprint = certificate_name(root), export.thumbprints(root.certificate)["sha1"]
    outcomes = {}
    for dps in _managed(pool, names):
        held = certificates.get(dps, name)
        if held is not None and held.thumbprint.upper() == thumbprint and held.verified:
            outcomes[dps.name] = f"verified already ({name})"
            continue
        if held is None or held.thumbprint.upper() != thumbprint:
            held = certificates.upload(dps, name, export.cert_pem(root.certificate).decode(),
                                       held.etag if held else None)
        code, etag = certificates.verification_code(dps, name, held.etag)
        proof = profiles.issue_verification(ca=root.certificate, ca_key=root_signer(root, keys),
                                            public_key=generate_key(KeyType.EC_P256).public_key(), code=code, now=now)
        verified = certificates.verify(dps, name, etag, export.cert_pem(proof).decode())
        outcomes[dps.name] = f"verified ({name})" if verified.verified else f"uploaded, NOT verified ({name})"
    return outcomes


def root_status(root: RootCa, pool: Sequence[DpsInstance], *, certificates: CaCertificates) -> dict[str, str]:
    """Where the root stands in each instance: verified, uploaded but not verified, or absent."""
    thumbprint = export.thumbprints(root.certificate)["sha1"]
    status = {}
    for dps in pool:
        if not dps.resource_id:
            status[dps.name] = "unknown (no resourceId in DPS_INSTANCES)"
            continue
        held = [c for c in certificates.list(dps) if c.thumbprint.upper() == thumbprint]
        if any(c.verified for c in held):
            status[dps.name] = f"verified ({', '.join(c.name for c in held if c.verified)})"
        elif held:
            status[dps.name] = f"uploaded, not verified ({held[0].name}): run `pkictl root register --dps {dps.name}`"
        else:
            status[dps.name] = f"absent: run `pkictl root register --dps {dps.name}`"
    return status
