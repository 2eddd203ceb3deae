"""Shared fixtures. The emulator stack (token issuer, Key Vault, DPS, IoT Hub) and Azurite (npm, HTTPS with
OAuth, behind the stack's CA) start once per session on free loopback ports and stop after. The test process
runs on the local platform: ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` name the stack's identity endpoint."""

from __future__ import annotations

import contextlib
import os
import secrets

import pytest
from azure.storage.blob import BlobServiceClient

from clients.blob_state import BlobDocumentStore
from devhost.azurite import Azurite
from devhost.stack import app_settings, platform_environment

# The tests export telemetry nowhere: a shell's Application Insights connection string or local exporter would make
# importing function_app send the tests' telemetry there (and take the place of tests/test_telemetry.py's readers).
for _setting in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "PKI_TELEMETRY_EXPORT"):
    os.environ.pop(_setting, None)

# The settings that say where storage is and who the app is (no Key Vault, DPS or hub).
_STORAGE_AND_IDENTITY = ("AzureWebJobsStorage__", "AZURE_CLIENT_ID", "IDENTITY_", "EMULATOR_CA_PATH")


@pytest.fixture(scope="session")
def emulators(tmp_path_factory):
    """The emulator stack (token issuer, Key Vault, IoT Hub, two DPS instances, DPS device endpoint)."""
    from emulators.stack import EmulatorStack

    with EmulatorStack(tmp_path_factory.mktemp("emulators"), dps_instances=2) as stack, platform_environment(stack):
        yield stack


@pytest.fixture(scope="session")
def azurite(emulators):
    with Azurite(emulators.tls, emulators.ca_path) as running:
        yield running


@pytest.fixture(scope="module")
def own_azurite(emulators):
    """An Azurite of the test module's own: its queues (customer-onboarding, batch-chunks) hold only that
    module's messages."""
    with Azurite(emulators.tls, emulators.ca_path) as running:
        yield running


@pytest.fixture
def blob_service(azurite) -> BlobServiceClient:
    """Key-authorized, for inspecting state (the app itself uses its identity)."""
    return azurite.blob_service()


@pytest.fixture
def state_store(blob_service) -> BlobDocumentStore:
    """A blob document store in a fresh container of its own."""
    store = BlobDocumentStore(blob_service.get_container_client(f"state-{secrets.token_hex(6)}"))
    store.ensure_container()
    return store


@pytest.fixture
def azurite_env(azurite, emulators, tmp_path) -> dict[str, str]:
    """Settings pointing the app at Azurite with its identity, a fresh state container and a local key store."""
    identity = {k: v for k, v in app_settings(azurite, emulators).items() if k.startswith(_STORAGE_AND_IDENTITY)}
    return {
        **identity,
        "STATE_CONTAINER": f"state-{secrets.token_hex(6)}",
        "LOCAL_KEYSTORE_DIR": str(tmp_path / "keystore"),
        "LOCAL_KEYSTORE_PASSPHRASE": secrets.token_urlsafe(16),
    }


@pytest.fixture
def fresh_stack(emulators, tmp_path):
    """``with fresh_stack(dps_instances=1) as stack:`` emulators of the test's own, behind the session's TLS CA
    (which Azurite's certificate chains to as well); meanwhile this process uses that stack's identity endpoint."""
    from emulators.stack import EmulatorStack

    @contextlib.contextmanager
    def make(folder: str = "emulators", **options):
        with EmulatorStack(tmp_path / folder, tls=emulators.tls, **options) as stack, platform_environment(stack):
            yield stack

    return make


@pytest.fixture
def stack(emulators):
    """The session's emulator stack with no injected faults before and after the test."""
    emulators.clear_faults()
    yield emulators
    emulators.clear_faults()


@pytest.fixture(scope="session")
def credential_of(emulators):
    """``credential_of(principal)``: the principal's real ``ManagedIdentityCredential`` (user-assigned, by client
    id), which gets its tokens from the stack's identity endpoint as the app does on Azure."""
    from azure.identity import ManagedIdentityCredential

    from emulators.stack import APP

    made: dict[str, ManagedIdentityCredential] = {}

    def of(principal: str = APP) -> ManagedIdentityCredential:
        if principal not in made:
            made[principal] = ManagedIdentityCredential(client_id=emulators.client_id(principal))
        return made[principal]

    return of
