"""``pkictl local up|down|status|env``: the local stack (its workings are pkictl/local.py)."""

from __future__ import annotations

import argparse

from ..common import Cli, UsageError, command_group


def register(commands) -> None:
    local = command_group(commands, "local", "the local stack: Azurite, Key Vault/DPS/IoT Hub emulators, devhost")
    up = local.add_parser("up", help="start the stack and write local.settings.json (Ctrl-C stops it)")
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    up.add_argument("--dps-instances", type=int, default=2, choices=range(1, 11), metavar="N",
                    help="emulated DPS instances in the pool (1-10, default 2)")
    up.add_argument("--no-functions", action="store_true", help="do not run function_app under devhost")
    up.add_argument("--azure-quotas", action="store_true",
                    help="throttle like Azure's default quotas (DPS 1,000 registrations/min, IoT Hub S1 100 "
                         "registry operations/min, Key Vault 4,000 signs/10 s)")
    up.add_argument("--telemetry", metavar="console|file:PATH",
                    help="export the app's OpenTelemetry metrics and logs (PKI_TELEMETRY_EXPORT): to devhost's log "
                         "(console) or appended to a file, one JSON object per line")
    up.set_defaults(run=stack)
    local.add_parser("down", help="stop a detached stack").set_defaults(run=stack)
    local.add_parser("status", help="where the running stack is").set_defaults(run=stack)
    env = local.add_parser("env", help="shell lines to act as a person of the local tenant: "
                                       'eval "$(pkictl local env pki-operator)"')
    # the local tenant's people (emulators.stack's OPERATOR, ADMIN, APP; not imported: it would load the emulators
    # for every command)
    env.add_argument("principal", choices=["pki-operator", "pki-admin", "pki-app"])
    env.set_defaults(run=stack)


def stack(cli: Cli, args: argparse.Namespace) -> int:
    from .. import local

    if args.sub == "up":
        if args.telemetry and args.telemetry != "console" and not args.telemetry.startswith("file:"):
            raise UsageError(f"--telemetry: {args.telemetry!r} is not console or file:PATH")
        return local.up(detach=args.detach, dps_instances=args.dps_instances, functions=not args.no_functions,
                        out=cli.out, azure_quotas=args.azure_quotas, telemetry=args.telemetry)
    if args.sub == "down":
        return local.down(cli.out)
    if args.sub == "env":
        return local.env(args.principal, cli.out)
    return local.status(cli.out)
