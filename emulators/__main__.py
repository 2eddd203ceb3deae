"""``python -m emulators``: serve Key Vault, DPS and IoT Hub emulators until stopped.

Writes ``emulators-ca.pem`` (trust it) and ``emulators.json`` (endpoints, id scopes, the managed identity
endpoint and the local identities' client ids, and the emulators' owner SAS connection strings - local secrets,
keep the state folder private) to ``--state-dir``. A client gets tokens with ``IDENTITY_ENDPOINT`` /
``IDENTITY_HEADER`` set to its ``identityEndpoint`` / ``identityHeader`` and a local identity's client id.
Faults can be set at start (``--faults keyvault='{"rate_per_s": 100}'``) and at run time with
``PUT {service url}/_emulator/faults`` (same JSON); ``GET .../_emulator/stats`` counts what was injected.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .core import Faults
from .stack import EmulatorStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emulators", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path(".pki-local/emulators"))
    parser.add_argument("--dps-instances", type=int, default=2)
    parser.add_argument("--max-groups", type=int, default=100, help="enrollment groups per DPS instance")
    parser.add_argument("--azure-quotas", action="store_true", help="rate caps at Azure's documented default quotas")
    parser.add_argument("--faults", action="append", default=[], metavar="SERVICE=JSON",
                        help="e.g. keyvault='{\"rate_per_s\": 100, \"retry_after\": false}'; repeatable")
    args = parser.parse_args(argv)
    faults = {}
    for item in args.faults:
        service, _, raw = item.partition("=")
        try:
            faults[service] = Faults.from_dict(json.loads(raw))
        except (ValueError, TypeError) as exc:
            parser.error(f"--faults {item}: {exc}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmulatorStack(args.state_dir, dps_instances=args.dps_instances, max_groups_per_dps=args.max_groups) as stack:
        if args.azure_quotas:
            stack.azure_quotas()
        for service, fault in faults.items():
            if service not in stack.servers:
                parser.error(f"--faults: no service {service!r}; services: {', '.join(stack.servers)}")
            stack.servers[service].gate.faults = fault
        print(f"emulators up; endpoints in {args.state_dir / 'emulators.json'}, CA {stack.ca_path}", flush=True)
        for name, server in stack.servers.items():
            print(f"  {name:<11} {server.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
