"""``python -m bench batch --devices N [--kv-latency-ms L] [--kv-rate R] [--workers W] [--no-split]``,
``python -m bench compare --devices N``,
``python -m bench sweep [--devices N ...] [--expiring K]``, ``intake``, ``storage``.

Runs one device batch end to end on the local stack (Azurite + emulators + devhost workers running
function_app) and prints one JSON line: devices, wall seconds (upload to report), devices/s, worker CPU
seconds per device, worker peak RSS, and the ideal devices/s for the emulated Key Vault (its rate cap,
or the in-flight signs divided by its latency, whichever is lower).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, children included) and peak RSS in bytes of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def crypto_floor(samples: int = 200) -> float:
    """CPU seconds per device of the crypto alone, in this process: EC P-256 key generation, the certificate signed
    with a local EC key (no Key Vault, no HTTP), its PEM, and the PFX with 2,048 KDF rounds (``pki.export.pfx``)."""
    import secrets

    from pki import export, profiles
    from pki.keys import KeyType, generate_key

    now = dt.datetime.now(dt.UTC)
    ca_key = generate_key(KeyType.EC_P256)
    root = profiles.issue_root(key=ca_key, common_name="Floor Root", now=now, validity_days=3650)
    intermediate = profiles.issue_intermediate(issuer=root, issuer_key=ca_key, public_key=ca_key.public_key(),
                                               customer_id="floor", now=now, validity_days=365).certificate
    password = secrets.token_urlsafe(24).encode()
    started = time.process_time()
    for i in range(samples):
        key = generate_key(KeyType.EC_P256)
        cert = profiles.issue_device(issuer=intermediate, issuer_key=ca_key, public_key=key.public_key(),
                                     device_id=f"floor-{i}", now=now, validity_days=365).certificate
        export.cert_pem(cert)
        export.pfx(key, cert, [intermediate, root], password, friendly_name=f"floor-{i}")
    return (time.process_time() - started) / samples


def request_floor(services, samples: int = 200) -> float:
    """CPU seconds per device of the three requests a device costs, one at a time through the app's own clients
    in this process: a Key Vault sign (the customer's key), an output blob of a PFX's size, and a record of a
    device record's size. What the Azure SDKs (azure-core, requests, TLS) cost before any of the pipeline's
    own work; the workers make the same requests."""
    import hashlib

    from handlers.records import CustomerRecord

    customer = CustomerRecord.from_json(services.store.get("customers/bench.json").data)
    sign = services.keys.signer(services.keys.get_key(customer.key_name))
    output, record = b"x" * 2600, {"deviceId": "floor", "certificatePem": "x" * 900, "other": "y" * 400}
    for i in range(5):  # warm: connections, tokens
        services.files.put(f"floor/warm-{i}.pfx", output)
    started = time.process_time()
    for i in range(samples):
        sign("ES256", hashlib.sha256(str(i).encode()).digest())
        services.files.put(f"floor/{i}.pfx", output)
        services.store.create(f"floor/{i}.json", record)
    return (time.process_time() - started) / samples


def _with_customer(env: dict[str, str]):
    """Services wired to ``env``, with a root CA and an active customer "bench"."""
    from edge.services import build_services
    from handlers.onboarding import OnboardingRequest, onboard_customer
    from handlers.root_ca import RootRequest, create_root
    from pki.keys import KeyType
    from settings import load_settings

    services = build_services(load_settings(env))
    now = dt.datetime.now(dt.UTC)
    create_root(RootRequest("root", KeyType.EC_P256, 20, "Bench Root"), store=services.store, keys=services.keys,
                now=now)
    onboard_customer(OnboardingRequest(customer_id="bench"), store=services.store, keys=services.keys,
                     groups=services.groups, audit=services.audit, settings=services.onboarding, now=now)
    return services


def _app_environment() -> dict[str, str]:
    """This machine's environment as a Functions instance would have it: without the proxy and CA-bundle variables
    a developer machine may set (the local stack is on loopback and its CA is passed explicitly), which would keep
    every HTTP session reading the environment per request (clients/storage.trust_environment)."""
    from clients.storage import ENVIRONMENT_SETTINGS

    dropped = set(ENVIRONMENT_SETTINGS) | {name.lower() for name in ENVIRONMENT_SETTINGS}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def batch(args: argparse.Namespace) -> dict:
    from devhost.stack import LocalStack, launch_devhost

    extra = {"BATCH_CHUNK_ROWS": str(args.chunk_rows), "BATCH_INFLIGHT": str(args.inflight),
             # every worker is configured with the vault's whole budget, as on Azure; they share it through storage
             "KEY_VAULT_SIGN_RATE_PER_S": str(int(args.kv_rate or 4000))}
    with tempfile.TemporaryDirectory(prefix="pki-bench-") as workdir, \
            LocalStack(Path(workdir), dps_instances=1, run_functions=False, extra_settings=extra,
                       azure_quotas=True) as stack:
        if args.kv_latency_ms or args.kv_rate:
            stack.emulators.faults("keyvault", latency_ms=args.kv_latency_ms, rate_per_s=args.kv_rate or None,
                                   window_s=args.kv_window_s, retry_after=False)  # "may come without" (DESIGN.md)
        env = stack.settings()
        services = _with_customer(env)
        workers = []
        for _ in range(args.workers):
            with open(Path(workdir) / f"worker-{len(workers)}.log", "wb") as log:
                workers.append(launch_devhost(["--script-root", str(REPO), "--concurrency", str(args.concurrency),
                                               "--log-level", "WARNING"], {**_app_environment(), **env}, stdout=log))
        rows = "".join(f"bench-{i:07d}\n" for i in range(args.devices))
        data = ("deviceId\n" + rows).encode()
        container = stack.azurite.blob_service().get_container_client("device-batches")
        container.create_container()
        started = time.monotonic()
        container.upload_blob("bench/batch.csv", data, metadata={"output": args.output})
        peaks = {w.pid: 0 for w in workers}
        seen: dict[str, float] = {}  # when the batch record was first seen issuing, issued a device, assembling
        while True:
            doc = services.store.get("batches/bench/batch.csv.json")
            if doc:
                done = sum((doc.data.get("counts") or {}).values())
                for phase, reached in (("issuing", doc.data["status"] != "validating"), ("first_device", done > 0),
                                       ("assembling", doc.data["status"] in ("assembling", "complete"))):
                    if reached:
                        seen.setdefault(phase, time.monotonic() - started)
            if doc and doc.data["status"] in ("complete", "rejected"):
                break
            for w in workers:
                if w.poll() is not None:
                    raise SystemExit(f"worker {w.pid} died; see {workdir}")
                peaks[w.pid] = max(peaks[w.pid], _proc_stats(w.pid)[1])
            time.sleep(0.5)
        wall = time.monotonic() - started
        stats = [_proc_stats(w.pid) for w in workers]
        for w in workers:
            w.terminate()
            w.wait(timeout=60)
        vault = stack.emulators.servers["keyvault"].gate  # what Key Vault saw, from its side
        kv = {"kv_peak_rate_10s": round(vault.peak_rate(10), 1), "kv_throttled": vault.stats["throttled"]}
        if args.kv_series:
            first, last = min(vault.admitted_by_second), max(vault.admitted_by_second)
            kv["kv_admitted_by_second"] = [vault.admitted_by_second.get(s, 0) for s in range(first, last + 1)]
        floor = crypto_floor()  # measured in the same run, on the same machine, with the workers stopped
        stack.emulators.faults("keyvault")  # no latency or cap for the requests' own cost
        requests_floor = request_floor(services)
        counts = doc.data["counts"]
        storage = doc.data.get("storage") or {}  # counted at the ports by the chunk runs (handlers/tally.py)
        inflight = args.workers * args.concurrency * args.inflight
        ideal = min(args.kv_rate or float("inf"), inflight * 1000 / args.kv_latency_ms if args.kv_latency_ms
                    else float("inf"))
        return {"benchmark": "batch", "devices": args.devices, "issued": counts.get("issued", 0),
                "failed": counts.get("failed", 0), "counts": counts, "status": doc.data["status"],
                "wall_s": round(wall, 2),
                "devices_per_s": round(args.devices / wall, 1),
                "worker_cpu_s_per_device": round(sum(s[0] for s in stats) / args.devices, 5),
                "crypto_floor_s_per_device": round(floor, 5),
                "cpu_to_floor": round(sum(s[0] for s in stats) / args.devices / floor, 2),
                "requests_floor_s_per_device": round(requests_floor, 5),
                "cpu_to_crypto_and_requests_floor": round(sum(s[0] for s in stats) / args.devices
                                                          / (floor + requests_floor), 2),
                "storage_writes_per_device": round(storage.get("writes", 0) / args.devices, 3),
                "storage_reads_per_device": round(storage.get("reads", 0) / args.devices, 3),
                "worker_peak_rss_mb": round(max(max(peaks.values()), max(s[1] for s in stats)) / 2 ** 20, 1),
                "ideal_devices_per_s": None if ideal == float("inf") else round(ideal, 1),
                "intake_s": round(seen.get("issuing", wall), 2),
                "first_chunk_done_s": round(seen.get("first_device", wall), 2),
                "report_s": round(wall - seen.get("assembling", wall), 2),
                **kv, "kv_latency_ms": args.kv_latency_ms, "kv_rate": args.kv_rate,
                "kv_window_s": args.kv_window_s, "workers": args.workers,
                "concurrency": args.concurrency, "inflight": args.inflight, "output": args.output}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def openssl_loop(devices: int) -> dict:
    """What users run today: a certGen.sh-style loop of openssl CLI calls per device (key, CSR, sign with a local CA
    key, PFX), EC P-256 like the project's default (certGen.sh itself makes RSA-4096 keys, which would be slower)."""
    import secrets

    with tempfile.TemporaryDirectory(prefix="pki-bench-openssl-") as folder:
        cwd = Path(folder)
        ext = cwd / "device.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=cwd)
        _openssl("req", "-new", "-x509", "-key", "ca.key", "-subj", "/CN=Bench CA", "-days", "365", "-out", "ca.pem",
                 cwd=cwd)
        password = f"pass:{secrets.token_urlsafe(24)}"
        started = time.monotonic()
        for i in range(devices):
            name = f"dev-{i:06d}"
            _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)
            _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=cwd)
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "365", "-sha256", "-extfile", str(ext), "-out", f"{name}.pem", cwd=cwd)
            _openssl("pkcs12", "-export", "-inkey", f"{name}.key", "-in", f"{name}.pem", "-certfile", "ca.pem",
                     "-passout", password, "-out", f"{name}.pfx", cwd=cwd)
        wall = time.monotonic() - started
    return {"devices": devices, "wall_s": round(wall, 2), "devices_per_s": round(devices / wall, 1)}


