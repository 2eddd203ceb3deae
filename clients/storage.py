"""Storage clients from settings: a connection string locally, managed identity on Azure."""

from __future__ import annotations

from azure.storage.blob import BlobServiceClient

from settings import Settings

from .blob_state import BlobDocumentStore


# Batch chunks write from many threads at once; requests' default pool of 10 connections per host
# would open and discard a connection for every extra concurrent call.
POOL_SIZE = 64


def pooled_transport(connection_verify: str | None = None):
    """A requests transport with a larger pool; ``connection_verify`` must be given here, since a client's own
    ``connection_verify`` kwarg only configures the transport it would have built itself."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options = {"connection_verify": connection_verify} if connection_verify else {}
    return RequestsTransport(session=session, session_owner=False, **options)


def blob_service(settings: Settings) -> BlobServiceClient:
    storage = settings.storage
    if storage.connection_string:
        return BlobServiceClient.from_connection_string(storage.connection_string, transport=pooled_transport())
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential(managed_identity_client_id=storage.managed_identity_client_id)
    return BlobServiceClient(storage.blob_service_uri, credential=credential, transport=pooled_transport())


def state_store(settings: Settings, *, ensure: bool = True) -> BlobDocumentStore:
    store = BlobDocumentStore(blob_service(settings).get_container_client(settings.state_container))
    if ensure:
        store.ensure_container()
    return store


_QUEUES: dict[tuple[str, str], object] = {}


def send_queue_message(settings: Settings, queue: str, text: str) -> str:
    """Enqueue ``text`` as is (the app's queues use ``messageEncoding: none``); creates the queue if needed."""
    key = (repr(settings.storage) + (settings.storage.connection_string or ""), queue)
    client = _QUEUES.get(key)
    if client is None:
        client = _QUEUES[key] = _queue_client(settings, queue)
    return client.send_message(text).id


def _queue_client(settings: Settings, queue: str):
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.queue import QueueClient

    storage = settings.storage
    if storage.connection_string:
        client = QueueClient.from_connection_string(storage.connection_string, queue)
    else:
        from azure.identity import DefaultAzureCredential

        client = QueueClient(storage.queue_service_uri, queue, credential=DefaultAzureCredential(
            managed_identity_client_id=storage.managed_identity_client_id))
    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    return client


class StorageQueues:
    """``MessageQueue`` over Azure Storage queues (JSON text, ``messageEncoding: none``)."""

    def __init__(self, settings: Settings):
        self._settings = settings

    def send(self, queue: str, message) -> None:
        import json

        from .errors import translated

        with translated(f"queue {queue}"):
            send_queue_message(self._settings, queue, json.dumps(message, separators=(",", ":")))
