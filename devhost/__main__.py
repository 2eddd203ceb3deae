"""``python -m devhost``: run a function app against Azurite (settings: environment over local.settings.json)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .host import FunctionHost, HostConfig, HostError, load_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devhost", description=__doc__)
    parser.add_argument("--script-root", type=Path, default=Path.cwd(),
                        help="folder with function_app.py, host.json and local.settings.json (default: .)")
    parser.add_argument("--concurrency", type=int, default=4, help="invocations running at once (default 4)")
    parser.add_argument("--message-lease", type=float, default=60.0, metavar="SECONDS",
                        help="queue message visibility lease while a function runs, renewed (default 60)")
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
    from settings import SettingsError, environment

    try:
        env = environment(root / "local.settings.json")
        os.environ.update(env)  # what the Functions host does with app settings
        host_file = args.host_json or root / "host.json"
        host_json = json.loads(host_file.read_text()) if host_file.is_file() else {}
        host = FunctionHost(load_app(root), env, host_config=HostConfig.from_host_json(host_json),
                            concurrency=args.concurrency, message_lease_s=args.message_lease)
    except (HostError, SettingsError, ValueError) as exc:
        print(f"devhost: {exc}", file=sys.stderr)
        return 2
    if args.fire:
        try:
            host.fire(args.fire)
        except HostError as exc:
            print(f"devhost: {exc}", file=sys.stderr)
            return 2
        finally:
            host.close()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    names = ", ".join(f"{f.name} ({f.trigger['type']})" for f in host.functions.values()) or "no functions"
    logging.getLogger("devhost").info("devhost running %s from %s", names, root)
    host.run(stop, until_idle=args.until_idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