def compare(args: argparse.Namespace) -> dict:
    """The same N generated-key devices two ways in one run: the openssl loop, then the project's pipeline on the
    local stack (Key Vault at no latency)."""
    script = openssl_loop(args.devices)
    pipeline = batch(argparse.Namespace(devices=args.devices, kv_latency_ms=0.0, kv_rate=0.0, workers=2,
                                        concurrency=2, inflight=16, chunk_rows=500, output="pfx", kv_window_s=10.0,
                                        kv_series=False))
    return {"benchmark": "compare", "devices": args.devices, "openssl_devices_per_s": script["devices_per_s"],
            "openssl_wall_s": script["wall_s"], "pipeline_devices_per_s": pipeline["devices_per_s"],
            "pipeline_wall_s": pipeline["wall_s"],
            "ratio": round(pipeline["devices_per_s"] / script["devices_per_s"], 2),
            "pipeline_storage_writes_per_device": pipeline["storage_writes_per_device"]}


def intake(args: argparse.Namespace) -> dict:
    """Validate and fan out a batch of N rows in a child process; report the child's peak RSS."""
    import resource

    from devhost.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="pki-bench-") as workdir, \
            LocalStack(Path(workdir), dps_instances=1, run_functions=False) as stack:
        env = stack.settings()
        _with_customer(env)
        container = stack.azurite.blob_service().get_container_client("device-batches")
        container.create_container()
        container.upload_blob("bench/big.csv", ("deviceId\n" + "".join(
            f"bench-{i:07d}\n" for i in range(args.devices))).encode())
        started = time.monotonic()
        child = subprocess.run([sys.executable, "-m", "bench", "_intake", "device-batches/bench/big.csv"], cwd=REPO,
                               env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stdout + child.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"benchmark": "intake", "devices": args.devices, "outcome": child.stdout.strip(),
                "wall_s": round(time.monotonic() - started, 2), "peak_rss_mb": round(peak / 2 ** 20, 1)}


