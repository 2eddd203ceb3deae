"""The app's credentials: one ``TokenCredential`` per connection, built the same way on Azure and locally.

- Key Vault, DPS and IoT Hub: ``DefaultAzureCredential`` with the user-assigned identity's client id from
  ``AZURE_CLIENT_ID`` (or, when that is unset, the storage connection's ``__clientId``). On Azure it finds the
  Functions platform's managed identity endpoint (``IDENTITY_ENDPOINT``); on a person's machine, ``az login``.
- Storage (``AzureWebJobsStorage``): as the Functions host resolves identity-based connections
  (Microsoft.Extensions.Azure ``ClientFactory``): ``__credential=managedidentity`` is a
  ``ManagedIdentityCredential`` for ``__clientId`` / ``__managedIdentityResourceId`` (system-assigned without
  either); otherwise ``DefaultAzureCredential`` with ``__clientId`` as its managed identity.

Locally nothing here changes: the local stack serves the managed identity endpoint itself
(``emulators/identity.py``) and names it in ``IDENTITY_ENDPOINT``, as Azure does. Passing the client id
explicitly (not leaving it to the environment) is what makes a user-assigned identity work for every client.
"""

from __future__ import annotations

import os
import threading

from azure.core.credentials import TokenCredential

from settings import Settings, StorageSettings

_CACHE: dict[tuple, TokenCredential] = {}
_LOCK = threading.Lock()


def _cached(kind: str, identity: str | None, build) -> TokenCredential:
    """One credential per identity and process, so every client shares its token cache. Keyed by the identity
    endpoint as well: a credential reads it when built, and a test process may run one local stack after another."""
    key = (kind, identity, os.environ.get("IDENTITY_ENDPOINT"), os.environ.get("IDENTITY_HEADER"))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def app_credential(settings: Settings) -> TokenCredential:
    """The credential of the Key Vault, DPS and IoT Hub clients."""
    from azure.identity import DefaultAzureCredential

    client_id = settings.client_id or settings.storage.client_id
    return _cached("default", client_id, lambda: DefaultAzureCredential(managed_identity_client_id=client_id))


def storage_credential(storage: StorageSettings, default: TokenCredential | None = None) -> TokenCredential:
    """The credential of an identity-based storage connection; ``default`` when it names no identity."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if storage.credential == "managedidentity":
        if storage.resource_id:
            return _cached("managed", storage.resource_id, lambda: ManagedIdentityCredential(
                identity_config={"resource_id": storage.resource_id}))
        return _cached("managed", storage.client_id, lambda: ManagedIdentityCredential(client_id=storage.client_id))
    if storage.client_id or default is None:
        return _cached("default", storage.client_id,
                       lambda: DefaultAzureCredential(managed_identity_client_id=storage.client_id))
    return default
