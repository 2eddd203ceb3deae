"""``pkictl audit``: the audit trail, oldest first."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from ..common import OK, Cli, now


def register(commands) -> None:
    parser = commands.add_parser("audit", help="the audit trail: every state change and issuance, oldest first")
    parser.add_argument("--customer", metavar="ID")
    parser.add_argument("--device", metavar="ID", help="one device's history (with the batch that issued it)")
    parser.add_argument("--since", metavar="DATE", help="ISO date, or 'today'")
    parser.add_argument("--json", action="store_true", help="one JSON event per line")
    parser.set_defaults(run=audit)


def audit(cli: Cli, args: argparse.Namespace) -> int:
    since = None
    if args.since:
        since = dt.datetime.now(dt.UTC).date() if args.since == "today" else now(args.since).date()
    count = 0
    for event in cli.services.audit.query(customer=args.customer, device=args.device, since=since):
        count += 1
        if args.json:
            cli.say(json.dumps(event))
            continue
        subject = "/".join(v for v in (event.get("customer"), event.get("device")) if v) or "-"
        change = f"{event.get('before')} -> {event.get('after')}" if "before" in event else ""
        if event.get("action") == "batch.issue":
            change = f"batch {event.get('batch')} chunk {event.get('chunk')}: {len(event.get('issued', []))} issued"
        detail = event.get("why") or event.get("reason") or ""
        cli.say(f"{event.get('recordedAt', event.get('at'))}  {event.get('action', '?'):<20} "
                f"{event.get('effect', '?'):<8} {subject:<32} {change} {detail}".rstrip()
                + (f" (requestId {event['requestId']})" if event.get("requestId") else ""))
    if not count:
        cli.say("no audit events match")
    return OK
