"""Chain doctor: every reason DPS would refuse a device certificate, each with a one-line fix.

DPS error 401002 "Signing certificate info did not match chain elements" is the most reported
X.509 provisioning failure (DESIGN.md section 4). Its three causes - the device did not send the
intermediate, the root was not verified, the group holds another intermediate than the one that
signed the device - are told apart here, next to profile and validity problems.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .export import thumbprints
from .ids import registration_id_problem

MAX_CHAIN_DEPTH = 8


@dataclass(frozen=True)
class Finding:
    severity: str  # "error": DPS refuses; "warning": works, but fragile or needs a step outside the chain
    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.severity.upper()} [{self.code}] {self.message}\n  fix: {self.fix}"


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _thumb(cert: x509.Certificate) -> str:
    return thumbprints(cert)["sha1"]


def _ext(cert: x509.Certificate, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # noqa: BLE001 - any failure means "not self-signed"
        return False
    return True


def _validity(cert: x509.Certificate, role: str, now: dt.datetime) -> list[Finding]:
    if cert.not_valid_after_utc <= now:
        return [Finding("error", f"{role}-expired",
                        f"the {role} certificate {_name(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z",
                        f"issue a new {role} certificate"
                        + (" (renew-intermediate)" if role == "intermediate" else ""))]
    if cert.not_valid_before_utc > now:
        return [Finding("error", f"{role}-not-yet-valid",
                        f"the {role} certificate {_name(cert)} is not valid before "
                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z",
                        "check the clock of the issuing machine and of the device (NTP)")]
    return []


def _device_profile(device: x509.Certificate, registration_id: str | None) -> list[Finding]:
    found = []
    constraints = _ext(device, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        found.append(Finding("error", "device-is-ca", "the device certificate says CA:TRUE",
                             "issue device certificates with basicConstraints CA:FALSE"))
    usage = _ext(device, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        found.append(Finding("error", "device-key-usage", "the device certificate's keyUsage lacks digitalSignature, "
                             "so it cannot sign the TLS handshake", "issue it with keyUsage digitalSignature"))
    eku = _ext(device, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        found.append(Finding("error", "device-eku", "the device certificate's extendedKeyUsage lacks clientAuth",
                             "issue it with extendedKeyUsage clientAuth"))
    cns = device.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if len(cns) == 1 else None
    if cn is None:
        found.append(Finding("error", "cn-missing", f"the device certificate has {len(cns)} CNs; DPS needs exactly one",
                             "issue it with CN = the registration id"))
    elif registration_id is not None and cn != registration_id:
        found.append(Finding("error", "cn-mismatch",
                             f"the certificate CN {cn!r} is not the registration id {registration_id!r}",
                             f"register as {cn!r}, or issue a certificate with CN={registration_id}"))
    elif registration_id_problem(cn):
        found.append(Finding("error", "cn-invalid", f"CN {cn!r} is not a valid registration id: "
                             f"{registration_id_problem(cn)}", "issue it with a valid registration id as CN"))
    return found


def _issuer_checks(issuer: x509.Certificate, cas_below: int) -> list[Finding]:
    found = []
    constraints = _ext(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        found.append(Finding("error", "issuer-not-ca", f"{_name(issuer)} signs certificates but is not a CA "
                             "(basicConstraints CA:TRUE missing)", "re-issue it with the intermediate profile"))
    elif constraints.path_length is not None and cas_below > constraints.path_length:
        found.append(Finding("error", "path-length", f"{_name(issuer)} allows {constraints.path_length} CA(s) below "
                             f"it, the chain has {cas_below}", "sign devices directly with the customer intermediate"))
    usage = _ext(issuer, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        found.append(Finding("error", "issuer-key-usage", f"{_name(issuer)} lacks keyUsage keyCertSign",
                             "re-issue it with keyUsage keyCertSign, cRLSign"))
    return found


def _build_path(device: x509.Certificate, pool: list[x509.Certificate], now: dt.datetime,
                root: x509.Certificate | None) -> tuple[list[x509.Certificate], list[Finding]]:
    """Walk from the device up through ``pool`` (and the root) by name, checking each link."""
    path, found = [device], []
    candidates = pool + ([root] if root is not None else [])
    current = device
    while not _self_signed(current) and len(path) <= MAX_CHAIN_DEPTH:
        by_name = [c for c in candidates if c.subject == current.issuer and c is not current]
        if not by_name:
            if current is device:
                found.append(Finding(
                    "error", "missing-intermediate",
                    f"the device did not present the certificate of its issuer {current.issuer.rfc4514_string()} "
                    "(DPS 401002: signing certificate info did not match chain elements)",
                    "send the device certificate followed by the intermediate (chain.pem) in the TLS handshake"))
            elif root is not None:
                found.append(Finding(
                    "error", "root-mismatch",
                    f"{_name(current)} was issued by {current.issuer.rfc4514_string()}, not by the given root "
                    f"{_name(root)}", "check that the intermediate was signed by this root; re-issue it if not"))
            break
        aki = _ext(current, x509.AuthorityKeyIdentifier)
        issuer = None
        for candidate in by_name:
            ski = _ext(candidate, x509.SubjectKeyIdentifier)
            if aki is not None and aki.key_identifier and ski is not None and aki.key_identifier != ski.digest:
                continue
            try:
                current.verify_directly_issued_by(candidate)
            except Exception:  # noqa: BLE001, S112 - signature, algorithm or name failure: not this issuer
                continue
            issuer = candidate
            break
        if issuer is None and root is not None and root in by_name:
            found.append(Finding(
                "error", "root-mismatch",
                f"{_name(current)} was not signed by the given root {_name(root)} (thumbprint {_thumb(root)}): "
                "same name, different key", "issue the intermediate from this root, or pass the root that issued it"))
            break
        if issuer is None:
            found.append(Finding(
                "error", "aki-ski-mismatch",
                f"{_name(by_name[0])} has the right name but is not the key that signed {_name(current)} "
                "(authority/subject key id or signature differ): a CA with the same name was re-created",
                "present the intermediate that actually issued the device (compare thumbprints)"))
            break
        cas_below = len(path) - 1
        found.extend(_issuer_checks(issuer, cas_below))
        role = "root" if _self_signed(issuer) else "intermediate"
        found.extend(_validity(issuer, role, now))
        path.append(issuer)
        current = issuer
    return path, found


def _presentation(device: x509.Certificate, presented: list[x509.Certificate], path: list[x509.Certificate],
                  root: x509.Certificate | None) -> list[Finding]:
    found = []
    in_path = set(path)
    extra = [c for c in presented if c not in in_path]
    if extra:
        found.append(Finding("warning", "chain-extra", "the chain carries certificates that are not on the device's "
                             f"path: {', '.join(_name(c) for c in extra)}", "send only the device's own issuers"))
    sent = [c for c in presented if c in in_path]
    expected = [c for c in path[1:] if c in sent]
    if sent != expected:
        found.append(Finding("warning", "chain-order", "the chain is not in order (each certificate must be followed "
                             "by its issuer; RFC 8446 4.4.2)", "order it: device, intermediate(s), then root"))
    if root is not None and root in in_path and root not in presented:
        # DPS's docs have the device present its chain "up to and including" the verified certificate; a chain
        # that stops below the root passes only where DPS reads that leniently (the local emulator does not).
        found.append(Finding("warning", "root-not-sent", "the device does not send the root certificate",
                             "send the whole chain up to and including the root (the service's chain.pem does)"))
    return found


@dataclass(frozen=True)
class DpsView:
    """What one DPS instance holds, as its management and service APIs report it: the verified CA certificates,
    and each enrollment group's signing certificate thumbprints (SHA-1)."""

    name: str
    verified: tuple[x509.Certificate, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group id, (primary, secondary) thumbprints)


