"""The main job on a throwaway local stack (Azurite + Key Vault/DPS/IoT Hub emulators + devhost running
function_app): root CA, registered and verified in DPS, two customers onboarded through the queue
(and a rejection), a device batch for
each, a device exported and registered over mutual TLS, the device disabled by an operator command and
refused, an intermediate renewed, an expiry sweep rehearsed with a date override, and a device renewing its own
certificate through DPS.

It exits 0 only if every step did what it says, and it leaves no process and no file behind.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from devhost.stack import LocalStack
from emulators.stack import ADMIN, OPERATOR

WAIT_S = 90


def _wait(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def run_demo(out: TextIO, main: Callable[..., int], inspect: Callable[[LocalStack, dict], None] | None = None, *,
             record_exchanges: bool = False) -> int:
    """``main`` is pkictl's entry point (passed in: the CLI imports this module, not the other way round);
    ``inspect(stack, settings)`` runs after the last step, before the stack stops (tests scan it); with
    ``record_exchanges`` the emulators keep every request and answer (``stack.emulators.exchanges``)."""
    from .common import connect_to

    def step(title: str) -> None:
        print(f"\n== {title}", file=out)

    def ok(argv: list[str], env: dict) -> bool:
        return main(argv, env=env, out=out) == 0

    with tempfile.TemporaryDirectory(prefix="pki-demo-") as workdir, \
            LocalStack(Path(workdir), dps_instances=2, record_exchanges=record_exchanges) as stack:
        # The app runs as its managed identity (pki-app); people run pkictl as themselves, with their roles.
        admin, env = stack.settings_as(ADMIN), stack.settings_as(OPERATOR)
        admin["ROOT_CA_COMMON_NAME"], admin["ROOT_CA_ORGANIZATION"] = "Contoso IoT Root CA (demo)", "Contoso"
        print(f"local stack up on 127.0.0.1 (Azurite, Key Vault, 2 DPS instances, IoT Hub, devhost); "
              f"working folder {workdir}", file=out)
        print("identities: the app runs as pki-app (user-assigned managed identity, tokens from the local "
              "identity endpoint); the root ceremony as pki-admin; everything else as pki-operator, who cannot "
              "sign with a CA key; no key, SAS or connection string in any setting", file=out)

        step("1. create the root CA (as pki-admin): key in Key Vault (emulator), certificate in blob state")
        if not ok(["root", "create"], admin):
            return 1
        refused = io.StringIO()
        if main(["root", "create"], env=admin, out=out, err=refused) != 1:
            print("FAILED: a second root was created", file=out)
            return 1
        print(f"a second `root create` is refused: {refused.getvalue().strip()}", file=out)

        step("2. the root registered in both DPS instances (as pki-admin): uploaded through Azure Resource Manager "
             "and verified by proof of possession, the root key signing in Key Vault (`pkictl root register --all`)")
        if not ok(["root", "register", "--all"], admin):
            return 1
        print("as the operator, `pkictl root show` reads where the root is verified from DPS itself:", file=out)
        if not ok(["root", "show"], env):
            return 1
        code = secrets.token_hex(16).upper()
        refused = io.StringIO()
        if main(["verification-cert", "--code", code], env=env, out=io.StringIO(), err=refused) != 1 \
                or "ForbiddenByRbac" not in refused.getvalue():
            print(f"FAILED: the operator could sign with the root key: {refused.getvalue().strip()}", file=out)
            return 1
        print("the operator's attempt to sign with the root key is refused by Key Vault (403 ForbiddenByRbac)",
              file=out)

        step("3. the ERP onboards two customers (queue customer-onboarding) and sends one broken message")
        customers = {"contoso-gmbh": ["--display-name", "Contoso GmbH", "--country", "DE"],
                     "fabrikam": ["--display-name", "Fabrikam Inc", "--country", "US", "--base64"]}
        for customer, extra in customers.items():
            if not ok(["send", "onboarding", "--customer", customer, *extra], env):
                return 1
        services = connect_to(env)
        services.queue.send_text("customer-onboarding", '{"customerId": "Tailspin", "colour": "red"}')
        deadline = time.monotonic() + WAIT_S
        records: dict[str, dict] = {}
        while time.monotonic() < deadline:
            docs = {c: services.store.get(f"customers/{c}.json") for c in customers}
            records = {c: doc.data if doc else {} for c, doc in docs.items()}
            rejections = list(services.store.find("\"kind\" = 'rejection'"))
            if all(r.get("status") == "active" for r in records.values()) and rejections:
                break
            time.sleep(0.5)
        else:
            print(f"FAILED: onboarding did not finish within {WAIT_S}s: "
                  f"{ {c: r.get('status') for c, r in records.items()} }; see {stack.state_dir / 'devhost.log'}",
                  file=out)
            return 1
        if not ok(["customer", "list"], env):
            return 1
        for customer, record in records.items():
            groups = stack.emulators.dps[[d.name for d in stack.emulators.dps].index(record["dps"]["name"])]
            in_dps = customer in groups.group_ids()
            print(f"{customer}: intermediate {record['intermediate']['subject']} (serial "
                  f"{record['intermediate']['serial'][:16]}...), enrollment group on {record['dps']['name']}: "
                  f"{'present' if in_dps else 'MISSING'}", file=out)
            if not in_dps:
                return 1
        rejection = services.store.get(rejections[0]).data
        print(f"the broken message was rejected and recorded ({rejections[0]}): {rejection['field']}: "
              f"{rejection['reason']}", file=out)

        step("4. the same onboarding delivered again is a no-op")
        if not ok(["send", "onboarding", "--customer", "fabrikam", "--display-name", "Fabrikam Inc", "--country", "US"],
                  env):
            return 1
        time.sleep(3)
        versions = stack.emulators.keyvault.key_versions("customer-fabrikam")
        print(f"Key Vault holds {len(versions)} version of customer-fabrikam's key; the audit log has the no-op",
              file=out)
        if len(versions) != 1:
            return 1
        step("5. a factory uploads device batches: generated keys for contoso-gmbh, CSRs for fabrikam")
        samples = Path(__file__).resolve().parent.parent / "samples"
        if not ok(["send", "batch", str(samples / "generated-keys.csv"), "--customer", "contoso-gmbh",
                   "--register", "2", "--timeout", "180"], env):
            return 1
        if not ok(["send", "batch", str(samples / "with-csrs.jsonl"), "--customer", "fabrikam", "--timeout", "180"],
                  env):
            return 1

        step("6. export one device for the factory line and register it with DPS over mutual TLS")
        device_dir = Path(workdir) / "sensor-0003"
        if not ok(["device", "export", "contoso-gmbh", "sensor-0003", "--out", str(device_dir), "--include-key"], env):
            return 1
        if not ok(["device", "register", "--cert", str(device_dir / "cert.pem"), "--chain",
                   str(device_dir / "chain.pem"), "--key", str(device_dir / "device.key"),
                   "--id-scope", records["contoso-gmbh"]["dps"]["idScope"]], env):
            return 1
        print("and without its intermediate the same device is refused (what `pkictl doctor` explains):", file=out)
        if main(["device", "register", "--cert", str(device_dir / "cert.pem"), "--key", str(device_dir / "device.key"),
                 "--id-scope", records["contoso-gmbh"]["dps"]["idScope"]], env=env, out=out) != 1:
            return 1
        step("7. an operator disables the device (queue pki-commands): IoT Hub disables it, DPS refuses it")
        if not ok(["send", "command", "disable-device", "--customer", "contoso-gmbh", "--device", "sensor-0003",
                   "--reason", "demo: reported stolen"], env):
            return 1

        def disabled() -> bool:
            record = services.store.get("devices/sensor-0003.json").data
            return record["status"] == "disabled" and (record.get("lastCommand") or {}).get("applied") is True

        if not _wait(disabled):
            print(f"FAILED: the device was not disabled; see {stack.state_dir / 'devhost.log'}", file=out)
            return 1
        print(f"device record: disabled; IoT Hub: {stack.emulators.iothub.device_status('sensor-0003')}; "
              "a new registration:", file=out)
        if main(["device", "register", "--cert", str(device_dir / "cert.pem"), "--chain", str(device_dir / "chain.pem"),
                 "--key", str(device_dir / "device.key"), "--id-scope", records["contoso-gmbh"]["dps"]["idScope"]],
                env=env, out=out) != 1:
            print("FAILED: the disabled device could still register", file=out)
            return 1
        if not ok(["audit", "--customer", "contoso-gmbh", "--device", "sensor-0003"], env):
            return 1

        step("8. fabrikam's intermediate is renewed by command: new key version, new certificate as the group's "
             "primary, the old one kept as secondary")
        if not ok(["send", "command", "renew-intermediate", "--customer", "fabrikam", "--reason", "demo: yearly roll"],
                  env):
            return 1
        if not _wait(lambda: len(services.store.get("customers/fabrikam.json").data.get("renewals", [])) == 1):
            print(f"FAILED: the renewal did not finish; see {stack.state_dir / 'devhost.log'}", file=out)
            return 1
        renewed = services.store.get("customers/fabrikam.json").data
        print(f"fabrikam: intermediate serial {renewed['intermediate']['serial'][:16]}... (primary), previous "
              f"{renewed['previousIntermediates'][0]['serial'][:16]}... (secondary); Key Vault holds "
              f"{len(stack.emulators.keyvault.key_versions('customer-fabrikam'))} versions of its key", file=out)

        rehearsal = (dt.datetime.now(dt.UTC) + dt.timedelta(days=340)).strftime("%Y-%m-%d")
        step(f"9. the expiry sweep, rehearsed as if it were {rehearsal}: devices expiring within 30 days are "
             "announced on queue certificate-expiry-notices, one message per customer")
        if not ok(["sweep", "run", "--now", rehearsal], env):
            return 1
        from clients.storage import queue_client

        notices = queue_client(services.settings, "certificate-expiry-notices")
        messages = [json.loads(m.content) for m in notices.peek_messages(max_messages=32)]
        for message in messages:
            print(f"notice {message['noticeId']}: {message['count']} device(s), first "
                  f"{message['devices'][0]['deviceId']} notAfter {message['devices'][0]['notAfter']}", file=out)
        if sorted(m["customerId"] for m in messages) != ["contoso-gmbh", "fabrikam"]:
            print("FAILED: expected one notice per customer", file=out)
            return 1

        step("10. a device renews its own certificate through DPS: a new key and CSR in its registration payload, "
             "presenting its current certificate; the app's custom allocation webhook issues from contoso-gmbh's "
             "intermediate (`pkictl device renew`, acting as the device)")
        current, renewed_dir = Path(workdir) / "sensor-0001", Path(workdir) / "sensor-0001-renewed"
        scope = ["--id-scope", records["contoso-gmbh"]["dps"]["idScope"]]
        if not ok(["device", "export", "contoso-gmbh", "sensor-0001", "--out", str(current), "--include-key"], env):
            return 1
        if not ok(["device", "renew", "--cert", str(current / "cert.pem"), "--chain", str(current / "chain.pem"),
                   "--key", str(current / "device.key"), "--out", str(renewed_dir), *scope], env):
            return 1
        print("the renewed certificate registers:", file=out)
        if not ok(["device", "register", "--cert", str(renewed_dir / "cert.pem"), "--chain",
                   str(renewed_dir / "chain.pem"), "--key", str(renewed_dir / "device.key"), *scope], env):
            return 1
        shown = io.StringIO()
        if main(["device", "show", "contoso-gmbh", "sensor-0001", "--json"], env=env, out=shown) != 0:
            return 1
        history = json.loads(shown.getvalue())["certificates"]
        for certificate in history:
            print(f"certificate {certificate['serial'][:16]}... issued by {certificate['issuedBy']}, notAfter "
                  f"{certificate['notAfter']}{' (current)' if certificate.get('current') else ''}", file=out)
        if [c["issuedBy"] for c in history] != ["renewal", "batch"]:
            print("FAILED: device show does not list the renewal then the batch certificate", file=out)
            return 1
        if inspect is not None:
            inspect(stack, env)
        print("\ndemo complete: every step did what it says; stopping the local stack", file=out)
    return 0

