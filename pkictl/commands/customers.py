"""``pkictl customer show|list``: customers' records."""

from __future__ import annotations

import argparse
import json

from handlers.errors import NotFound

from ..common import OK, PROBLEM, Cli, command_group


def register(commands) -> None:
    customer = command_group(commands, "customer", "customers")
    show = customer.add_parser("show", help="a customer's record (status, DPS placement, intermediate)")
    show.add_argument("id")
    shown = show.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the whole record, with the intermediate's PEM")
    shown.add_argument("--pem", action="store_true", help="the intermediate certificate only")
    show.set_defaults(run=customer_show)
    listing = customer.add_parser("list", help="every customer: id, status, DPS instance, intermediate notAfter")
    listing.add_argument("--json", action="store_true", help="one JSON object per customer, one per line")
    listing.set_defaults(run=customer_list)


def customer_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.records import customer_document

    doc = cli.services.store.get(customer_document(args.id))
    if doc is None:
        raise NotFound(f"no customer {args.id!r}; `pkictl customer list` shows them")
    record = {k: v for k, v in doc.data.items() if k != "lease"}
    if args.pem:
        cli.out.write(record.get("intermediate", {}).get("certificatePem", ""))
        return OK if record.get("intermediate") else PROBLEM
    if not args.json:
        for intermediate in [record.get("intermediate", {}), *record.get("previousIntermediates", [])]:
            intermediate.pop("certificatePem", None)
    cli.say(json.dumps(record, indent=2))
    return OK


def customer_list(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.records import CustomerRecord, customer_document, list_customers

    for customer_id in list_customers(cli.services.store):
        doc = cli.services.store.get(customer_document(customer_id))
        if doc is None:  # removed since it was listed
            continue
        record = CustomerRecord.from_json(doc.data)
        summary = {"customerId": customer_id, "status": record.status.value, "dps": record.dps.get("name"),
                   "intermediateNotAfter": (record.intermediate or {}).get("notAfter"),
                   "allocation": doc.data.get("allocation")}
        if args.json:
            cli.say(json.dumps(summary))
            continue
        cli.say(f"{customer_id:<40} {record.status.value:<20} {summary['dps'] or '-':<10} "
                f"{summary['intermediateNotAfter'] or '-'}")
    return OK