def _against_dps(path: list[x509.Certificate], presented: list[x509.Certificate], dps: DpsView) -> list[Finding]:
    """The missing link between the device's chain and what the instance holds, named."""
    found = []
    verified = {_thumb(c) for c in dps.verified}
    reached = [c for c in path[1:] if _thumb(c) in verified]
    if not reached:
        found.append(Finding("error", "root-not-verified", f"no certificate of the device's chain "
                             f"({', '.join(_name(c) for c in path[1:]) or 'none'}) is a verified CA certificate of "
                             f"{dps.name} (DPS 401002)",
                             f"`pkictl root register --dps {dps.name}` (upload and proof of "
                             "possession)"))
    elif not any(c in presented for c in reached):
        found.append(Finding("error", "verified-not-presented", f"the device does not present {_name(reached[0])}, "
                             f"the certificate verified in {dps.name} (DPS 401002)",
                             "send the whole chain up to and including the root (the service's chain.pem does)"))
    chain_prints = {_thumb(c): c for c in path[1:]}
    matching = [group for group, prints in dps.groups if set(prints) & set(chain_prints)]
    if not matching:
        held = "; ".join(f"{group}: {', '.join(prints)}" for group, prints in dps.groups) or "no groups"
        found.append(Finding("error", "group-mismatch", f"no enrollment group of {dps.name} holds a certificate of "
                             f"the device's chain (thumbprints {', '.join(chain_prints) or 'none'}; the groups hold "
                             f"{held}) (DPS 401002)", "put the intermediate that issued the device in its customer's "
                             "group (`pkictl send command renew-intermediate` rolls it), or register the device with "
                             "the DPS instance its customer is placed on"))
    return found


