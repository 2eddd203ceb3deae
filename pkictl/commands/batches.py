"""``pkictl batch show``: a device batch's status and progress."""

from __future__ import annotations

import argparse
import json

from handlers.errors import NotFound

from ..common import OK, Cli, batch_line, command_group


def register(commands) -> None:
    batches = command_group(commands, "batch", "device batches")
    show = batches.add_parser("show", help="a batch's status and progress")
    show.add_argument("customer")
    show.add_argument("batch")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=batch_show)


def batch_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.records import BatchRef

    doc = cli.services.store.get(BatchRef(args.customer, args.batch).document)
    if doc is None:
        raise NotFound(f"no batch {args.batch!r} for customer {args.customer!r}")
    data = doc.data
    if args.json:
        cli.say(json.dumps({k: v for k, v in data.items() if k not in ("chunks", "lease")}, indent=2))
        return OK
    cli.say(batch_line(data))
    if data.get("report"):
        cli.say(f"report: {data['report']['json']} and {data['report']['csv']}")
    if data.get("pfxSecret"):
        cli.say(f"PFX/key password: Key Vault secret {data['pfxSecret']['name']} "
                f"(version {data['pfxSecret']['version']})")
    return OK
