"""Storage clients from settings: identity-based (a ``TokenCredential``, on Azure and locally) or, for those who
run that way, a connection string with an account key or SAS."""

from __future__ import annotations

import os

from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from settings import Settings, StorageSettings

from .blob_state import BlobDocumentStore
from .identity import app_credential, storage_credential

# Batch chunks write from many threads at once; requests' default pool of 10 connections per host
# would open and discard a connection for every extra concurrent call.
POOL_SIZE = 64


def pooled_transport(connection_verify: str | None = None):
    """A requests transport with a larger pool; ``connection_verify`` must be given here, since a client's own
    ``connection_verify`` kwarg only configures the transport it would have built itself."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    session = requests.Session()
    session.trust_env = trust_environment()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options = {"connection_verify": connection_verify} if connection_verify else {}
    return RequestsTransport(session=session, session_owner=False, **options)


# What requests looks up in the environment on every request while ``trust_env`` is on: proxy and CA-bundle
# variables, and ~/.netrc (two stat calls). Profiled on a batch worker, those lookups took about a tenth of its
# time; when none of them is there, there is nothing to find, so the session skips them. Any one present keeps
# the lookups, honoured as requests documents.
ENVIRONMENT_SETTINGS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                        "NETRC")


def trust_environment(environ=None, home: str | None = None) -> bool:
    """Whether a session must keep reading the environment per request (a proxy, CA-bundle or netrc setting)."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) or environ.get(name.lower()) for name in ENVIRONMENT_SETTINGS):
        return True
    home = home if home is not None else os.path.expanduser("~")
    return any(os.path.exists(os.path.join(home, name)) for name in (".netrc", "_netrc"))


def ca_path(settings: Settings) -> str | None:
    """The local stack's CA (``EMULATOR_CA_PATH``), which every client then trusts; None on Azure."""
    return str(settings.emulator_ca_path) if settings.emulator_ca_path else None


def blob_service_client(storage: StorageSettings, *, credential=None, ca: str | None = None) -> BlobServiceClient:
    """``storage``'s blob service; ``credential`` is the default for an identity-based connection naming no
    identity (see ``clients.identity.storage_credential``)."""
    if storage.connection_string:
        return BlobServiceClient.from_connection_string(storage.connection_string, transport=pooled_transport(ca))
    return BlobServiceClient(storage.blob_service_uri, credential=storage_credential(storage, credential),
                             transport=pooled_transport(ca))


def queue_service_client(storage: StorageSettings, *, credential=None, ca: str | None = None) -> QueueServiceClient:
    options = {"connection_verify": ca} if ca else {}
    if storage.connection_string:
        return QueueServiceClient.from_connection_string(storage.connection_string, **options)
    return QueueServiceClient(storage.queue_service_uri, credential=storage_credential(storage, credential), **options)


def blob_service(settings: Settings) -> BlobServiceClient:
    return blob_service_client(settings.storage, credential=_default_credential(settings), ca=ca_path(settings))


def _default_credential(settings: Settings):
    return None if settings.storage.connection_string else app_credential(settings)


def state_store(settings: Settings, *, ensure: bool = True) -> BlobDocumentStore:
    store = BlobDocumentStore(blob_service(settings).get_container_client(settings.state_container))
    if ensure:
        store.ensure_container()
    return store


_QUEUES: dict[tuple, object] = {}


def send_queue_message(settings: Settings, queue: str, text: str) -> str:
    """Enqueue ``text`` as is (the app's queues use ``messageEncoding: none``); creates the queue if needed."""
    key = (settings.storage, settings.client_id, settings.emulator_ca_path, queue)
    client = _QUEUES.get(key)
    if client is None:
        client = _QUEUES[key] = queue_client(settings, queue)
    return client.send_message(text).id


def queue_client(settings: Settings, queue: str):
    """Queue ``queue`` of the app's storage account, created if absent."""
    from azure.core.exceptions import ResourceExistsError

    client = queue_service_client(settings.storage, credential=_default_credential(settings),
                                  ca=ca_path(settings)).get_queue_client(queue)
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

        self.send_text(queue, json.dumps(message, separators=(",", ":")))

    def send_text(self, queue: str, text: str) -> str:
        """Enqueue ``text`` as is (pkictl sends what the user would, base64 included); returns the message id."""
        from .errors import translated

        with translated(f"queue {queue}"):
            return send_queue_message(self._settings, queue, text)
