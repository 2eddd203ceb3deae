"""Shared set-up for batch tests: a wired service (real clients on Azurite + the emulators), a root,
an onboarded customer, and helpers to upload a batch and run intake/chunks in-process."""

from __future__ import annotations

import datetime as dt
import json
import secrets

from azure.core.exceptions import ResourceExistsError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from clients.storage import queue_client
from devhost.stack import app_settings
from edge.services import build_services
from handlers import batch_chunk, batch_intake, records
from handlers.onboarding import OnboardingRequest, onboard_customer
from handlers.root_ca import RootRequest, create_root
from pki.keys import KeyType, generate_key
from settings import load_settings


def wired_env(azurite, stack, **extra) -> dict[str, str]:
    """The app's settings (its identity, no keys) with a state container of its own."""
    return app_settings(azurite, stack, **{"STATE_CONTAINER": f"state-{secrets.token_hex(5)}", **extra})


def onboarded(env: dict[str, str], customer_id: str, stack=None):
    """Services for ``env`` with a root and one active customer; with ``stack``, the root is also registered and
    verified in every DPS instance by the PKI administrator, through ARM, as `pkictl root register --all` does."""
    services = build_services(load_settings(env))
    now = dt.datetime.now(dt.UTC)
    root = create_root(RootRequest(f"root-{secrets.token_hex(4)}", KeyType.EC_P256, 20, "Batch Root"),
                       store=services.store, keys=services.keys, now=now)
    if stack is not None:
        register_root_as_admin(env, stack, root)
    onboard_customer(OnboardingRequest(customer_id=customer_id), store=services.store, keys=services.keys,
                     groups=services.groups, audit=services.audit, settings=services.onboarding, now=now)
    return services


def register_root_as_admin(env: dict[str, str], stack, root) -> dict[str, str]:
    from clients.factory import ca_certificates, key_store
    from devhost.stack import person_settings
    from emulators.stack import ADMIN
    from handlers.root_registration import register_root

    admin = load_settings(person_settings(env, stack.client_id(ADMIN)))
    return register_root(root, admin.dps_pool, names=None, certificates=ca_certificates(admin),
                         keys=key_store(admin), now=dt.datetime.now(dt.UTC))


def upload(services, customer_id: str, name: str, data: bytes, metadata: dict | None = None) -> str:
    container = services.files._service.get_container_client("device-batches")  # noqa: SLF001 - test set-up
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    container.upload_blob(f"{customer_id}/{name}", data, overwrite=True, metadata=metadata or {})
    return f"device-batches/{customer_id}/{name}"


def intake(services, path: str) -> str:
    return batch_intake.intake_batch(path, files=services.files, outputs=services.files, store=services.store,
                                     queue=services.queue, secrets_store=services.secrets, audit=services.audit,
                                     settings=services.batches, now=dt.datetime.now(dt.UTC))


def drain_chunks(services, env: dict[str, str], registrar=None) -> list[str]:
    """Run every queued chunk message in-process (what devhost does with the chunk function)."""
    queue = queue_client(services.settings, batch_intake.CHUNK_QUEUE)
    outcomes = []
    while True:
        messages = list(queue.receive_messages(max_messages=32, visibility_timeout=60))
        if not messages:
            return outcomes
        for message in messages:
            outcomes.append(batch_chunk.process_chunk(
                records.ChunkMessage.parse(message.content), files=services.files, outputs=services.files,
                store=services.store, keys=services.keys, secrets_store=services.secrets, audit=services.audit,
                settings=services.batches, now=dt.datetime.now(dt.UTC), registrar=registrar))
            queue.delete_message(message)


def report(services, customer_id: str, name: str) -> dict:
    return json.loads(services.files.get(f"device-batches-results/{customer_id}/{name}.json"))


def csr_pem(device_id: str, key=None) -> str:
    key = key or generate_key(KeyType.EC_P256)
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


def with_host_json(values: dict[str, str], tmp_path, queue: str, max_dequeue_count: int = 5) -> dict[str, str]:
    """``values`` plus ``_HOST_JSON`` for a devhost run, with ``queue`` created empty (queues are shared by
    a module's tests: the Azurite instance is)."""
    queue_client(load_settings(values), queue).clear_messages()
    host_json = tmp_path / "host.json"
    host_json.write_text(json.dumps({"version": "2.0", "extensions": {"queues": {
        "messageEncoding": "none", "maxDequeueCount": max_dequeue_count, "visibilityTimeout": "00:00:01",
        "maxPollingInterval": "00:00:00.200"}}}))  # Azure allows 100 ms at least (host.json reference)
    return {**values, "_HOST_JSON": str(host_json)}
