"""Shared fixtures. Azurite (npm) is started once per session on free loopback ports and stopped after."""

from __future__ import annotations

import secrets

import pytest
from azure.storage.blob import BlobServiceClient

from clients.blob_state import BlobDocumentStore
from devhost.azurite import Azurite


@pytest.fixture(scope="session")
def azurite():
    with Azurite() as running:
        yield running


@pytest.fixture(scope="module")
def own_azurite():
    """An Azurite of the test module's own: its queues (customer-onboarding, batch-chunks) hold only that
    module's messages."""
    with Azurite() as running:
        yield running


@pytest.fixture
def blob_service(azurite) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(azurite.connection_string)


@pytest.fixture
def state_store(blob_service) -> BlobDocumentStore:
    """A blob document store in a fresh container of its own."""
    store = BlobDocumentStore(blob_service.get_container_client(f"state-{secrets.token_hex(6)}"))
    store.ensure_container()
    return store


@pytest.fixture
def azurite_env(azurite, tmp_path) -> dict[str, str]:
    """Settings pointing the app at Azurite, a fresh state container and a local key store."""
    return {
        "AzureWebJobsStorage": azurite.connection_string,
        "STATE_CONTAINER": f"state-{secrets.token_hex(6)}",
        "LOCAL_KEYSTORE_DIR": str(tmp_path / "keystore"),
        "LOCAL_KEYSTORE_PASSPHRASE": secrets.token_urlsafe(16),
    }


@pytest.fixture(scope="session")
def emulators(tmp_path_factory):
    """The emulator stack (Key Vault, IoT Hub, two DPS instances, DPS device endpoint), once per session."""
    from emulators.stack import EmulatorStack

    with EmulatorStack(tmp_path_factory.mktemp("emulators"), dps_instances=2) as stack:
        yield stack


@pytest.fixture
def stack(emulators):
    """The session's emulator stack with no injected faults before and after the test."""
    emulators.clear_faults()
    yield emulators
    emulators.clear_faults()
