"""``pkictl doctor``, ``pkictl csr check`` and ``pkictl id check``: checks of certificates, CSRs and ids."""

from __future__ import annotations

import argparse
import json

from pki.csr import accept_csr
from pki.doctor import diagnose
from pki.ids import check_registration_id
from pki.pem import load_certificate, load_certificates, load_csr

from ..common import OK, PROBLEM, Cli, UsageError, command_group, now, read


def register(commands) -> None:
    parser = commands.add_parser("doctor", help="find why DPS would refuse a device certificate (401002 and more)")
    parser.add_argument("--cert", required=True, metavar="FILE",
                        help="device certificate, PEM or DER (may be followed by the chain it sends)")
    parser.add_argument("--chain", metavar="FILE", help="the certificates the device sends after its own")
    parser.add_argument("--root", metavar="FILE", help="the root CA certificate DPS trusts")
    parser.add_argument("--registration-id", metavar="ID", help="the id the device registers with")
    parser.add_argument("--group-cert", metavar="FILE", action="append",
                        help="the enrollment group's signing certificate(s); repeatable")
    parser.add_argument("--dps", metavar="NAME", help="also check against what DPS instance NAME holds (its verified "
                                                       "CA certificates and enrollment groups; needs settings)")
    parser.add_argument("--now", metavar="DATE", help="check as of this date (ISO 8601)")
    parser.add_argument("--json", action="store_true", help="findings as JSON")
    parser.set_defaults(run=doctor)

    csr = command_group(commands, "csr", "device CSRs")
    check = csr.add_parser("check", help="check a device CSR as a batch would")
    check.add_argument("--csr", required=True, metavar="FILE", help="PEM or DER certificate request")
    check.add_argument("--device-id", required=True, metavar="ID", help="the device's registration id")
    check.set_defaults(run=csr_check)

    ident = command_group(commands, "id", "registration ids")
    ident_check = ident.add_parser("check", help="check a registration id against DPS's rules")
    ident_check.add_argument("id")
    ident_check.set_defaults(run=id_check)


def doctor(cli: Cli, args: argparse.Namespace) -> int:
    device = load_certificates(read(args.cert, "--cert"), field="--cert")
    presented = device[1:]  # a --cert file may carry the whole chain, as a device sends it
    if args.chain:
        presented += load_certificates(read(args.chain, "--chain"), field="--chain")
    root = load_certificate(read(args.root, "--root"), field="--root") if args.root else None
    group = []
    for path in args.group_cert or []:
        group += load_certificates(read(path, "--group-cert"), field="--group-cert")
    registration_id = (check_registration_id(args.registration_id, field="--registration-id")
                       if args.registration_id is not None else None)
    findings = diagnose(device[0], presented=presented, root=root, registration_id=registration_id,
                        group_certificates=group or None, dps=_dps_view(cli, args.dps) if args.dps else None,
                        now=now(args.now))
    errors = [f for f in findings if f.severity == "error"]
    if args.json:
        cli.say(json.dumps({"ok": not errors, "findings": [f.__dict__ for f in findings]}, indent=2))
    else:
        cli.say(f"device: {device[0].subject.rfc4514_string()} (serial {device[0].serial_number:X})")
        for finding in findings:
            cli.say(str(finding))
        cli.say("no problems found" if not findings else
                f"{len(errors)} problem(s), {len(findings) - len(errors)} warning(s)")
    return PROBLEM if errors else OK


def _dps_view(cli: Cli, name: str):
    """What DPS instance ``name`` holds: its verified CA certificates (management API) and enrollment groups."""
    from pki.doctor import DpsView

    settings = cli.services.settings
    instance = next((i for i in settings.dps_pool if i.name == name), None)
    if instance is None:
        raise UsageError(f"--dps {name}: not in DPS_INSTANCES ({', '.join(i.name for i in settings.dps_pool)})")
    verified = tuple(load_certificate(c.pem, field=f"DPS {name} certificate {c.name}")
                     for c in cli.services.ca_certificates.list(instance) if c.verified and c.pem)
    groups = []
    for group in cli.services.groups.groups(name):
        slots = ((group.get("attestation") or {}).get("x509") or {}).get("signingCertificates") or {}
        groups.append((group["enrollmentGroupId"], tuple(((slot or {}).get("info") or {}).get(
            "sha1Thumbprint", "").upper() for slot in slots.values() if slot)))
    return DpsView(name=name, verified=verified, groups=tuple(groups))


def csr_check(cli: Cli, args: argparse.Namespace) -> int:
    device_id = check_registration_id(args.device_id, field="--device-id")
    csr = load_csr(read(args.csr, "--csr"), field="--csr")
    accept_csr(csr, device_id, field="--csr")
    cli.say(f"ok: the CSR is signed by its key and names {device_id}")
    return OK


def id_check(cli: Cli, args: argparse.Namespace) -> int:
    check_registration_id(args.id, field="id")
    cli.say(f"ok: {args.id} is a valid DPS registration id")
    return OK