def _group(path: list[x509.Certificate], group: list[x509.Certificate]) -> list[Finding]:
    in_path = [c for c in group if c in path]
    if not in_path:
        same_name = [(g, c) for g in group for c in path[1:] if g.subject == c.subject]
        if same_name:
            g, c = same_name[0]
            message = (f"the enrollment group holds {_name(g)} with thumbprint {_thumb(g)}, but the device was "
                       f"issued by {_name(c)} with thumbprint {_thumb(c)} (DPS 401002)")
        else:
            message = ("none of the enrollment group's signing certificates "
                       f"({', '.join(_name(g) for g in group)}) is in the device's chain (DPS 401002)")
        return [Finding("error", "group-mismatch", message,
                        "put the intermediate that issued the device in the group (roll: new primary, old secondary)")]
    if all(_self_signed(c) for c in in_path):
        return [Finding("warning", "root-verification", "the enrollment group trusts the root certificate: DPS "
                        "accepts it only once the root is uploaded and verified (else 401002)",
                        "upload the root to DPS and verify it with `pkictl verification-cert --code CODE`")]
    return []


def diagnose(device: x509.Certificate, *, presented: list[x509.Certificate] | None = None,
             root: x509.Certificate | None = None, registration_id: str | None = None,
             group_certificates: list[x509.Certificate] | None = None, dps: DpsView | None = None,
             now: dt.datetime) -> list[Finding]:
    """Every problem DPS would refuse (errors) and fragile setups (warnings); empty means all is well.

    ``presented`` is the chain the device sends after its own certificate (a leading copy of the
    device certificate is ignored). ``group_certificates`` are the group's primary/secondary; ``dps`` is what one
    DPS instance holds (verified CA certificates, enrollment groups), checked against the device's chain.
    """
    presented = [c for c in (presented or []) if c != device]
    findings = _device_profile(device, registration_id) + _validity(device, "device", now)
    if _self_signed(device):
        findings.append(Finding("error", "device-self-signed", "the device certificate is self-signed; an enrollment "
                                "group only accepts certificates issued by its CA", "issue it from the customer's "
                                "intermediate (or use an individual enrollment with this certificate)"))
    path, path_findings = _build_path(device, presented, now, root)
    findings += path_findings
    top = path[-1]
    if root is not None and len(path) > 1 and _self_signed(top) and top != root:
        findings.append(Finding("error", "root-mismatch", f"the chain ends at {_name(top)} "
                                f"(thumbprint {_thumb(top)}), not at the given root {_name(root)} "
                                f"(thumbprint {_thumb(root)})", "issue the intermediate from this root"))
    findings += _presentation(device, presented, path, root)
    if root is not None and not _self_signed(root):
        findings.append(Finding("warning", "root-not-self-signed", f"the given root {_name(root)} is not self-signed",
                                "pass the top (self-signed) CA certificate as --root"))
    if group_certificates:
        findings += _group(path, group_certificates)
    if dps is not None:
        if root is None:  # the instance's verified certificates complete the path the device's chain started
            path, _ = _build_path(device, presented + list(dps.verified), now, None)
        findings += _against_dps(path, presented, dps)
    return findings
