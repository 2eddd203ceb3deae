"""``pkictl root create|show|register`` and ``pkictl verification-cert``: the company root CA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pki import export
from pki.keys import CA_ROOT_KEY_TYPES, KeyType

from ..common import OK, PROBLEM, Cli, command_group, now


def register(commands) -> None:
    root = command_group(commands, "root", "the company root CA")
    create = root.add_parser("create", help="create the root key (in the key store) and its self-signed certificate")
    create.add_argument("--key-type", choices=[k.value for k in CA_ROOT_KEY_TYPES],
                        help="key algorithm (default: setting ROOT_CA_KEY_TYPE, else ec-p384)")
    create.add_argument("--validity-years", type=int, choices=range(1, 51), metavar="N",
                        help="validity in years, 1-50 (default: ROOT_CA_VALIDITY_YEARS, else 20)")
    create.add_argument("--common-name", help="subject CN (default: ROOT_CA_COMMON_NAME)")
    create.add_argument("--organization", help="subject O (default: ROOT_CA_ORGANIZATION)")
    create.add_argument("--country", help="subject C, ISO 3166 alpha-2")
    create.add_argument("--force", action="store_true", help="replace an existing root (new key version)")
    create.set_defaults(run=root_create)
    show = root.add_parser("show", help="print the root certificate or its summary")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--pem", action="store_true", help="the certificate in PEM (for upload to DPS)")
    form.add_argument("--json", action="store_true", help="the summary as JSON")
    show.set_defaults(run=root_show)
    upload = root.add_parser("register", help="upload the root to DPS instances and verify it by proof of "
                                              "possession (the root key signs in Key Vault)")
    where = upload.add_mutually_exclusive_group(required=True)
    where.add_argument("--dps", action="append", metavar="NAME", help="a DPS instance of DPS_INSTANCES (repeatable)")
    where.add_argument("--all", action="store_true", help="every instance of DPS_INSTANCES")
    upload.set_defaults(run=root_register)

    verification = commands.add_parser("verification-cert", help="proof-of-possession certificate for DPS")
    verification.add_argument("--code", required=True, help="the verification code DPS shows")
    verification.add_argument("--out", metavar="FILE", help="write the PEM here instead of stdout")
    verification.set_defaults(run=verification_cert)


def root_create(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.root_ca import RootRequest, create_root

    w = cli.services
    request = RootRequest(
        key_name=w.settings.root_key_name,
        key_type=KeyType.parse(args.key_type or w.settings.root_key_type.value, field="--key-type",
                               allowed=CA_ROOT_KEY_TYPES),
        validity_years=args.validity_years or w.settings.root_validity_years,
        common_name=args.common_name or w.settings.root_common_name,
        organization=args.organization or w.settings.root_organization,
        country=args.country)
    root = create_root(request, store=w.store, keys=w.keys, now=now(None), force=args.force)
    summary = root.record["summary"]
    cli.say(f"root CA created: {summary['subject']}")
    cli.say(f"  key:        {request.key_type.value}, {root.key.name} version {root.key.version} (never exported)")
    cli.say(f"  serial:     {summary['serial']}")
    cli.say(f"  notAfter:   {summary['notAfter']}")
    cli.say(f"  SHA-1:      {summary['thumbprintSha1']}")
    cli.say("next: `pkictl root show --pem > root.pem`, upload it to DPS, "
            "then `pkictl verification-cert --code ...`")
    return OK


def root_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.root import load_root

    root = load_root(cli.services.store, cli.services.keys)
    if args.pem:
        cli.out.write(export.cert_pem(root.certificate).decode())
        return OK
    status = _root_status(cli, root)
    if args.json:
        cli.say(json.dumps({**export.summary(root.certificate), "keyName": root.key.name,
                            "keyVersion": root.key.version, "keyType": root.key.key_type.value, "dps": status},
                           indent=2))
    else:
        for key, value in export.summary(root.certificate).items():
            cli.say(f"{key + ':':18}{value}")
        cli.say(f"{'key:':18}{root.key.key_type.value}, {root.key.name} version {root.key.version}")
        for name, state in status.items():
            cli.say(f"{'DPS ' + name + ':':18}{state}")
    return OK


def _root_status(cli: Cli, root) -> dict[str, str]:
    """Where the root stands in each DPS instance, read from DPS itself (a failure to read is reported)."""
    from handlers.errors import HandlerError
    from handlers.root_registration import root_status

    settings = cli.services.settings
    try:
        return root_status(root, settings.dps_pool, certificates=cli.services.ca_certificates)
    except HandlerError as exc:
        return {i.name: f"cannot read: {exc}" for i in settings.dps_pool}


def root_register(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.root import load_root
    from handlers.root_registration import register_root

    w = cli.services
    root = load_root(w.store, w.keys)
    outcomes = register_root(root, w.settings.dps_pool, names=None if args.all else args.dps,
                             certificates=w.ca_certificates, keys=w.keys, now=now(None))
    for name, outcome in outcomes.items():
        cli.say(f"DPS {name}: {outcome}")
    return OK if all(o.startswith("verified") for o in outcomes.values()) else PROBLEM


def verification_cert(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.verification_cert import root_verification_certificate

    cert = root_verification_certificate(args.code, store=cli.services.store, keys=cli.services.keys, now=now(None))
    pem = export.cert_pem(cert).decode()
    if args.out:
        Path(args.out).write_text(pem)
        cli.say(f"verification certificate for code {args.code} written to {args.out}; upload it to DPS "
                "(Certificates > your root > Verify)")
    else:
        cli.out.write(pem)
    return OK
