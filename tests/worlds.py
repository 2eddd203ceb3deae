"""Shared test worlds, one home each (test modules import these, never each other).

- ``World``: a root and the onboarding ports on fakes; ``CommandWorld``: two customers and the command ports;
- ``FakeApp``: the whole function app on in-memory fakes, driven through its edge as the host drives it, with the
  batch handlers also callable one step at a time;
- ``Devhost``: the deployed function app under devhost, as a subprocess; ``Fleet``: customers with devices whose
  keys the test holds, on Azurite and the emulators;
- ``CountingKeys``: the local key store, counting key creations and failing signs on demand; ``wait_for``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from clients.audit import StoreAuditLog
from clients.device_registration import RegistrationRefused, register
from clients.local_keystore import LocalKeyStore
from clients.metrics import MeteredAuditLog
from devhost.stack import person_settings
from emulators.stack import OPERATOR
from handlers.command_message import Command
from handlers.commands import run_command
from handlers.dps_pool import DpsInstance, OnboardingSettings
from handlers.messages import Delivery
from handlers.onboarding import OnboardingRequest, onboard_customer
from handlers.ports import Ports
from handlers.records import BatchSettings, customer_document, device_document, device_tags
from handlers.root_ca import RootRequest, create_root
from pki import export
from pki.keys import KeyType, generate_key
from pkictl.cli import main as pkictl

from .batch_helpers import csr_pem, drain_chunks, intake, onboarded, upload
from .fakes import (
    Blob,
    FakeDps,
    FakeEnrollmentGroups,
    FakeHubs,
    ListAuditLog,
    MemoryDocumentStore,
    MemoryFiles,
    MemoryQueue,
    MemorySecrets,
    Message,
)
from .x509_helpers import NOW

REPO = Path(__file__).resolve().parent.parent

def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class CountingKeys(LocalKeyStore):
    def __init__(self, *args, fail_signing: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.created = 0
        self.fail_signing = fail_signing

    def create_key(self, name, key_type):
        self.created += 1
        return super().create_key(name, key_type)

    def signer(self, key):
        sign = super().signer(key)

        def maybe_failing(algorithm, digest):
            if self.fail_signing:
                self.fail_signing -= 1
                raise ConnectionError("key store unreachable")
            return sign(algorithm, digest)
        return maybe_failing


POOL = (DpsInstance("dps1", "https://dps1.example", "0ne001", ("hub1.azure-devices.net",)),
        DpsInstance("dps2", "https://dps2.example", "0ne002", ("hub2.azure-devices.net", "hub1.azure-devices.net")))


class World:
    def __init__(self, tmp_path, capacity=100, pool=POOL):
        self.store = MemoryDocumentStore()
        self.keys = CountingKeys(tmp_path / "keys", b"test-passphrase-123")
        self.groups = FakeEnrollmentGroups(capacity)
        self.audit = ListAuditLog()
        self.settings = OnboardingSettings(pool=pool)
        create_root(RootRequest("root", KeyType.EC_P384, 20, "Test Root"), store=self.store, keys=self.keys, now=NOW)
        self.keys.created = 0

    def onboard(self, message: dict | str, **kwargs):
        raw = message if isinstance(message, str) else json.dumps(message)
        return onboard_customer(OnboardingRequest.parse(raw), store=self.store, keys=self.keys, groups=self.groups,
                                audit=self.audit, settings=self.settings, now=NOW, sleep=lambda s: None, **kwargs)


HUB = "hub1.azure-devices.net"


class Files:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, path: str) -> bytes:
        return self.data[path]


class CommandWorld(World):
    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.groups = FakeDps()
        self.hubs = FakeHubs()
        self.files = Files()
        self.onboard({"customerId": "contoso"})
        self.onboard({"customerId": "fabrikam"})
        self.ports = Ports(store=self.store, keys=self.keys, dps=self.groups, hubs=self.hubs, files=self.files,
                           audit=self.audit, settings=self.settings)
        self.sequence = 0

    def device(self, device_id: str, customer: str = "contoso", registered: bool = True, status: str = "issued",
               issuer: str | None = None, not_after: str = "2027-11-29T00:00:00Z", legacy: bool = False) -> None:
        """A device record (its certificate a stand-in PEM); ``legacy``: as written before records kept the
        certificate (in a ``cert.pem`` output of its own)."""
        pem = self.customer(customer)["intermediate"]["certificatePem"]
        record = {"customerId": customer, "deviceId": device_id, "status": status, "serial": "01",
                  "notAfter": not_after, "keySource": "csr", "outputs": {"pem": f"out/{device_id}.pem"},
                  "certificatePem": pem,
                  "intermediateSerial": issuer or self.customer(customer)["intermediate"]["serial"]}
        if legacy:
            record["outputs"] = {"certificate": f"out/{device_id}/cert.pem", "chain": f"out/{device_id}/chain.pem"}
            del record["certificatePem"]
        for path in record["outputs"].values():
            self.files.data[path] = pem.encode()
        self.store.create(device_document(device_id), record, tags=device_tags(record))
        if registered:
            self.groups.registered[device_id] = {"registrationId": device_id, "deviceId": device_id,
                                                 "assignedHub": HUB, "group": customer}
            self.hubs.add(HUB, device_id)

    def customer(self, customer: str = "contoso") -> dict:
        return self.store.get(customer_document(customer)).data

    def send(self, message: dict, *, message_id: str | None = None, at: dt.datetime | None = None) -> str:
        self.sequence += 1
        delivery = Delivery(message_id or f"m{self.sequence}", at or NOW + dt.timedelta(seconds=self.sequence))
        return run_command(Command.parse(json.dumps(message)), delivery, ports=self.ports, now=NOW)

    def effects(self, action: str) -> list[str]:
        return [e["effect"] for e in self.audit.events if e["action"] == action]


class FakeApp:
    """The function app on in-memory fakes (one DPS instance), driven as the host drives it: ``deliver`` and
    ``upload`` go through ``edge.queue`` with the handlers ``function_app`` wires, so a handler that raises anything
    but ``Rejected`` (what the host retries, then poisons) raises here. ``intake`` and ``run_chunks`` call the batch
    handlers directly, one step at a time, with any port swapped."""

    def __init__(self, tmp_path: Path, batches: BatchSettings | None = None, now: dt.datetime | None = None):
        # the audit log counted as in production (edge/services.py): metrics come from its events
        store, keys, audit = (MemoryDocumentStore(), CountingKeys(tmp_path / "keys", b"test-passphrase-123"),
                              MeteredAuditLog(ListAuditLog()))
        dps, self.files, self.queue = FakeDps(), MemoryFiles(), MemoryQueue()
        onboarding = OnboardingSettings(pool=POOL[:1])
        self.wired = SimpleNamespace(
            store=store, keys=keys, groups=dps, audit=audit, onboarding=onboarding, files=self.files,
            queue=self.queue, secrets=MemorySecrets(), batches=batches or BatchSettings(), registrar=None,
            commands=Ports(store=store, keys=keys, dps=dps, hubs=FakeHubs(), files=self.files, audit=audit,
                           settings=onboarding))
        self.now = now or dt.datetime.now(dt.UTC)
        self.messages = 0
        self._pop = threading.Lock()
        create_root(RootRequest("root", KeyType.EC_P384, 20, "Test Root"), store=store, keys=keys, now=self.now)

    @property
    def store(self) -> MemoryDocumentStore:
        return self.wired.store

    def deliver(self, queue: str, body: bytes) -> None:
        """One delivery; raises what the host would retry (and finally poison)."""
        import function_app
        from edge.queue import run_queue_message

        handlers = {"customer-onboarding": function_app.handle_onboarding, "pki-commands": function_app.handle_command,
                    "batch-chunks": function_app.handle_chunk}
        self.messages += 1
        message = Message(body, f"m{self.messages}", insertion_time=dt.datetime.now(dt.UTC))
        run_queue_message(message, queue=queue, services=lambda: self.wired, handle=handlers[queue])

    def onboard(self, customer_id: str) -> dict:
        self.deliver("customer-onboarding", json.dumps({"customerId": customer_id}).encode())
        return self.store.get(customer_document(customer_id)).data

    def upload(self, path: str, content: bytes, metadata: dict[str, str] | None = None) -> None:
        """Upload ``customer/name``, fire the blob trigger, then run every chunk message it sent."""
        import function_app
        from edge.queue import run_blob

        name = self.put(path, content, metadata)
        run_blob(Blob(name, {"ETag": self.files.properties(name)[1]}), services=lambda: self.wired,
                 handle=function_app.handle_batch)
        try:
            while self.queue.sent:
                queue, message = self.queue.sent.pop(0)
                self.deliver(queue, json.dumps(message).encode())
        finally:
            self.queue.sent.clear()  # a failed chunk leaves nothing behind for the next input

    def put(self, path: str, content: bytes, metadata: dict[str, str] | None = None) -> str:
        """Upload ``customer/name`` without firing anything; returns the blob's path."""
        name = f"{self.wired.batches.input_container}/{path}"
        self.files.upload(name, content, metadata)
        return name

    def intake(self, path: str, **ports) -> str:
        from handlers.batch_intake import intake_batch

        w = self.wired
        return intake_batch(path, **{"files": w.files, "outputs": w.files, "store": w.store, "queue": w.queue,
                                     "secrets_store": w.secrets, "audit": w.audit, "settings": w.batches,
                                     "now": self.now, **ports})

    def chunk(self, customer_id: str, batch_name: str, n: int, **ports) -> str:
        from handlers.batch_chunk import process_chunk
        from handlers.records import ChunkMessage

        w = self.wired
        return process_chunk(ChunkMessage(customer_id, batch_name, n), **{
            "files": w.files, "outputs": w.files, "store": w.store, "keys": w.keys, "secrets_store": w.secrets,
            "audit": w.audit, "settings": w.batches, "now": self.now, "registrar": w.registrar, **ports})

    def run_chunks(self, **ports) -> list[str]:
        """Run every queued chunk message in turn (safe to call from several threads at once)."""
        outcomes = []
        while True:
            with self._pop:
                if not self.queue.sent:
                    return outcomes
                _, message = self.queue.sent.pop(0)
            outcomes.append(self.chunk(message["customerId"], message["batchName"], message["chunk"], **ports))

    def report(self, path: str, suffix: str = "json"):
        data = self.files.get(f"{self.wired.batches.results_container}/{path}.{suffix}")
        return json.loads(data) if suffix == "json" else data.decode()

    def documents(self, kind: str) -> list[dict]:
        return [self.store.get(name).data for name in self.store.find(f"\"kind\" = '{kind}'")]


