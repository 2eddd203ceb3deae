"""``pkictl device export|show|register``: one device's files, record and registration with DPS."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from handlers.errors import NotFound
from pki import export
from pki.ids import check_registration_id
from pki.pem import load_certificates

from ..common import OK, PROBLEM, Cli, UsageError, command_group, read


def register(commands) -> None:
    device = command_group(commands, "device", "devices")
    export_parser = device.add_parser("export", help="what a factory line needs for one device")
    export_parser.add_argument("customer")
    export_parser.add_argument("device")
    export_parser.add_argument("--out", required=True, metavar="DIR")
    export_parser.add_argument("--include-key", action="store_true",
                               help="also device.pfx and device.key (decrypted with the batch password from Key Vault)")
    export_parser.set_defaults(run=device_export)
    show = device.add_parser("show", help="a device's record (status, serial, notAfter, outputs, last command) "
                                          "and every certificate issued to it")
    show.add_argument("customer")
    show.add_argument("device")
    show.set_defaults(run=device_show)
    registration = device.add_parser("register", help="register with DPS over HTTPS with the device certificate "
                                     "(mutual TLS), as a device does on first boot")
    registration.add_argument("--cert", required=True, metavar="FILE",
                              help="device certificate (PEM, may include chain)")
    registration.add_argument("--key", required=True, metavar="FILE", help="device private key (PEM)")
    registration.add_argument("--chain", metavar="FILE", help="intermediate(s) to send after the device certificate")
    registration.add_argument("--id-scope", help="DPS id scope (default: the only one in DPS_INSTANCES)")
    registration.add_argument("--registration-id", metavar="ID", help="default: the certificate's CN")
    registration.add_argument("--endpoint", help="DPS device endpoint (default: DPS_DEVICE_ENDPOINT, else "
                              "global.azure-devices-provisioning.net)")
    registration.add_argument("--timeout", type=float, default=60, metavar="SECONDS")
    registration.set_defaults(run=device_register)


def device_export(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.device_files import factory_files
    from handlers.errors import InvalidMessage

    services = cli.services
    try:
        record, written = factory_files(args.customer, args.device, store=services.store, files=services.files,
                                        secrets=services.secrets, with_key=args.include_key)
    except InvalidMessage as exc:
        raise UsageError(f"--include-key: {exc.reason}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for filename, content in written.items():
        target = out / filename
        target.unlink(missing_ok=True)  # never write a key through an old file's mode or a symlink
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600 if filename.startswith("device.") else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    cli.say(f"wrote {', '.join(written)} to {out} (serial {record.serial}, notAfter {record.not_after})")
    if args.include_key:
        cli.say("device.key is unencrypted: hand it to the factory line and delete it")
    return OK


def device_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.records import DeviceRecord, read_device

    doc = read_device(cli.services.store, args.customer, args.device)
    if doc is None:
        raise NotFound(f"no device {args.device!r} for customer {args.customer!r}")
    # the record, then every certificate issued to the device (the current one first, "current": true)
    cli.say(json.dumps({**doc.data, "certificates": DeviceRecord.from_json(doc.data).certificates}, indent=2))
    return OK


def device_register(cli: Cli, args: argparse.Namespace) -> int:
    import tempfile

    from clients.device_registration import DEFAULT_ENDPOINT, RegistrationError
    from clients.device_registration import register as register_device

    certs = load_certificates(read(args.cert, "--cert"), field="--cert")
    if args.chain:
        certs += load_certificates(read(args.chain, "--chain"), field="--chain")
    read(args.key, "--key")
    common_names = certs[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    registration_id = args.registration_id or (common_names[0].value if common_names else "")
    check_registration_id(registration_id, field="--registration-id")
    id_scope = args.id_scope or single_id_scope(cli.env)
    endpoint = args.endpoint or cli.env.get("DPS_DEVICE_ENDPOINT") or DEFAULT_ENDPOINT
    with tempfile.TemporaryDirectory() as tmp:
        chain_path = Path(tmp) / "chain.pem"
        chain_path.write_bytes(export.chain_pem(certs))
        try:
            result = register_device(endpoint, id_scope, registration_id, chain_path, args.key,
                                     ca_path=cli.env.get("EMULATOR_CA_PATH") or None, timeout_s=args.timeout)
        except RegistrationError as exc:
            code = f" (DPS error {exc.error_code})" if exc.error_code else ""
            cli.say(f"registration of {registration_id} refused or failed{code}: {exc}")
            if exc.error_code == 401002:
                cli.say("hint: `pkictl doctor --cert CERT --chain CHAIN --root ROOT` names the cause")
            return PROBLEM
    cli.say(f"{registration_id}: {result.status} to hub {result.assigned_hub} as device {result.device_id}")
    return OK


def single_id_scope(env: Mapping[str, str]) -> str:
    """The id scope of the only DPS instance of DPS_INSTANCES (``--id-scope`` is needed when there are several)."""
    try:
        instances = json.loads(env.get("DPS_INSTANCES") or "[]")
    except ValueError:
        instances = []
    if len(instances) == 1:
        return instances[0]["idScope"]
    raise UsageError("--id-scope is required (DPS_INSTANCES does not name exactly one DPS instance)")
