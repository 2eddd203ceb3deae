# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: `activate-global-python-argcomplete` completes the console script)
"""``python -m pkictl``: exit 0 on success, 1 when a problem was found, 2 on bad usage or bad input.

The commands are in pkictl/commands, one module per group, each with its parsers next to the functions they run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from handlers.errors import (
    AlreadyExists,
    Conflict,
    InvalidMessage,
    NoCredential,
    NotFound,
    NotPermitted,
    TransientError,
)
from pki import PkiError
from settings import SettingsError

from .commands import audit, batches, checks, customers, devices, root, send, stack, sweep
from .common import OK, PROBLEM, USAGE, Cli, Problem, UsageError, default_env

__all__ = ["OK", "PROBLEM", "USAGE", "Cli", "Problem", "UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkictl", description="Operate the IoT X.509 PKI (Azure IoT DPS).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (root, checks, customers, send, batches, devices, sweep, audit, stack):
        group.register(commands)
    demo_parser = commands.add_parser("demo", help="run the main job on a throwaway local stack (Azurite)")
    demo_parser.set_defaults(run=demo)
    return parser


def demo(cli: Cli, args: argparse.Namespace) -> int:
    """Here, not in pkictl/commands: the demo runs ``main`` (which pkictl.demo is given: it imports no CLI)."""
    from .demo import run_demo

    return run_demo(cli.out, main)


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         out: TextIO | None = None, err: TextIO | None = None, connect: Callable | None = None) -> int:
    """Run one command; errors are printed as one line each, never as a traceback."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    if argv is None:  # a shell asking for completions (`eval "$(register-python-argcomplete pkictl)"`): answer, exit
        import argcomplete

        argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage already
        return int(exc.code or 0)
    if env is None:
        try:
            env = default_env()
        except SettingsError as exc:
            print(f"error: {exc}", file=err)
            return USAGE
    # azure-identity logs every credential of its chain it tried, as warnings; the CLI says it in one line instead
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
    cli = Cli(env, out, connect)
    try:
        return args.run(cli, args)
    except (UsageError, SettingsError, PkiError, InvalidMessage, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return USAGE
    except (AlreadyExists, Conflict, NotFound, Problem) as exc:
        print(f"error: {exc}", file=err)
        return PROBLEM
    except NoCredential as exc:
        print(f"error: {exc.what}: no Azure credential could sign in. People: run `az login`. The app's identity: "
              "check AZURE_CLIENT_ID and AzureWebJobsStorage__clientId (its client id) and IDENTITY_ENDPOINT (set on "
              "Azure; `pkictl local up` writes the local one to local.settings.json)", file=err)
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
