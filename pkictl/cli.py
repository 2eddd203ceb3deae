"""``python -m pkictl``: exit 0 on success, 1 when a problem was found, 2 on bad usage or bad input."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from cryptography import x509

from handlers.errors import AlreadyExists, Conflict, InvalidMessage, NotFound, NotPermitted, TransientError
from pki import PkiError, export
from pki.csr import accept_csr
from pki.doctor import diagnose
from pki.ids import check_registration_id
from pki.keys import CA_ROOT_KEY_TYPES, KeyType
from pki.pem import load_certificate, load_certificates, load_csr
from settings import SettingsError

OK, PROBLEM, USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input given on the command line (a file that cannot be read, a bad date)."""


class Problem(Exception):
    """The command could not do what was asked, for a reason outside the command line (the message says which)."""


def _now(value: str | None) -> dt.datetime:
    if not value:
        return dt.datetime.now(dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--now: {value!r} is not an ISO date such as 2027-01-31 or 2027-01-31T12:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None


class Cli:
    """The commands; ``env`` is the settings source and ``wire`` builds clients only when a command needs them."""

    def __init__(self, env: Mapping[str, str], out: TextIO, wire: Callable | None = None):
        self.env = env
        self.out = out
        self._wire = wire
        self._wiring = None

    @property
    def wiring(self):
        if self._wiring is None:
            if self._wire is None:
                from .wiring import wire
                self._wire = wire
            self._wiring = self._wire(self.env)
        return self._wiring

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    # -- root CA ---------------------------------------------------------------------------
    def root_create(self, args: argparse.Namespace) -> int:
        from handlers.root_ca import RootRequest, create_root

        w = self.wiring
        request = RootRequest(
            key_name=w.settings.root_key_name,
            key_type=KeyType.parse(args.key_type or w.settings.root_key_type.value, field="--key-type",
                                   allowed=CA_ROOT_KEY_TYPES),
            validity_years=args.validity_years or w.settings.root_validity_years,
            common_name=args.common_name or w.settings.root_common_name,
            organization=args.organization or w.settings.root_organization,
            country=args.country)
        root = create_root(request, store=w.store, keys=w.keys, now=_now(None), force=args.force)
        summary = root.record["summary"]
        self.say(f"root CA created: {summary['subject']}")
        self.say(f"  key:        {request.key_type.value}, {root.key.name} version {root.key.version} (never exported)")
        self.say(f"  serial:     {summary['serial']}")
        self.say(f"  notAfter:   {summary['notAfter']}")
        self.say(f"  SHA-1:      {summary['thumbprintSha1']}")
        self.say("next: `pkictl root show --pem > root.pem`, upload it to DPS, "
                 "then `pkictl verification-cert --code ...`")
        return OK

    def root_show(self, args: argparse.Namespace) -> int:
        from handlers.root import load_root

        root = load_root(self.wiring.store, self.wiring.keys)
        if args.pem:
            self.out.write(export.cert_pem(root.certificate).decode())
            return OK
        status = self._root_status(root)
        if args.json:
            self.say(json.dumps({**export.summary(root.certificate), "keyName": root.key.name,
                                 "keyVersion": root.key.version, "keyType": root.key.key_type.value, "dps": status},
                                indent=2))
        else:
            for key, value in export.summary(root.certificate).items():
                self.say(f"{key + ':':18}{value}")
            self.say(f"{'key:':18}{root.key.key_type.value}, {root.key.name} version {root.key.version}")
            for name, state in status.items():
                self.say(f"{'DPS ' + name + ':':18}{state}")
        return OK

    def _root_status(self, root) -> dict[str, str]:
        """Where the root stands in each DPS instance, read from DPS itself (a failure to read is reported)."""
        from clients.factory import ca_certificates
        from handlers.errors import HandlerError
        from handlers.root_registration import root_status

        settings = self.wiring.settings
        try:
            return root_status(root, settings.dps_pool, certificates=ca_certificates(settings))
        except HandlerError as exc:
            return {i.name: f"cannot read: {exc}" for i in settings.dps_pool}

    def root_register(self, args: argparse.Namespace) -> int:
        from clients.factory import ca_certificates
        from handlers.root import load_root
        from handlers.root_registration import register_root

        w = self.wiring
        root = load_root(w.store, w.keys)
        outcomes = register_root(root, w.settings.dps_pool, names=None if args.all else args.dps,
                                 certificates=ca_certificates(w.settings), keys=w.keys, now=_now(None))
        for name, outcome in outcomes.items():
            self.say(f"DPS {name}: {outcome}")
        return OK if all(o.startswith("verified") for o in outcomes.values()) else PROBLEM

    def verification_cert(self, args: argparse.Namespace) -> int:
        from handlers.verification_cert import root_verification_certificate

        cert = root_verification_certificate(args.code, store=self.wiring.store, keys=self.wiring.keys,
                                             now=_now(None))
        pem = export.cert_pem(cert).decode()
        if args.out:
            Path(args.out).write_text(pem)
            self.say(f"verification certificate for code {args.code} written to {args.out}; upload it to DPS "
                     "(Certificates > your root > Verify)")
        else:
            self.out.write(pem)
        return OK

    # -- offline checks --------------------------------------------------------------------
    def doctor(self, args: argparse.Namespace) -> int:
        device = load_certificates(_read(args.cert, "--cert"), field="--cert")
        presented = device[1:]  # a --cert file may carry the whole chain, as a device sends it
        if args.chain:
            presented += load_certificates(_read(args.chain, "--chain"), field="--chain")
        root = load_certificate(_read(args.root, "--root"), field="--root") if args.root else None
        group = []
        for path in args.group_cert or []:
            group += load_certificates(_read(path, "--group-cert"), field="--group-cert")
        registration_id = (check_registration_id(args.registration_id, field="--registration-id")
                           if args.registration_id is not None else None)
        findings = diagnose(device[0], presented=presented, root=root, registration_id=registration_id,
                            group_certificates=group or None, dps=self._dps_view(args.dps) if args.dps else None,
                            now=_now(args.now))
        errors = [f for f in findings if f.severity == "error"]
        if args.json:
            self.say(json.dumps({"ok": not errors, "findings": [f.__dict__ for f in findings]}, indent=2))
        else:
            self.say(f"device: {device[0].subject.rfc4514_string()} (serial {device[0].serial_number:X})")
            for finding in findings:
                self.say(str(finding))
            self.say("no problems found" if not findings else
                     f"{len(errors)} problem(s), {len(findings) - len(errors)} warning(s)")
        return PROBLEM if errors else OK

    def _dps_view(self, name: str):
        """What DPS instance ``name`` holds: its verified CA certificates (management API) and enrollment groups."""
        from clients.factory import ca_certificates, enrollment_groups
        from pki.doctor import DpsView

        settings = self.wiring.settings
        instance = next((i for i in settings.dps_pool if i.name == name), None)
        if instance is None:
            raise UsageError(f"--dps {name}: not in DPS_INSTANCES ({', '.join(i.name for i in settings.dps_pool)})")
        verified = tuple(load_certificate(c.pem, field=f"DPS {name} certificate {c.name}")
                         for c in ca_certificates(settings).list(instance) if c.verified and c.pem)
        groups = []
        for group in enrollment_groups(settings).groups(name):
            slots = ((group.get("attestation") or {}).get("x509") or {}).get("signingCertificates") or {}
            groups.append((group["enrollmentGroupId"], tuple(((slot or {}).get("info") or {}).get(
                "sha1Thumbprint", "").upper() for slot in slots.values() if slot)))
        return DpsView(name=name, verified=verified, groups=tuple(groups))

    def csr_check(self, args: argparse.Namespace) -> int:
        device_id = check_registration_id(args.device_id, field="--device-id")
        csr = load_csr(_read(args.csr, "--csr"), field="--csr")
        accept_csr(csr, device_id, field="--csr")
        self.say(f"ok: the CSR is signed by its key and names {device_id}")
        return OK

    def id_check(self, args: argparse.Namespace) -> int:
        check_registration_id(args.id, field="id")
        self.say(f"ok: {args.id} is a valid DPS registration id")
        return OK

    def device_register(self, args: argparse.Namespace) -> int:
        import tempfile

        from clients.device_registration import DEFAULT_ENDPOINT, RegistrationError, register

        certs = load_certificates(_read(args.cert, "--cert"), field="--cert")
        if args.chain:
            certs += load_certificates(_read(args.chain, "--chain"), field="--chain")
        _read(args.key, "--key")
        common_names = certs[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        registration_id = args.registration_id or (common_names[0].value if common_names else "")
        check_registration_id(registration_id, field="--registration-id")
        id_scope = args.id_scope or _single_id_scope(self.env)
        endpoint = args.endpoint or self.env.get("DPS_DEVICE_ENDPOINT") or DEFAULT_ENDPOINT
        with tempfile.TemporaryDirectory() as tmp:
            chain_path = Path(tmp) / "chain.pem"
            chain_path.write_bytes(export.chain_pem(certs))
            try:
                result = register(endpoint, id_scope, registration_id, chain_path, args.key,
                                  ca_path=self.env.get("EMULATOR_CA_PATH") or None, timeout_s=args.timeout)
            except RegistrationError as exc:
                code = f" (DPS error {exc.error_code})" if exc.error_code else ""
                self.say(f"registration of {registration_id} refused or failed{code}: {exc}")
                if exc.error_code == 401002:
                    self.say("hint: `pkictl doctor --cert CERT --chain CHAIN --root ROOT` names the cause")
                return PROBLEM
        self.say(f"{registration_id}: {result.status} to hub {result.assigned_hub} as device {result.device_id}")
        return OK

    def customer_show(self, args: argparse.Namespace) -> int:
        from handlers.records import customer_document

        doc = self.wiring.store.get(customer_document(args.id))
        if doc is None:
            raise NotFound(f"no customer {args.id!r}; `pkictl customer list` shows them")
        record = {k: v for k, v in doc.data.items() if k != "lease"}
        if args.pem:
            self.out.write(record.get("intermediate", {}).get("certificatePem", ""))
            return OK if record.get("intermediate") else PROBLEM
        if not args.json:
            for intermediate in [record.get("intermediate", {}), *record.get("previousIntermediates", [])]:
                intermediate.pop("certificatePem", None)
        self.say(json.dumps(record, indent=2))
        return OK

    def customer_list(self, args: argparse.Namespace) -> int:
        from handlers.records import customer_document, list_customers

        for customer_id in list_customers(self.wiring.store):
            doc = self.wiring.store.get(customer_document(customer_id))
            data = doc.data if doc else {}
            self.say(f"{customer_id:<40} {data.get('status', '?'):<20} {data.get('dps', {}).get('name', '-'):<10} "
                     f"{data.get('intermediate', {}).get('notAfter', '-')}")
        return OK

    def send_onboarding(self, args: argparse.Namespace) -> int:
        import base64

        from clients.storage import send_queue_message
        from handlers.onboarding import QUEUE, OnboardingRequest

        message = {"customerId": args.customer, "displayName": args.display_name, "country": args.country,
                   "iotHubs": args.iot_hub, "allocationPolicy": args.allocation_policy,
                   "iotEdge": args.iot_edge or None, "requestId": args.request_id}
        text = json.dumps({k: v for k, v in message.items() if v is not None})
        OnboardingRequest.parse(text)  # refuse here what the service would reject
        if args.base64:
            text = base64.b64encode(text.encode()).decode()
        message_id = send_queue_message(self.wiring.settings, QUEUE, text)
        self.say(f"sent to {QUEUE} (message {message_id}); follow it with `pkictl customer show {args.customer}`")
        return OK

    def send_command(self, args: argparse.Namespace) -> int:
        import base64
        import uuid

        from clients.storage import send_queue_message
        from handlers.command_message import QUEUE, Command

        message = {"command": args.kind, "customerId": args.customer, "deviceId": args.device,
                   "reason": args.reason, "requestId": args.request_id or f"cli-{uuid.uuid4()}",
                   "disableDevices": True if args.disable_devices else None}
        text = json.dumps({k: v for k, v in message.items() if v is not None})
        Command.parse(text)  # refuse here what the service would reject
        if args.base64:
            text = base64.b64encode(text.encode()).decode()
        message_id = send_queue_message(self.wiring.settings, QUEUE, text)
        follow = f"--device {args.device} " if args.device else ""
        self.say(f"sent {args.kind} to {QUEUE} (message {message_id}, requestId {message['requestId']}); follow it "
                 f"with `pkictl audit --customer {args.customer} {follow}--since today`")
        return OK

    def device_show(self, args: argparse.Namespace) -> int:
        from handlers.records import read_device

        doc = read_device(self.wiring.store, args.customer, args.device)
        if doc is None:
            raise NotFound(f"no device {args.device!r} for customer {args.customer!r}")
        self.say(json.dumps(doc.data, indent=2))
        return OK

    def audit(self, args: argparse.Namespace) -> int:
        from clients.audit import StoreAuditLog

        since = None
        if args.since:
            since = dt.datetime.now(dt.UTC).date() if args.since == "today" else _now(args.since).date()
        count = 0
        for event in StoreAuditLog(self.wiring.store).query(customer=args.customer, device=args.device, since=since):
            count += 1
            if args.json:
                self.say(json.dumps(event))
                continue
            subject = "/".join(v for v in (event.get("customer"), event.get("device")) if v) or "-"
            change = f"{event.get('before')} -> {event.get('after')}" if "before" in event else ""
            if event.get("action") == "batch.issue":
                change = f"batch {event.get('batch')} chunk {event.get('chunk')}: {len(event.get('issued', []))} issued"
            detail = event.get("why") or event.get("reason") or ""
            self.say(f"{event.get('recordedAt', event.get('at'))}  {event.get('action', '?'):<20} "
                     f"{event.get('effect', '?'):<8} {subject:<32} {change} {detail}".rstrip()
                     + (f" (requestId {event['requestId']})" if event.get("requestId") else ""))
        if not count:
            self.say("no audit events match")
        return OK

    def sweep_run(self, args: argparse.Namespace) -> int:
        from edge.services import build_services
        from handlers.expiry_sweep import SweepIncomplete, run_sweep

        services = build_services(self.wiring.settings)
        try:
            report = run_sweep(ports=services.commands, queue=services.queue, settings=services.sweep,
                               now=_now(args.now))
        except SweepIncomplete as exc:
            self._sweep_summary(exc.report)
            raise
        self._sweep_summary(report)
        return OK

    def _sweep_summary(self, report: dict) -> None:
        counts = report["counts"]
        self.say(f"expiry sweep {report['date']} (now {report['now']}): "
                 f"{counts['intermediatesRenewed']} intermediate(s) "
                 f"renewed, {counts['secondariesRemoved']} expired secondary removed, {counts['devicesExpiring']} "
                 f"device(s) expiring within {report['settings']['notice_before_days']} days, "
                 f"{counts['devicesMarkedExpired']} marked expired, {len(report['notices'])} notice(s) today")
        for item in report["intermediates"]["renewed"]:
            self.say(f"  renewed {item['customerId']}: serial {item['previousSerial']} -> {item['serial']} "
                     f"(notAfter {item['notAfter']}); the old one stays the group's secondary")
        for notice in report["notices"]:
            self.say(f"  notice {notice['noticeId']}: {notice['devices']} device(s), {notice['status']} "
                     "(queue certificate-expiry-notices)")
        for warning in report["warnings"]:
            self.say(f"  WARNING: {warning}")
        self.say(f"report: {report_path(report['date'])} (`pkictl sweep show {report['date']}`)")

    def sweep_show(self, args: argparse.Namespace) -> int:
        from handlers.expiry_sweep import report_document

        day = _now(args.date).date() if args.date else dt.datetime.now(dt.UTC).date()
        doc = self.wiring.store.get(report_document(day))
        if doc is None:
            raise NotFound(f"no expiry sweep report for {day}; `pkictl sweep run` makes one")
        self.say(json.dumps(doc.data, indent=2))
        return OK

    def batch_show(self, args: argparse.Namespace) -> int:
        from handlers.records import BatchRef

        doc = self.wiring.store.get(BatchRef(args.customer, args.batch).document)
        if doc is None:
            raise NotFound(f"no batch {args.batch!r} for customer {args.customer!r}")
        data = doc.data
        if args.json:
            self.say(json.dumps({k: v for k, v in data.items() if k not in ("chunks", "lease")}, indent=2))
            return OK
        self.say(_batch_line(data))
        if data.get("report"):
            self.say(f"report: {data['report']['json']} and {data['report']['csv']}")
        if data.get("pfxSecret"):
            self.say(f"PFX/key password: Key Vault secret {data['pfxSecret']['name']} "
                     f"(version {data['pfxSecret']['version']})")
        return OK

    def send_batch(self, args: argparse.Namespace) -> int:
        import time

        from azure.storage.blob import BlobServiceClient

        from clients.storage import blob_service
        from handlers.records import BatchRef

        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"FILE {args.file}: no such file")
        size = path.stat().st_size
        name = args.name or path.name
        metadata = {k: str(v) for k, v in (("keytype", args.key_type), ("validitydays", args.validity_days),
                                            ("output", args.output), ("register", args.register),
                                            ("reissue", "true" if args.reissue else None),
                                            ("requestid", args.request_id)) if v is not None}
        from azure.core.exceptions import ResourceExistsError

        from handlers.records import BatchSettings

        BatchRef.from_path(f"device-batches/{args.customer}/{name}", BatchSettings())  # what intake would refuse
        service: BlobServiceClient = blob_service(self.wiring.settings)
        container = service.get_container_client("device-batches")
        if not container.exists():
            container.create_container()
        try:
            with open(path, "rb") as stream:  # streamed, not read into memory
                container.upload_blob(f"{args.customer}/{name}", stream, overwrite=False, metadata=metadata)
        except ResourceExistsError:
            raise UsageError(f"batch name {name!r} is used already for {args.customer}; pass --name NEW") from None
        self.say(f"uploaded device-batches/{args.customer}/{name} ({size} bytes)")
        if args.functions_host:
            self._announce_upload(container.get_blob_client(f"{args.customer}/{name}"), args.functions_host)
        if args.no_wait:
            return OK
        ref, deadline, last = BatchRef(args.customer, name), time.monotonic() + args.timeout, ""
        while time.monotonic() < deadline:
            doc = self.wiring.store.get(ref.document)
            if doc is not None:
                line = _batch_line(doc.data, bar=True)
                if line != last:
                    self.out.write("\r" + line)
                    self.out.flush()
                    last = line
                if doc.data["status"] in ("complete", "rejected"):
                    self.say("")
                    return self.batch_show(argparse.Namespace(customer=args.customer, batch=name, json=False)) \
                        if doc.data["status"] == "complete" else PROBLEM
            time.sleep(0.5)
        self.say(f"\nnot finished within {args.timeout:.0f}s; "
                 f"follow it with `pkictl batch show {args.customer} {name}`")
        return PROBLEM

    def _announce_upload(self, blob, functions_host: str) -> None:
        """Be Event Grid for a local Functions host: POST the upload's BlobCreated event to its blob webhook."""
        from clients.event_grid import DeliveryFailed, blob_created_event, deliver
        from clients.storage import ca_path

        props = blob.get_blob_properties()
        event = blob_created_event(container=blob.container_name, blob=blob.blob_name, url=blob.url,
                                   etag=props.etag, length=props.size, account=blob.account_name,
                                   content_type=props.content_settings.content_type or "")
        try:
            url = deliver(functions_host, "device_batch", [event], connection_verify=ca_path(self.wiring.settings)
                          or True)
        except ValueError as exc:
            raise UsageError(f"--functions-host: {exc}") from None
        except DeliveryFailed as exc:
            raise Problem(f"the batch is uploaded, but the Functions host did not take its BlobCreated event: {exc}."
                          " Is `func start` running? The batch runs once the event is delivered (upload it again "
                          "under a new --name, or post the event yourself)") from None
        self.say(f"BlobCreated event delivered to {url}")

    def device_export(self, args: argparse.Namespace) -> int:
        from cryptography.hazmat.primitives.serialization import pkcs12

        from clients.factory import secrets_store
        from clients.storage import blob_service
        from handlers.records import read_device
        from handlers.root import load_root

        doc = read_device(self.wiring.store, args.customer, args.device)
        if doc is None:
            raise NotFound(f"no device {args.device!r} for customer {args.customer!r}")
        record = doc.data
        service = blob_service(self.wiring.settings)

        def fetch(path: str) -> bytes:
            container, _, name = path.partition("/")
            return service.get_blob_client(container, name).download_blob().readall()

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = {"cert.pem": fetch(record["outputs"]["certificate"]), "chain.pem": fetch(record["outputs"]["chain"]),
                   "root.pem": export.cert_pem(load_root(self.wiring.store, self.wiring.keys).certificate)}
        if args.include_key:
            if record.get("keySource") != "generated":
                raise UsageError(f"--include-key: the key of {args.device} never left the device (it sent a CSR)")
            secret = record["pfxSecret"]
            password = secrets_store(self.wiring.settings, self.wiring.keys).get_secret(secret["name"],
                                                                                        secret["version"]).encode()
            if record["outputs"].get("pfx"):
                pfx = fetch(record["outputs"]["pfx"])
                key = pkcs12.load_key_and_certificates(pfx, password)[0]
                written["device.pfx"] = pfx
            else:
                from cryptography.hazmat.primitives import serialization

                key = serialization.load_pem_private_key(fetch(record["outputs"]["key"]), password)
            written["device.key"] = export.key_pem(key)
        for filename, content in written.items():
            target = out / filename
            target.unlink(missing_ok=True)  # never write a key through an old file's mode or a symlink
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600 if filename.startswith("device.") else 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        self.say(f"wrote {', '.join(written)} to {out} (serial {record['serial']}, notAfter {record['notAfter']})")
        if args.include_key:
            self.say("device.key is unencrypted: hand it to the factory line and delete it")
        return OK

    def local(self, args: argparse.Namespace) -> int:
        from . import local

        if args.sub == "up":
            return local.up(detach=args.detach, dps_instances=args.dps_instances, functions=not args.no_functions,
                            out=self.out, azure_quotas=args.azure_quotas)
        if args.sub == "down":
            return local.down(self.out)
        if args.sub == "env":
            return local.env(args.principal, self.out)
        return local.status(self.out)

    def demo(self, args: argparse.Namespace) -> int:
        from .demo import run_demo

        return run_demo(self.out, main)


def report_path(day: str) -> str:
    from handlers.expiry_sweep import report_document

    return f"{report_document(dt.date.fromisoformat(day))} (state container)"


def _batch_line(data: dict, bar: bool = False) -> str:
    status, rows = data.get("status", "?"), data.get("rows") or 0
    counts = data.get("counts") or {}
    done = sum(counts.values())
    if status == "rejected":
        return f"batch {data['batchName']}: rejected: {data.get('field') or ''} {data.get('reason', '')}".strip()
    progress = f"{done}/{rows}" if rows else "validating"
    meter = ""
    if bar and rows:
        filled = int(30 * done / rows)
        meter = "[" + "#" * filled + "." * (30 - filled) + "] "
    return (f"{meter}batch {data['batchName']}: {status} {progress} (issued {counts.get('issued', 0)}, already "
            f"{counts.get('already_issued', 0)}, failed {counts.get('failed', 0)})")


def _single_id_scope(env: Mapping[str, str]) -> str:
    try:
        instances = json.loads(env.get("DPS_INSTANCES") or "[]")
    except ValueError:
        instances = []
    if len(instances) == 1:
        return instances[0]["idScope"]
    raise UsageError("--id-scope is required (DPS_INSTANCES does not name exactly one DPS instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkictl", description="Operate the IoT X.509 PKI (Azure IoT DPS).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    root = commands.add_parser("root", help="the company root CA").add_subparsers(dest="sub", required=True,
                                                                                   metavar="SUBCOMMAND")
    create = root.add_parser("create", help="create the root key (in the key store) and its self-signed certificate")
    create.add_argument("--key-type", choices=[k.value for k in CA_ROOT_KEY_TYPES],
                        help="key algorithm (default: setting ROOT_CA_KEY_TYPE, else ec-p384)")
    create.add_argument("--validity-years", type=int, choices=range(1, 51), metavar="N",
                        help="validity in years, 1-50 (default: ROOT_CA_VALIDITY_YEARS, else 20)")
    create.add_argument("--common-name", help="subject CN (default: ROOT_CA_COMMON_NAME)")
    create.add_argument("--organization", help="subject O (default: ROOT_CA_ORGANIZATION)")
    create.add_argument("--country", help="subject C, ISO 3166 alpha-2")
    create.add_argument("--force", action="store_true", help="replace an existing root (new key version)")
    create.set_defaults(run=Cli.root_create)
    show = root.add_parser("show", help="print the root certificate or its summary")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--pem", action="store_true", help="the certificate in PEM (for upload to DPS)")
    form.add_argument("--json", action="store_true", help="the summary as JSON")
    show.set_defaults(run=Cli.root_show)
    register = root.add_parser("register", help="upload the root to DPS instances and verify it by proof of "
                                                "possession (the root key signs in Key Vault)")
    where = register.add_mutually_exclusive_group(required=True)
    where.add_argument("--dps", action="append", metavar="NAME", help="a DPS instance of DPS_INSTANCES (repeatable)")
    where.add_argument("--all", action="store_true", help="every instance of DPS_INSTANCES")
    register.set_defaults(run=Cli.root_register)

    verification = commands.add_parser("verification-cert", help="proof-of-possession certificate for DPS")
    verification.add_argument("--code", required=True, help="the verification code DPS shows")
    verification.add_argument("--out", metavar="FILE", help="write the PEM here instead of stdout")
    verification.set_defaults(run=Cli.verification_cert)

    doctor = commands.add_parser("doctor", help="find why DPS would refuse a device certificate (401002 and more)")
    doctor.add_argument("--cert", required=True, metavar="FILE",
                        help="device certificate, PEM or DER (may be followed by the chain it sends)")
    doctor.add_argument("--chain", metavar="FILE", help="the certificates the device sends after its own")
    doctor.add_argument("--root", metavar="FILE", help="the root CA certificate DPS trusts")
    doctor.add_argument("--registration-id", metavar="ID", help="the id the device registers with")
    doctor.add_argument("--group-cert", metavar="FILE", action="append",
                        help="the enrollment group's signing certificate(s); repeatable")
    doctor.add_argument("--dps", metavar="NAME", help="also check against what DPS instance NAME holds (its verified "
                                                       "CA certificates and enrollment groups; needs settings)")
    doctor.add_argument("--now", metavar="DATE", help="check as of this date (ISO 8601)")
    doctor.add_argument("--json", action="store_true", help="findings as JSON")
    doctor.set_defaults(run=Cli.doctor)

    csr = commands.add_parser("csr", help="device CSRs").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    check = csr.add_parser("check", help="check a device CSR as a batch would")
    check.add_argument("--csr", required=True, metavar="FILE", help="PEM or DER certificate request")
    check.add_argument("--device-id", required=True, metavar="ID", help="the device's registration id")
    check.set_defaults(run=Cli.csr_check)

    ident = commands.add_parser("id", help="registration ids").add_subparsers(dest="sub", required=True,
                                                                               metavar="SUBCOMMAND")
    id_check = ident.add_parser("check", help="check a registration id against DPS's rules")
    id_check.add_argument("id")
    id_check.set_defaults(run=Cli.id_check)

    customer = commands.add_parser("customer", help="customers").add_subparsers(dest="sub", required=True,
                                                                                metavar="SUBCOMMAND")
    customer_show = customer.add_parser("show", help="a customer's record (status, DPS placement, intermediate)")
    customer_show.add_argument("id")
    shown = customer_show.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the whole record, with the intermediate's PEM")
    shown.add_argument("--pem", action="store_true", help="the intermediate certificate only")
    customer_show.set_defaults(run=Cli.customer_show)
    customer.add_parser("list", help="every customer: id, status, DPS instance, intermediate notAfter"
                        ).set_defaults(run=Cli.customer_list)

    send = commands.add_parser("send", help="enqueue a message for the service").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    onboarding = send.add_parser("onboarding", help="a 'new customer' message on customer-onboarding")
    onboarding.add_argument("--customer", required=True, metavar="ID", help="customerId (a-z, 0-9, '-')")
    onboarding.add_argument("--display-name", help="organization name for the intermediate's O")
    onboarding.add_argument("--country", help="ISO 3166 alpha-2 code for the intermediate's C")
    onboarding.add_argument("--iot-hub", action="append", metavar="HOST", help="IoT hub host name; repeatable")
    onboarding.add_argument("--allocation-policy", choices=["hashed", "geoLatency", "static"])
    onboarding.add_argument("--iot-edge", action="store_true", help="devices are IoT Edge devices")
    onboarding.add_argument("--request-id", help="correlation id, echoed in logs and state")
    onboarding.add_argument("--base64", action="store_true", help="base64-encode the message (as Azure tools do)")
    onboarding.set_defaults(run=Cli.send_onboarding)

    command = send.add_parser("command", help="an operator command on pki-commands")
    command.add_argument("kind", choices=["disable-device", "enable-device", "disable-customer", "enable-customer",
                                          "renew-intermediate"], metavar="COMMAND",
                         help="disable-device | enable-device | disable-customer | enable-customer | "
                              "renew-intermediate")
    command.add_argument("--customer", required=True, metavar="ID")
    command.add_argument("--device", metavar="ID", help="for disable-device / enable-device")
    command.add_argument("--reason", required=True, help="why (kept in the record and the audit log)")
    command.add_argument("--disable-devices", action="store_true",
                         help="disable-customer: also disable the customer's devices in IoT Hub")
    command.add_argument("--request-id", help="idempotency/ordering id (default: a new one)")
    command.add_argument("--base64", action="store_true", help="base64-encode the message (as Azure tools do)")
    command.set_defaults(run=Cli.send_command)

    batch = send.add_parser("batch", help="upload a device batch (CSV/JSONL) and follow it to its report")
    batch.add_argument("file", metavar="FILE")
    batch.add_argument("--customer", required=True, metavar="ID")
    batch.add_argument("--name", help="batch name (default: the file name); must end in .csv or .jsonl")
    batch.add_argument("--key-type", help="generated keys: ec-p256 (default), ec-p384, rsa-2048/3072/4096")
    batch.add_argument("--validity-days", type=int)
    batch.add_argument("--output", choices=["pfx", "pem"], help="generated keys: PFX (default) or encrypted PEM")
    batch.add_argument("--register", metavar="N|all", help="test-register the first N devices (or all) with DPS")
    batch.add_argument("--reissue", action="store_true", help="re-issue devices another batch provisioned")
    batch.add_argument("--request-id")
    batch.add_argument("--no-wait", action="store_true", help="upload and return")
    batch.add_argument("--functions-host", metavar="URL",
                       help="also POST the upload's BlobCreated event to this Functions host's blob webhook, as Event "
                            "Grid does on Azure (Core Tools: http://localhost:7071; Azurite raises no events)")
    batch.add_argument("--timeout", type=float, default=3600, metavar="SECONDS")
    batch.set_defaults(run=Cli.send_batch)

    batches = commands.add_parser("batch", help="device batches").add_subparsers(dest="sub", required=True,
                                                                                 metavar="SUBCOMMAND")
    batch_show = batches.add_parser("show", help="a batch's status and progress")
    batch_show.add_argument("customer")
    batch_show.add_argument("batch")
    batch_show.add_argument("--json", action="store_true")
    batch_show.set_defaults(run=Cli.batch_show)

    device = commands.add_parser("device", help="devices").add_subparsers(dest="sub", required=True,
                                                                            metavar="SUBCOMMAND")
    device_export = device.add_parser("export", help="what a factory line needs for one device")
    device_export.add_argument("customer")
    device_export.add_argument("device")
    device_export.add_argument("--out", required=True, metavar="DIR")
    device_export.add_argument("--include-key", action="store_true",
                               help="also device.pfx and device.key (decrypted with the batch password from Key Vault)")
    device_export.set_defaults(run=Cli.device_export)
    device_show = device.add_parser("show", help="a device's record: status, serial, notAfter, outputs, "
                                    "last command")
    device_show.add_argument("customer")
    device_show.add_argument("device")
    device_show.set_defaults(run=Cli.device_show)
    register = device.add_parser("register", help="register with DPS over HTTPS with the device certificate "
                                 "(mutual TLS), as a device does on first boot")
    register.add_argument("--cert", required=True, metavar="FILE", help="device certificate (PEM, may include chain)")
    register.add_argument("--key", required=True, metavar="FILE", help="device private key (PEM)")
    register.add_argument("--chain", metavar="FILE", help="intermediate(s) to send after the device certificate")
    register.add_argument("--id-scope", help="DPS id scope (default: the only one in DPS_INSTANCES)")
    register.add_argument("--registration-id", metavar="ID", help="default: the certificate's CN")
    register.add_argument("--endpoint", help="DPS device endpoint (default: DPS_DEVICE_ENDPOINT, else "
                          "global.azure-devices-provisioning.net)")
    register.add_argument("--timeout", type=float, default=60, metavar="SECONDS")
    register.set_defaults(run=Cli.device_register)

    sweep = commands.add_parser("sweep", help="the expiry sweep (the daily timer)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    sweep_run = sweep.add_parser("run", help="run the sweep now, here (idempotent per day)")
    sweep_run.add_argument("--now", metavar="DATE", help="pretend it is DATE (ISO) - for rehearsals")
    sweep_run.set_defaults(run=Cli.sweep_run)
    sweep_show = sweep.add_parser("show", help="a day's sweep report (default: today)")
    sweep_show.add_argument("date", nargs="?", metavar="DATE")
    sweep_show.set_defaults(run=Cli.sweep_show)

    audit = commands.add_parser("audit", help="the audit trail: every state change and issuance, oldest first")
    audit.add_argument("--customer", metavar="ID")
    audit.add_argument("--device", metavar="ID", help="one device's history (with the batch that issued it)")
    audit.add_argument("--since", metavar="DATE", help="ISO date, or 'today'")
    audit.add_argument("--json", action="store_true", help="one JSON event per line")
    audit.set_defaults(run=Cli.audit)

    local = commands.add_parser("local", help="the local stack: Azurite, Key Vault/DPS/IoT Hub emulators, devhost"
                                ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    local_up = local.add_parser("up", help="start the stack and write local.settings.json (Ctrl-C stops it)")
    local_up.add_argument("--detach", action="store_true", help="return once everything is ready")
    local_up.add_argument("--dps-instances", type=int, default=2, choices=range(1, 11), metavar="N",
                          help="emulated DPS instances in the pool (1-10, default 2)")
    local_up.add_argument("--no-functions", action="store_true", help="do not run function_app under devhost")
    local_up.add_argument("--azure-quotas", action="store_true",
                          help="throttle like Azure's default quotas (DPS 1,000 registrations/min, IoT Hub S1 100 "
                               "registry operations/min, Key Vault 4,000 signs/10 s)")
    local_up.set_defaults(run=Cli.local)
    local.add_parser("down", help="stop a detached stack").set_defaults(run=Cli.local)
    local.add_parser("status", help="where the running stack is").set_defaults(run=Cli.local)
    local_env = local.add_parser("env", help="shell lines to act as a person of the local tenant: "
                                             'eval "$(pkictl local env pki-operator)"')
    local_env.add_argument("principal", choices=["pki-operator", "pki-admin", "pki-app"])
    local_env.set_defaults(run=Cli.local)

    demo = commands.add_parser("demo", help="run the main job on a throwaway local stack (Azurite)")
    demo.set_defaults(run=Cli.demo)
    return parser


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         out: TextIO | None = None, err: TextIO | None = None, wire: Callable | None = None) -> int:
    """Run one command; errors are printed as one line each, never as a traceback."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage already
        return int(exc.code or 0)
    if env is None:
        from .wiring import default_env
        try:
            env = default_env()
        except SettingsError as exc:
            print(f"error: {exc}", file=err)
            return USAGE
    cli = Cli(env, out, wire)
    try:
        return args.run(cli, args)
    except (UsageError, SettingsError, PkiError, InvalidMessage, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return USAGE
    except (AlreadyExists, Conflict, NotFound, Problem) as exc:
        print(f"error: {exc}", file=err)
        return PROBLEM
    except NotPermitted as exc:
        print(f"error: {exc} (your identity lacks a role: see docs/deploy.md, roles of people)", file=err)
        return PROBLEM
    except TransientError as exc:
        print(f"error: temporarily unavailable, try again: {exc}", file=err)
        return PROBLEM
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130
    except Exception as exc:  # the CLI's last word; PKICTL_DEBUG=1 shows the traceback
        if env.get("PKICTL_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (set PKICTL_DEBUG=1 for details)", file=err)
        return PROBLEM
