"""What pkictl's command modules share: exit codes, the two errors, the ``Cli`` context and small helpers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

OK, PROBLEM, USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input given on the command line (a file that cannot be read, a bad date)."""


class Problem(Exception):
    """The command could not do what was asked, for a reason outside the command line (the message says which)."""


class Cli:
    """What a command runs with: ``env`` is the settings source; ``services`` the clients, from the composition root
    the function app uses too (``edge.services``), built when a command first needs them."""

    def __init__(self, env: Mapping[str, str], out: TextIO, connect: Callable | None = None):
        self.env = env
        self.out = out
        self._connect = connect or connect_to
        self._services = None

    @property
    def services(self):
        if self._services is None:
            self._services = self._connect(self.env)
        return self._services

    def say(self, text: str = "") -> None:
        print(text, file=self.out)


def connect_to(env: Mapping[str, str]):
    """The services for the settings in ``env``, once a token shows that this shell can sign in at all."""
    from edge.services import build_services
    from settings import load_settings

    settings = load_settings(env)
    _signed_in(settings)
    return build_services(settings)


def _signed_in(settings) -> None:
    """One storage token before anything else. Without any credential (no `az login`, no managed identity) the
    storage client would retry its token failure with backoff for a minute and more before saying so; this says
    it at once (``NoCredential``: one line, the settings to check)."""
    if settings.storage.connection_string:
        return
    from clients.errors import translated
    from clients.identity import app_credential, storage_credential

    # no credential: NoCredential (one line); an identity endpoint that does not answer (a local stack that is not
    # running): TransientError naming it
    with translated(f"storage {settings.storage.blob_service_uri}"):
        storage_credential(settings.storage, app_credential(settings)).get_token("https://storage.azure.com/.default")


def default_env() -> dict[str, str]:
    """The environment over local.settings.json Values; the Values are exported into this process's environment,
    as Core Tools does for the worker, so that azure-identity finds the local stack's identity endpoint."""
    import os

    from settings import environment

    values = environment(environ=os.environ)
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return values


def now(value: str | None) -> dt.datetime:
    """The date or time given on the command line (ISO 8601, UTC unless it says otherwise), else now."""
    if not value:
        return dt.datetime.now(dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--now: {value!r} is not an ISO date such as 2027-01-31 or 2027-01-31T12:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def read(path: str, option: str) -> bytes:
    """The bytes of the file ``path`` given with ``option``."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None


def batch_line(data: dict, bar: bool = False) -> str:
    """One line on a batch record: its status and progress (with a progress bar when ``bar``)."""
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


def command_group(commands, name: str, summary: str):
    """A command group (``pkictl NAME SUBCOMMAND``): its subcommands' parsers are added to what this returns."""
    return commands.add_parser(name, help=summary).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")

