"""``python -m devhost``: run a function app against Azurite (settings: environment over local.settings.json)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from .host import HOST_MESSAGE_LEASE_S, FunctionHost, HostConfig, HostError, load_app


def _worker_threads() -> int:
    configured = os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT", "").strip()
    return int(configured) if configured.isdigit() and int(configured) > 0 else min(32, (os.cpu_count() or 1) + 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devhost", description=__doc__)
    parser.add_argument("--script-root", type=Path, default=Path.cwd(),
                        help="folder with function_app.py, host.json and local.settings.json (default: .)")
    parser.add_argument("--concurrency", type=int, default=_worker_threads(),
                        help="the Python worker's thread pool: sync invocations running at once (default: "
                             "PYTHON_THREADPOOL_THREAD_COUNT, else min(32, cores + 4))")
    parser.add_argument("--message-lease", type=float, default=HOST_MESSAGE_LEASE_S, metavar="SECONDS",
                        help="queue message visibility while a function runs, renewed at half (default 600, the "
                             "host's 10 minutes; tests shorten it to see redelivery after a crash sooner)")
    parser.add_argument("--event-grid", choices=["poll", "webhook"], default="poll",
                        help="Event Grid blob triggers: poll = devhost turns new blobs into BlobCreated events "
                             "(Azurite has no Event Grid); webhook = only events posted to --webhook-port fire")
    parser.add_argument("--webhook-port", type=int, metavar="PORT",
                        help="the host's HTTP port on 127.0.0.1: HTTP triggers (/api/ROUTE, function key "
                             "DEVHOST_FUNCTION_KEY) and the blob webhook (/runtime/webhooks/blobs)")
    parser.add_argument("--ready-file", type=Path, metavar="FILE",
                        help="write this file once the Event Grid subscriptions exist and the webhook listens")
    parser.add_argument("--fire", metavar="NAME", help="run this timer function once and exit")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS",
                        help="exit once nothing has run for this long (default: run until stopped)")
    parser.add_argument("--host-json", type=Path, metavar="FILE",
                        help="read host settings from this file instead of SCRIPT_ROOT/host.json")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)

    root = args.script_root.resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from settings import SettingsError, environment, host_json

    try:
        env = environment(root / "local.settings.json")
        os.environ.update(env)  # what the Functions host does with app settings
        host_settings = host_json(args.host_json or root / "host.json", env)
        # The host id names the host's queues and blobs in storage; Azure derives it from the app's name, or takes
        # AzureFunctionsWebHost__hostid (learn.microsoft.com/azure/azure-functions/storage-considerations
        # #host-id-considerations: lowercase letters, digits and dashes, at most 32 characters).
        host_id = env.get("AzureFunctionsWebHost__hostid", "devhost")
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?", host_id):
            raise HostError(f"AzureFunctionsWebHost__hostid: {host_id!r} is not 1-32 lowercase letters, digits "
                            "and dashes")
        host = FunctionHost(load_app(root), env, host_config=HostConfig.from_host_json(host_settings),
                            concurrency=args.concurrency, message_lease_s=args.message_lease,
                            event_grid=args.event_grid, host_id=host_id)
    except (HostError, SettingsError, ValueError) as exc:
        print(f"devhost: {exc}", file=sys.stderr)
        return 2
    if args.fire:
        try:
            host.fire(args.fire)
        except HostError as exc:
            print(f"devhost: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - the function's own error, after its retries (logged by the host)
            print(f"devhost: {args.fire} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            host.close()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host.subscribe()
    if args.webhook_port is not None:
        from .webhook import serve

        server = serve(host, args.webhook_port)
        logging.getLogger("devhost").info("HTTP triggers on http://127.0.0.1:%d/api/, blob webhook on "
                                          "/runtime/webhooks/blobs", server.server_address[1])
    if args.ready_file:
        args.ready_file.write_text("ready\n")
    names = ", ".join(f"{f.name} ({f.trigger['type']})" for f in host.functions.values()) or "no functions"
    logging.getLogger("devhost").info("devhost running %s from %s", names, root)
    host.run(stop, until_idle=args.until_idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
