"""``python -m bench soak [--customers 10] [--devices 5000]``: the whole flow under faults, with the worker
killed and restarted twice, then an audit of the end state. Prints one JSON line of counts; exits 1 when
anything was lost, duplicated, inconsistent or leaked.

Flow: onboarding messages (plus malformed ones and a duplicate) -> one device batch per customer (plus a
rejected one) -> operator commands (each sent twice with one requestId, plus malformed ones), with Key
Vault throttled (429, some without Retry-After) and slow, DPS and IoT Hub answering 503s and slow, and the
devhost worker SIGKILLed twice while batches are being issued.

Checks: every device has exactly one recorded certificate and it is the one in its output files, each
appears in the audit log as issued at most once and is recorded (issued + already issued = rows);
every input is applied, recorded as rejected, or in a poison queue with its recorded reason; every
command has one audit event of effect per requestId and the records agree with the audit log; no
private key or secret in any blob or log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parent.parent


class _Worker:
    def __init__(self, workdir: Path, env: dict[str, str], host_json: Path):
        self.workdir, self.env, self.host_json = workdir, env, host_json
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        from devhost.stack import launch_devhost

        with open(self.workdir / f"worker-{self.starts}.log", "wb") as log:
            self.process = launch_devhost(["--script-root", str(REPO), "--host-json", str(self.host_json),
                                           "--concurrency", "4", "--message-lease", "20", "--log-level", "WARNING"],
                                          {**os.environ, **self.env}, stdout=log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise SystemExit(f"soak: timed out waiting for {what}")


def soak(args) -> dict:

    from clients.audit import StoreAuditLog
    from devhost.leaks import find_leaks
    from devhost.stack import LocalStack
    from edge.services import build_services
    from handlers.root_ca import RootRequest, create_root
    from pki.keys import KeyType
    from settings import load_settings

    started = time.monotonic()
    customers = [f"soak-{i:02d}" for i in range(args.customers)]
    per_customer = args.devices // args.customers
    extra = {"BATCH_CHUNK_LEASE_SECONDS": "15", "BATCH_CHUNK_ROWS": "100", "KEY_VAULT_SIGN_RATE_PER_S": "150",
             "IOT_HUB_REGISTRY_OPS_PER_MIN": "600"}
    with tempfile.TemporaryDirectory(prefix="pki-soak-") as folder, \
            LocalStack(Path(folder), dps_instances=2, run_functions=False, extra_settings=extra) as stack:
        workdir = Path(folder)
        env = stack.settings()
        services = build_services(load_settings(env))
        store, files = services.store, services.files
        # the root ceremony is the PKI administrator's: the app may only read and sign with the root key
        from clients.factory import key_store
        from emulators.stack import ADMIN

        create_root(RootRequest("pki-root-ca", KeyType.EC_P384, 20, "Soak Root"), store=store,
                    keys=key_store(load_settings(stack.settings_as(ADMIN))), now=dt.datetime.now(dt.UTC))
        emulators = stack.emulators
        emulators.faults("keyvault", latency_ms=15, rate_per_s=200, retry_after=False)
        for dps in emulators.dps:
            emulators.faults(dps.name, latency_ms=20, error_503_fraction=0.15)
        emulators.faults("iothub", latency_ms=10, error_503_fraction=0.15)
        host_json = workdir / "host.json"
        host_json.write_text(json.dumps({"version": "2.0", "extensions": {"queues": {
            "messageEncoding": "none", "maxDequeueCount": 8, "visibilityTimeout": "00:00:02"}}}))
        worker = _Worker(workdir, env, host_json)
        worker.start()
        azurite = stack.azurite  # the harness injects input with the account key; the app uses its identity

        def send(queue: str, text: str) -> None:
            azurite.queue_client(queue).send_message(text)

        try:
            # 1. onboarding: every customer, one duplicate, two malformed
            inputs = Counter()
            for customer in customers:
                send("customer-onboarding", json.dumps({"customerId": customer, "requestId": f"erp-{customer}"}))
                inputs["onboarding"] += 1
            send("customer-onboarding", json.dumps({"customerId": customers[0], "requestId": "erp-dup"}))
            send("customer-onboarding", '{"customerId": "Bad Customer"}')
            send("customer-onboarding", "not json at all")
            inputs["onboarding_duplicate"], inputs["onboarding_malformed"] = 1, 2
            _wait(lambda: all((store.get(f"customers/{c}.json") or _Doc()).data.get("status") == "active"
                              for c in customers), 600, "onboarding")

            # 2. batches, one per customer, plus one rejected; the worker is killed twice while they issue
            container = azurite.blob_service().get_container_client("device-batches")
            try:
                container.create_container()
            except Exception:  # noqa: BLE001, S110 - it exists already
                pass
            for customer in customers:
                rows = "".join(f"{customer}-d{i:05d}\n" for i in range(per_customer))
                container.upload_blob(f"{customer}/soak.csv", ("deviceId\n" + rows).encode(),
                                      metadata={"output": "pem"})
            container.upload_blob(f"{customers[0]}/broken.csv", b"serial,colour\n1,red\n")

            def issued() -> int:  # devices recorded so far (chunks report only when they finish)
                return sum(1 for _ in store.find("\"kind\" = 'device'"))

            kills = []
            for fraction in (0.3, 0.6):
                _wait(lambda f=fraction: issued() >= f * per_customer * len(customers), 1800, f"{fraction:.0%} issued")
                worker.kill()
                kills.append(issued())
                time.sleep(2)
                worker.start()
            _wait(lambda: all((store.get(f"batches/{c}/soak.csv.json") or _Doc()).data.get("status") == "complete"
                              for c in customers), 1800, "every batch complete")

            # 3. operator commands, each sent twice with one requestId, and malformed ones
            commands = [
                {"command": "disable-device", "customerId": customers[0], "deviceId": f"{customers[0]}-d00001"},
                {"command": "disable-device", "customerId": customers[0], "deviceId": f"{customers[0]}-d00002"},
                {"command": "disable-customer", "customerId": customers[-1], "disableDevices": True},
                {"command": "renew-intermediate", "customerId": customers[1]},
            ]
            for n, command in enumerate(commands):
                message = json.dumps({**command, "reason": "soak", "requestId": f"soak-cmd-{n}"})
                send("pki-commands", message)
                send("pki-commands", message)
            for bad in ('{"command": "disable-device"}', '{"command": "explode", "customerId": "x", "reason": "r"}',
                        ('{"command": "enable-device", "customerId": "soak-00", "deviceId": "nope-never", '
                         '"reason": "r"}')):
                send("pki-commands", bad)
            audit = StoreAuditLog(store)

            def commands_done() -> bool:
                events = [e for e in audit.query() if str(e.get("requestId", "")).startswith("soak-cmd-")]
                return len({e["requestId"] for e in events if e["effect"] == "changed"}) == len(commands)

            _wait(commands_done, 600, "commands")
            def drained() -> bool:
                return all(azurite.queue_client(q).get_queue_properties().approximate_message_count == 0
                           for q in ("customer-onboarding", "batch-chunks", "pki-commands"))

            _wait(drained, 600, "queues drained")
            time.sleep(5)  # let the last no-op deliveries finish
        finally:
            worker.stop()
            emulators.clear_faults()

        # --- the audit of the end state ---------------------------------------------------------------
        counts = Counter()
        problems: list[str] = []
        events = list(StoreAuditLog(store).query())
        issued_events = Counter(item["device"] for e in events if e.get("action") == "batch.issue"
                                for item in e.get("issued", []))
        for customer in customers:
            report = json.loads(files.get(f"device-batches-results/{customer}/soak.csv.json"))
            rows = report["rows"]
            counts["rows"] += len(rows)
            counts["issued_rows"] += sum(r["status"] == "issued" for r in rows)
            counts["already_issued_rows"] += sum(r["status"] == "already_issued" for r in rows)
            counts["failed_rows"] += sum(r["status"] == "failed" for r in rows)
            for row in rows:
                record = store.get(f"devices/{row['deviceId']}.json")
                if record is None:
                    problems.append(f"lost: {row['deviceId']} has no record")
                    counts["lost"] += 1
                    continue
                from handlers.device_files import certificate_on_file
                from handlers.records import DeviceRecord

                device = DeviceRecord.from_json(record.data)
                on_file = certificate_on_file(device, files=files, secrets=services.secrets)
                if (format(on_file.serial_number, "X") != record.data["serial"]
                        or on_file.public_bytes(serialization.Encoding.PEM).decode() != device.certificate_pem
                        or row.get("serial") != record.data["serial"]):
                    problems.append(f"duplicated: {row['deviceId']} record/file/report serials differ")
                    counts["duplicated"] += 1
                if issued_events[row["deviceId"]] > 1:
                    problems.append(f"duplicated: {row['deviceId']} audited as issued "
                                    f"{issued_events[row['deviceId']]} times")
                    counts["duplicated"] += 1
        counts["device_records"] = sum(1 for _ in store.find("\"kind\" = 'device'"))
        if counts["device_records"] != per_customer * len(customers):
            problems.append(f"device records: {counts['device_records']}, expected {per_customer * len(customers)}")
            counts["inconsistent"] += 1
        # inputs: applied, rejected (recorded) or poisoned (with a recorded reason)
        rejections = Counter(store.get(n).data["queue"] for n in store.find("\"kind\" = 'rejection'"))
        counts.update({f"rejected_{q}": v for q, v in rejections.items()})
        poisoned = 0
        for queue in ("customer-onboarding", "batch-chunks", "pki-commands"):
            poison = azurite.queue_client(f"{queue}-poison")
            try:
                messages = list(poison.peek_messages(max_messages=32))
            except Exception:  # noqa: BLE001 - no poison queue: nothing was poisoned
                messages = []
            poisoned += len(messages)
        failures = {store.get(n).data.get("messageId") for n in store.find("\"kind\" = 'failure'")}
        counts["poisoned"] = poisoned
        counts["failure_records"] = len(failures)
        broken = store.get(f"batches/{customers[0]}/broken.csv.json")
        if broken is None or broken.data["status"] != "rejected":
            problems.append("lost: the broken batch was not recorded as rejected")
            counts["lost"] += 1
        expected_rejections = {"customer-onboarding": 2, "pki-commands": 3}
        for queue, wanted in expected_rejections.items():
            if rejections[queue] != wanted:
                problems.append(f"lost or extra: {rejections[queue]} rejections recorded for {queue}, sent {wanted}")
                counts["lost"] += 1
        if poisoned and not failures:
            problems.append("lost: poisoned messages without a recorded reason")
            counts["lost"] += 1
        for customer in customers:
            onboard = [e for e in events if e.get("action") == "customer.onboard" and e.get("customer") == customer]
            if [e["after"] for e in onboard if e["effect"] == "changed"][-1:] != ["active"]:
                problems.append(f"inconsistent: {customer}'s onboarding audit does not end in active")
                counts["inconsistent"] += 1
        # commands: one effect per requestId; records agree with the audit
        for n, _command in enumerate(commands):
            effects = Counter(e["effect"] for e in events if e.get("requestId") == f"soak-cmd-{n}")
            counts["command_noops"] += effects["no-op"]
            if effects["changed"] != 1:
                problems.append(f"inconsistent: command {n} has {effects['changed']} effects: {dict(effects)}")
                counts["inconsistent"] += 1
        for device in (f"{customers[0]}-d00001", f"{customers[0]}-d00002"):
            if store.get(f"devices/{device}.json").data["status"] != "disabled":
                problems.append(f"inconsistent: {device} is not disabled")
                counts["inconsistent"] += 1
        if store.get(f"customers/{customers[-1]}.json").data["status"] != "disabled":
            problems.append(f"inconsistent: {customers[-1]} is not disabled")
            counts["inconsistent"] += 1
        renewed = store.get(f"customers/{customers[1]}.json").data
        if (len(renewed.get("renewals", [])) != 1
                or len(emulators.keyvault.key_versions(f"customer-{customers[1]}")) != 2):
            problems.append(f"inconsistent: {customers[1]} renewed {len(renewed.get('renewals', []))} times")
            counts["inconsistent"] += 1
        leaks, scanned = find_leaks(stack)
        counts["leaks"] = len(leaks)
        problems += leaks[:10]
        result = {"benchmark": "soak", "customers": len(customers), "devices": per_customer * len(customers),
                  "worker_kills": len(kills), "issued_when_killed": kills, "wall_s": round(time.monotonic() - started),
                  "blobs_and_logs_scanned": scanned, **{k: counts[k] for k in (
                      "lost", "duplicated", "inconsistent", "leaks")}, "counts": dict(counts),
                  "problems": problems[:20]}
    return result


class _Doc:
    data: dict = {}  # noqa: RUF012 - a stand-in for a missing record: read, never written
