"""``pkictl device export|show|register|renew``: one device's files, record, registration with DPS, and renewal
through it."""

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
    show.add_argument("--json", action="store_true", help="the whole record and the certificate history as JSON")
    show.set_defaults(run=device_show)
    registration = device.add_parser("register", help="register with DPS over HTTPS with the device certificate "
                                     "(mutual TLS), as a device does on first boot")
    _registration_options(registration)
    registration.set_defaults(run=device_register)
    renewal = device.add_parser("renew", help="renew the device certificate as a device does: a new key and CSR, "
                                "sent in the DPS registration payload, presenting the current certificate")
    _registration_options(renewal)
    renewal.add_argument("--out", required=True, metavar="DIR", help="where cert.pem, chain.pem and device.key go")
    renewal.add_argument("--key-type", default="ec-p256", help="the new key: ec-p256 (default), ec-p384, rsa-2048...")
    renewal.set_defaults(run=device_renew)


def _registration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", required=True, metavar="FILE", help="device certificate (PEM, may include chain)")
    parser.add_argument("--key", required=True, metavar="FILE", help="device private key (PEM)")
    parser.add_argument("--chain", metavar="FILE", help="intermediate(s) to send after the device certificate")
    parser.add_argument("--id-scope", help="DPS id scope (default: the only one in DPS_INSTANCES)")
    parser.add_argument("--registration-id", metavar="ID", help="default: the certificate's CN")
    parser.add_argument("--endpoint", help="DPS device endpoint (default: DPS_DEVICE_ENDPOINT, else "
                        "global.azure-devices-provisioning.net)")
    parser.add_argument("--timeout", type=float, default=60, metavar="SECONDS")


def _write_files(out: Path, files: Mapping[str, bytes]) -> Path:
    """``files`` into ``out``: the device's key material (``device.*``) owner-only, the certificates 0644; an old
    file is removed first, so a key is never written through its mode or a symlink."""
    out.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        target = out / filename
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if filename.startswith("device.") else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    return out


