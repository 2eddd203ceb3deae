"""``pkictl send onboarding|command|batch``: messages and device batches for the service."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from handlers.command_message import COMMANDS
from handlers.errors import AlreadyExists
from handlers.onboarding import ALLOCATION_POLICIES

from ..common import OK, PROBLEM, Cli, Problem, UsageError, batch_line, command_group
from .batches import batch_show


def register(commands) -> None:
    send = command_group(commands, "send", "enqueue a message for the service")
    onboarding = send.add_parser("onboarding", help="a 'new customer' message on customer-onboarding")
    onboarding.add_argument("--customer", required=True, metavar="ID", help="customerId (a-z, 0-9, '-')")
    onboarding.add_argument("--display-name", help="organization name for the intermediate's O")
    onboarding.add_argument("--country", help="ISO 3166 alpha-2 code for the intermediate's C")
    onboarding.add_argument("--iot-hub", action="append", metavar="HOST", help="IoT hub host name; repeatable")
    onboarding.add_argument("--allocation-policy", choices=ALLOCATION_POLICIES)
    onboarding.add_argument("--iot-edge", action="store_true", help="devices are IoT Edge devices")
    onboarding.add_argument("--request-id", help="correlation id, echoed in logs and state")
    onboarding.add_argument("--base64", action="store_true", help="base64-encode the message (as Azure tools do)")
    onboarding.set_defaults(run=send_onboarding)

    command = send.add_parser("command", help="an operator command on pki-commands")
    command.add_argument("kind", choices=COMMANDS, metavar="COMMAND", help=" | ".join(COMMANDS))
    command.add_argument("--customer", required=True, metavar="ID")
    command.add_argument("--device", metavar="ID", help="for disable-device / enable-device")
    command.add_argument("--reason", required=True, help="why (kept in the record and the audit log)")
    command.add_argument("--disable-devices", action="store_true",
                         help="disable-customer: also disable the customer's devices in IoT Hub")
    command.add_argument("--request-id", help="idempotency/ordering id (default: a new one)")
    command.add_argument("--base64", action="store_true", help="base64-encode the message (as Azure tools do)")
    command.set_defaults(run=send_command)

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
    batch.set_defaults(run=send_batch)


def send_onboarding(cli: Cli, args: argparse.Namespace) -> int:
    import base64

    from handlers.onboarding import QUEUE, OnboardingRequest

    message = {"customerId": args.customer, "displayName": args.display_name, "country": args.country,
               "iotHubs": args.iot_hub, "allocationPolicy": args.allocation_policy,
               "iotEdge": args.iot_edge or None, "requestId": args.request_id}
    text = json.dumps({k: v for k, v in message.items() if v is not None})
    OnboardingRequest.parse(text)  # refuse here what the service would reject
    if args.base64:
        text = base64.b64encode(text.encode()).decode()
    message_id = cli.services.queue.send_text(QUEUE, text)
    cli.say(f"sent to {QUEUE} (message {message_id}); follow it with `pkictl customer show {args.customer}`")
    return OK


def send_command(cli: Cli, args: argparse.Namespace) -> int:
    import base64
    import uuid

    from handlers.command_message import QUEUE, Command

    message = {"command": args.kind, "customerId": args.customer, "deviceId": args.device,
               "reason": args.reason, "requestId": args.request_id or f"cli-{uuid.uuid4()}",
               "disableDevices": True if args.disable_devices else None}
    text = json.dumps({k: v for k, v in message.items() if v is not None})
    Command.parse(text)  # refuse here what the service would reject
    if args.base64:
        text = base64.b64encode(text.encode()).decode()
    message_id = cli.services.queue.send_text(QUEUE, text)
    follow = f"--device {args.device} " if args.device else ""
    cli.say(f"sent {args.kind} to {QUEUE} (message {message_id}, requestId {message['requestId']}); follow it "
            f"with `pkictl audit --customer {args.customer} {follow}--since today`")
    return OK


def send_batch(cli: Cli, args: argparse.Namespace) -> int:
    import time

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
    settings = cli.services.batches
    ref = BatchRef.checked(args.customer, name)  # what intake would refuse
    try:
        with open(path, "rb") as stream:  # streamed, not read into memory
            cli.services.files.create(ref.input_path(settings), stream, metadata)
    except AlreadyExists:
        raise UsageError(f"batch name {name!r} is used already for {args.customer}; pass --name NEW") from None
    cli.say(f"uploaded {ref.input_path(settings)} ({size} bytes)")
    if args.functions_host:
        _announce_upload(cli, ref.input_path(settings), args.functions_host)
    if args.no_wait:
        return OK
    # A progress bar redrawn in place on a terminal; elsewhere (a pipe, a log, CI) a plain line at most every 10 s
    terminal = cli.out.isatty()
    deadline, last, printed_at = time.monotonic() + args.timeout, "", 0.0
    while time.monotonic() < deadline:
        doc = cli.services.store.get(ref.document)
        if doc is not None:
            line = batch_line(doc.data, bar=terminal)
            finished = doc.data["status"] in ("complete", "rejected")
            if terminal and line != last:
                cli.out.write("\r" + line)
                cli.out.flush()
                last = line
            elif not terminal and line != last and not finished and time.monotonic() - printed_at >= 10:
                cli.say(line)
                printed_at, last = time.monotonic(), line  # a held-back line is printed at the next chance
            elif not terminal and finished and doc.data["status"] == "rejected":
                cli.say(line)  # (a complete batch is summed up by batch show below)
            if finished:
                if terminal:
                    cli.say("")
                return batch_show(cli, argparse.Namespace(customer=args.customer, batch=name, json=False)) \
                    if doc.data["status"] == "complete" else PROBLEM
        time.sleep(0.5)
    cli.say(f"{chr(10) if terminal else ''}not finished within {args.timeout:.0f}s; "
            f"follow it with `pkictl batch show {args.customer} {name}`")
    return PROBLEM


def _announce_upload(cli: Cli, path: str, functions_host: str) -> None:
    """Be Event Grid for a local Functions host: POST the upload's BlobCreated event to its blob webhook."""
    from clients.event_grid import DeliveryFailed, deliver
    from clients.storage import ca_path

    event = cli.services.files.created_event(path)
    try:
        url = deliver(functions_host, "device_batch", [event], connection_verify=ca_path(cli.services.settings)
                      or True)
    except ValueError as exc:
        raise UsageError(f"--functions-host: {exc}") from None
    except DeliveryFailed as exc:
        raise Problem(f"the batch is uploaded, but the Functions host did not take its BlobCreated event: {exc}."
                      " Is `func start` running? The batch runs once the event is delivered (upload it again "
                      "under a new --name, or post the event yourself)") from None
    cli.say(f"BlobCreated event delivered to {url}")