class Devhost:
    def __init__(self, env: dict, concurrency: int = 2):
        settings = {k: v for k, v in env.items() if not k.startswith("_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devhost", "--script-root", str(REPO), "--host-json", env["_HOST_JSON"],
             "--concurrency", str(concurrency), "--log-level", "WARNING", "--message-lease", "20"],
            cwd=REPO, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **settings},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        return self.process.communicate(timeout=60)[0]


class Fleet:
    """Customers with devices whose keys the test holds (issued from CSR batches), registered over mTLS."""

    def __init__(self, env, stack, tmp_path):
        self.env, self.stack, self.tmp = env, stack, tmp_path
        self.settings_env = {k: v for k, v in env.items() if not k.startswith("_")}
        self.operator_env = person_settings(self.settings_env, stack.client_id(OPERATOR))  # who runs pkictl
        self.acme, self.globex = f"acme-{secrets.token_hex(3)}", f"globex-{secrets.token_hex(3)}"
        self.services = onboarded(self.settings_env, self.acme, stack)
        onboard_customer(OnboardingRequest(customer_id=self.globex), store=self.services.store,
                         keys=self.services.keys, groups=self.services.groups, audit=self.services.audit,
                         settings=self.services.onboarding, now=_now())
        self.keys: dict[str, object] = {}

    def issue(self, customer: str, devices: list[str], batch: str) -> None:
        lines = ""
        for device in devices:
            self.keys[device] = generate_key(KeyType.EC_P256)
            lines += json.dumps({"deviceId": device, "csr": csr_pem(device, self.keys[device])}) + "\n"
        intake(self.services, upload(self.services, customer, batch, lines.encode()))
        drain_chunks(self.services, self.settings_env)

    def register(self, customer: str, device: str) -> str:
        record = self.services.store.get(device_document(device)).data
        chain = self.services.files.get(record["outputs"]["pem"])  # a CSR device: its output is the full chain
        folder = self.tmp / device
        folder.mkdir(exist_ok=True)
        (folder / "chain.pem").write_bytes(chain)
        (folder / "key.pem").write_bytes(export.key_pem(self.keys[device]))
        scope = self.services.store.get(customer_document(customer)).data["dps"]["idScope"]
        return register(self.stack.device_endpoint_url, scope, device, folder / "chain.pem", folder / "key.pem",
                        ca_path=self.stack.ca_path).assigned_hub

    def refused(self, customer: str, device: str) -> str:
        with pytest.raises(RegistrationRefused) as refused:
            self.register(customer, device)
        return str(refused.value)

    def send(self, *args: str) -> None:
        out = io.StringIO()
        assert pkictl(["send", "command", *args], env=self.operator_env, out=out, err=out) == 0, out.getvalue()

    def events(self, customer: str, action: str) -> list[dict]:
        return [e for e in StoreAuditLog(self.services.store).query(customer=customer) if e["action"] == action]

    def wait(self, customer: str, action: str, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(customer, action)
            if len(events) >= count:
                return events
            time.sleep(0.3)
        failures = [self.services.store.get(n).data for n in self.services.store.find("\"kind\" = 'failure'")]
        raise AssertionError(f"{action} on {customer}: {len(self.events(customer, action))} events, wanted {count}; "
                             f"failures: {json.dumps(failures)[:2000]}")


def _now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)