def device_export(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.device_files import factory_files
    from handlers.errors import InvalidMessage

    services = cli.services
    try:
        record, written = factory_files(args.customer, args.device, store=services.store, files=services.files,
                                        secrets=services.secrets, with_key=args.include_key)
    except InvalidMessage as exc:
        raise UsageError(f"--include-key: {exc.reason}") from None
    out = _write_files(Path(args.out), written)
    cli.say(f"wrote {', '.join(written)} to {out} (serial {record.serial}, notAfter {record.not_after})")
    if args.include_key:
        cli.say("device.key is unencrypted: hand it to the factory line and delete it")
    return OK


def device_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.records import DeviceRecord, read_device

    doc = read_device(cli.services.store, args.customer, args.device)
    if doc is None:
        raise NotFound(f"no device {args.device!r} for customer {args.customer!r}")
    record = DeviceRecord.from_json(doc.data)
    if args.json:  # the record, then every certificate issued to the device (the current one first, "current": true)
        cli.say(json.dumps({**doc.data, "certificates": record.certificates}, indent=2))
        return OK
    data = doc.data
    cli.say(f"device {args.device} of {args.customer}: {data['status']}"
            + (f" ({data['disabledReason']})" if data.get("disabledReason") else ""))
    hub = data.get("hub") or {}
    cli.say(f"  key {data.get('keySource', '-')}; hub {hub.get('name', 'none known')}"
            + (f" ({hub['status']})" if hub.get("status") else ""))
    cli.say("  certificates, newest first:")
    for entry in record.certificates:
        cli.say(f"  {'*' if entry.get('current') else ' '} {entry['serial']:<40} {entry.get('issuedBy', '-'):<8} "
                f"issued {entry.get('issuedAt', '-')}  notAfter {entry['notAfter']}")
    return OK


def device_register(cli: Cli, args: argparse.Namespace) -> int:
    from clients.device_registration import RegistrationError

    try:
        result, registration_id = _register(cli, args)
    except RegistrationError:
        return PROBLEM
    cli.say(f"{registration_id}: {result.status} to hub {result.assigned_hub} as device {result.device_id}")
    return OK


def device_renew(cli: Cli, args: argparse.Namespace) -> int:
    """A new key and CSR; registration with ``{"pkiRenewal": {"csr"}}`` as payload, presenting the current
    certificate; the returned certificate checked (CN, key, chain up to a self-signed root) and written."""
    import base64

    from clients.device_registration import RegistrationError
    from pki.csr import device_csr
    from pki.keys import KeyType, generate_key

    key_type = KeyType.parse(args.key_type, field="--key-type")
    current = load_certificates(read(args.cert, "--cert"), field="--cert")[0]
    common_names = current.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    device_id = args.registration_id or (common_names[0].value if common_names else "")
    key = generate_key(key_type)
    payload = {"pkiRenewal": {"csr": base64.b64encode(device_csr(device_id, key)).decode()}}
    try:
        result, _ = _register(cli, args, payload=payload)
    except RegistrationError:
        return PROBLEM
    answer = (result.payload or {}).get("pkiRenewal") or {}
    if answer.get("status") != "issued":
        cli.say(f"{device_id}: renewal refused: {answer.get('reason') or 'no pkiRenewal answer in the payload'} "
                f"(registered to hub {result.assigned_hub} with the current certificate)")
        return PROBLEM
    renewed = load_certificates(answer.get("certificate") or "", field="pkiRenewal.certificate")[0]
    chain = load_certificates("".join(answer.get("chain") or []), field="pkiRenewal.chain")
    problem = _renewal_problem(renewed, chain, key, device_id)
    if problem:
        cli.say(f"{device_id}: the returned certificate was not written: {problem}")
        return PROBLEM
    out = _write_files(Path(args.out), {"cert.pem": export.cert_pem(renewed),
                                        "chain.pem": export.chain_pem([renewed, *chain]),
                                        "device.key": export.key_pem(key)})
    cli.say(f"{device_id}: renewed, serial {answer['serial']}, notAfter {answer['notAfter']}; wrote cert.pem, "
            f"chain.pem, device.key to {out}")
    return OK


def _renewal_problem(renewed: x509.Certificate, chain: list[x509.Certificate], key, device_id: str) -> str | None:
    """Why the returned certificate must not replace the device's: not for the new key, or anything the chain
    doctor finds DPS would refuse (CN, profile, validity, the chain up to its self-signed root)."""
    import datetime as dt

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from pki.doctor import diagnose

    def spki(public_key) -> bytes:
        return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(renewed.public_key()) != spki(key.public_key()):
        return "it is not for the new key"
    findings = diagnose(renewed, presented=chain, root=chain[-1] if chain else None, registration_id=device_id,
                        now=dt.datetime.now(dt.UTC))
    problems = [f.message for f in findings if f.severity == "error" or f.code == "root-not-self-signed"]
    return "; ".join(problems) or None


def _register(cli: Cli, args: argparse.Namespace, payload: dict | None = None):
    """Register with DPS as ``args`` say (``--cert``, ``--chain``, ``--key``...); says why on failure and raises."""
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
                                     ca_path=cli.env.get("EMULATOR_CA_PATH") or None, timeout_s=args.timeout,
                                     payload=payload)
        except RegistrationError as exc:
            code = f" (DPS error {exc.error_code})" if exc.error_code else ""
            cli.say(f"registration of {registration_id} refused or failed{code}: {exc}")
            if exc.error_code == 401002:
                cli.say("hint: `pkictl doctor --cert CERT --chain CHAIN --root ROOT` names the cause")
            raise
    return result, registration_id


def single_id_scope(env: Mapping[str, str]) -> str:
    """The id scope of the only DPS instance of DPS_INSTANCES (``--id-scope`` is needed when there are several)."""
    try:
        instances = json.loads(env.get("DPS_INSTANCES") or "[]")
    except ValueError:
        instances = []
    if len(instances) == 1:
        return instances[0]["idScope"]
    raise UsageError("--id-scope is required (DPS_INSTANCES does not name exactly one DPS instance)")
