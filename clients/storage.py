"""Storage clients from settings: a connection string locally, managed identity on Azure."""

from __future__ import annotations

from azure.storage.blob import BlobServiceClient

from settings import Settings

from .blob_state import BlobDocumentStore


def blob_service(settings: Settings) -> BlobServiceClient:
    storage = settings.storage
    if storage.connection_string:
        return BlobServiceClient.from_connection_string(storage.connection_string)
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential(managed_identity_client_id=storage.managed_identity_client_id)
    return BlobServiceClient(storage.blob_service_uri, credential=credential)


def state_store(settings: Settings, *, ensure: bool = True) -> BlobDocumentStore:
    store = BlobDocumentStore(blob_service(settings).get_container_client(settings.state_container))
    if ensure:
        store.ensure_container()
    return store