def storage(args: argparse.Namespace) -> dict:
    """Azurite's own upload rate as it fills: the ceiling for a batch, which writes 2 blobs per device."""
    from devhost.azurite import Azurite
    from emulators.tls import make_server_identity

    tags = {"kind": "device", "customer": "bench", "status": "issued", "notAfter": "20271129"}
    rates: dict[str, list[float]] = {"plain": [], "tagged": []}
    tls = make_server_identity()
    with tempfile.TemporaryDirectory(prefix="pki-bench-") as workdir:
        ca = Path(workdir) / "ca.pem"
        ca.write_bytes(tls.ca_pem)
        return _storage_rates(args, Azurite(tls, ca), ca, tags, rates)


def _storage_rates(args, azurite, ca, tags, rates) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from azure.storage.blob import BlobServiceClient

    from clients.storage import pooled_transport

    with azurite, ThreadPoolExecutor(8) as pool:  # HTTPS, as the app reaches it
        service = BlobServiceClient.from_connection_string(azurite.connection_string,
                                                           transport=pooled_transport(str(ca)))
        for kind in rates:
            container = service.get_container_client(kind)
            container.create_container()
            for step in range(4):
                started = time.monotonic()
                list(pool.map(lambda i, step=step, container=container, kind=kind: container.upload_blob(
                    f"{step}/{i}", b"x" * 1000, tags=tags if kind == "tagged" else None), range(args.blobs // 4)))
                rates[kind].append(round(args.blobs // 4 / (time.monotonic() - started)))
    per_device = 1 / (sum(rates["plain"]) / 4) + 1 / (sum(rates["tagged"]) / 4)  # an output and a tagged record
    return {"benchmark": "storage", "blobs_per_kind": args.blobs, "plain_uploads_per_s_by_quarter": rates["plain"],
            "tagged_uploads_per_s_by_quarter": rates["tagged"],
            "device_ceiling_per_s": round(1 / per_device, 1)}


def sweep(args: argparse.Namespace) -> dict:
    """Seed N device records (K of them expiring, over 5 customers) per fleet size and time one expiry sweep."""
    from concurrent.futures import ThreadPoolExecutor

    from devhost.stack import LocalStack
    from edge.services import build_services
    from handlers.expiry_sweep import run_sweep
    from handlers.records import device_document, device_tags
    from settings import load_settings

    now = dt.datetime.now(dt.UTC)
    results = []
    with tempfile.TemporaryDirectory(prefix="pki-bench-") as workdir, \
            LocalStack(Path(workdir), dps_instances=1, run_functions=False) as stack, ThreadPoolExecutor(16) as pool:
        for size in args.devices:
            env = {**stack.settings(), "STATE_CONTAINER": f"sweep-{size}"}
            services = build_services(load_settings(env))
            step = max(5, size // args.expiring)  # spread over the fleet and over the 5 customers
            expiring = {k * step + k % 5 for k in range(args.expiring)}

            def seed(i: int, services=services, expiring=expiring) -> None:
                days = 10 if i in expiring else 200 + i % 300
                record = {"customerId": f"customer-{i % 5}", "deviceId": f"dev-{i:07d}", "status": "issued",
                          "serial": f"{i:X}", "outputs": {},
                          "notAfter": (now + dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")}
                services.store.create(device_document(record["deviceId"]), record,
                                      tags=device_tags(record))

            seeded = time.monotonic()
            list(pool.map(seed, range(size)))
            seed_s = time.monotonic() - seeded
            probe = device_document("dev-0000001")
            timings = []
            for _ in range(20):  # what one storage request costs at this fleet size (Azurite slows as it fills)
                tick = time.monotonic()
                services.store.get(probe)
                timings.append(time.monotonic() - tick)
            counting = _CountingStore(services.store)
            started = time.monotonic()
            report = run_sweep(ports=dataclasses.replace(services.commands, store=counting), queue=services.queue,
                               settings=services.sweep, now=now)
            results.append({"devices": size, "seed_s": round(seed_s, 1),
                            "sweep_s": round(time.monotonic() - started, 2), "storage_calls": dict(counting.calls),
                            "storage_get_ms_median": round(sorted(timings)[10] * 1000, 2),
                            "found": report["devices"]["found"], "notices": len(report["notices"])})
    first, last = results[0], results[-1]
    return {"benchmark": "sweep", "expiring": args.expiring, "runs": results,
            "sweep_time_ratio_largest_to_smallest": round(last["sweep_s"] / first["sweep_s"], 2),
            "storage_calls_ratio": round(sum(last["storage_calls"].values()) / sum(first["storage_calls"].values()), 2),
            "storage_get_latency_ratio": round(last["storage_get_ms_median"] / first["storage_get_ms_median"], 2)}


class _CountingStore:
    """The DocumentStore port, counting calls by kind (a find counts once, however many names it yields)."""

    def __init__(self, store):
        self._store = store
        self.calls: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def get(self, name):
        self._count("get")
        return self._store.get(name)

    def create(self, name, data, *, tags=None):
        self._count("create")
        return self._store.create(name, data, tags=tags)

    def replace(self, current, data, *, tags=None):
        self._count("replace")
        return self._store.replace(current, data, tags=tags)

    def find(self, tag_filter):
        self._count("find")
        return self._store.find(tag_filter)


def _intake_child(path: str) -> None:
    from edge.services import build_services
    from handlers.batch_intake import intake_batch
    from settings import load_settings

    services = build_services(load_settings(os.environ))
    print(intake_batch(path, files=services.files, outputs=services.files, store=services.store, queue=_NoQueue(),
                       secrets_store=services.secrets, audit=services.audit, settings=services.batches,
                       now=dt.datetime.now(dt.UTC)))


class _NoQueue:
    """Chunk messages are counted, not sent: this measures the intake, not the queue."""

    def send(self, queue: str, message) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("batch", help="a device batch end to end")
    run.add_argument("--devices", type=int, default=1000)
    run.add_argument("--kv-latency-ms", type=float, default=0.0)
    run.add_argument("--kv-rate", type=float, default=0.0, help="emulated Key Vault sign cap per second (0: none)")
    run.add_argument("--kv-window-s", type=float, default=10.0,
                     help="what the Key Vault cap counts over: any 10 s (the default, as Key Vault documents its "
                          "limits), or 0 for 100 ms windows (a burst reading stricter than any documented)")
    run.add_argument("--kv-series", action="store_true", help="also print the signs Key Vault admitted each second")
    run.add_argument("--workers", type=int, default=2, help="devhost processes (Functions instances)")
    run.add_argument("--concurrency", type=int, default=2, help="invocations per worker")
    run.add_argument("--inflight", type=int, default=16, help="BATCH_INFLIGHT: signs in flight per chunk")
    run.add_argument("--chunk-rows", type=int, default=500)
    run.add_argument("--output", choices=["pfx", "pem"], default="pfx")
    run.add_argument("--no-split", action="store_true",
                     help="accepted for earlier commands: every worker now gets the vault's whole sign rate, as on "
                          "Azure, and the workers share it (clients/signers.py)")
    versus = commands.add_parser("compare", help="N devices by a certGen.sh-style openssl loop and by the pipeline")
    versus.add_argument("--devices", type=int, default=1000)
    memory = commands.add_parser("intake", help="peak memory of validating and fanning out a batch")
    memory.add_argument("--devices", type=int, default=100_000)
    ceiling = commands.add_parser("storage", help="Azurite's upload rate as it fills (a batch's ceiling here)")
    ceiling.add_argument("--blobs", type=int, default=10_000)
    expiry = commands.add_parser("sweep", help="expiry sweep time by fleet size, for the same expiring devices")
    expiry.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000], metavar="N",
                        help="fleet sizes, each seeded fresh (default: 10000 100000)")
    expiry.add_argument("--expiring", type=int, default=500, metavar="K")
    long_run = commands.add_parser("soak", help="the whole flow under faults with the worker killed twice; "
                                   "audits the end state")
    long_run.add_argument("--customers", type=int, default=10)
    long_run.add_argument("--devices", type=int, default=5000)
    child = commands.add_parser("_intake", help=argparse.SUPPRESS)
    child.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "_intake":
        _intake_child(args.path)
        return 0
    if args.command == "soak":
        from .soak import soak

        result = soak(args)
        print(json.dumps(result), flush=True)
        return 1 if any(result[k] for k in ("lost", "duplicated", "inconsistent", "leaks")) else 0
    run = {"batch": batch, "compare": compare, "intake": intake, "storage": storage, "sweep": sweep}[args.command]
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
