"""``pkictl sweep run|show``: the expiry sweep (the daily timer), run here or its report read."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from handlers.errors import NotFound

from ..common import OK, Cli, command_group, now


def register(commands) -> None:
    sweep = command_group(commands, "sweep", "the expiry sweep (the daily timer)")
    run = sweep.add_parser("run", help="run the sweep now, here (idempotent per day)")
    run.add_argument("--now", metavar="DATE", help="pretend it is DATE (ISO) - for rehearsals")
    run.set_defaults(run=sweep_run)
    show = sweep.add_parser("show", help="a day's sweep report (default: today)")
    show.add_argument("date", nargs="?", metavar="DATE")
    show.add_argument("--json", action="store_true", help="the whole report as JSON")
    show.set_defaults(run=sweep_show)


def sweep_run(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.expiry_sweep import SweepIncomplete, run_sweep

    services = cli.services
    try:
        report = run_sweep(ports=services.commands, queue=services.queue, settings=services.sweep,
                           now=now(args.now))
    except SweepIncomplete as exc:
        _sweep_summary(cli, exc.report)
        raise
    _sweep_summary(cli, report)
    return OK


def _sweep_summary(cli: Cli, report: dict) -> None:
    counts = report["counts"]
    cli.say(f"expiry sweep {report['date']} (now {report['now']}): "
            f"{counts['intermediatesRenewed']} intermediate(s) "
            f"renewed, {counts['secondariesRemoved']} expired secondary removed, {counts['devicesExpiring']} "
            f"device(s) expiring within {report['settings']['notice_before_days']} days, "
            f"{counts['devicesMarkedExpired']} marked expired, {len(report['notices'])} notice(s) today")
    for item in report["intermediates"]["renewed"]:
        cli.say(f"  renewed {item['customerId']}: serial {item['previousSerial']} -> {item['serial']} "
                f"(notAfter {item['notAfter']}); the old one stays the group's secondary")
    for notice in report["notices"]:
        cli.say(f"  notice {notice['noticeId']}: {notice['devices']} device(s), {notice['status']} "
                "(queue certificate-expiry-notices)")
    for warning in report["warnings"]:
        cli.say(f"  WARNING: {warning}")
    cli.say(f"report: {report_path(report['date'])} (`pkictl sweep show {report['date']}`)")


def report_path(day: str) -> str:
    """Where the sweep report of ``day`` (ISO date) is kept."""
    from handlers.expiry_sweep import report_document

    return f"{report_document(dt.date.fromisoformat(day))} (state container)"


def sweep_show(cli: Cli, args: argparse.Namespace) -> int:
    from handlers.expiry_sweep import report_document

    day = now(args.date).date() if args.date else dt.datetime.now(dt.UTC).date()
    doc = cli.services.store.get(report_document(day))
    if doc is None:
        raise NotFound(f"no expiry sweep report for {day}; `pkictl sweep run` makes one")
    if args.json:
        cli.say(json.dumps(doc.data, indent=2))
    else:
        _sweep_summary(cli, doc.data)
    return OK
