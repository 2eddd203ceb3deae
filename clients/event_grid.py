"""What Event Grid delivers to a blob trigger with ``source="EventGrid"``, for hosts that have no Event Grid in
front of them (Core Tools on a developer's machine, against Azurite, which raises no events).

- the event: ``Microsoft.Storage.BlobCreated`` in the Event Grid schema (learn.microsoft.com/azure/event-grid/
  event-schema-blob-storage);
- where it goes: the host's blob extension webhook, ``/runtime/webhooks/blobs?functionName=Host.Functions.NAME``
  with header ``aeg-event-type: Notification`` (learn.microsoft.com/azure/azure-functions/
  functions-event-grid-blob-trigger: the local endpoint Core Tools serves).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from urllib.parse import quote, urlsplit

from azure.core import PipelineClient
from azure.core.exceptions import AzureError
from azure.core.pipeline.policies import HeadersPolicy, RetryPolicy
from azure.core.rest import HttpRequest

WEBHOOK_PATH = "/runtime/webhooks/blobs"


class DeliveryFailed(Exception):
    """The host did not accept the event (the message says what it answered)."""


def blob_created_event(*, container: str, blob: str, url: str, etag: str, length: int, content_type: str = "",
                       account: str = "devstoreaccount1", api: str = "PutBlob", access_tier: str = "Default") -> dict:
    """One BlobCreated event, every documented field present."""
    return {
        "topic": f"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local/providers/"
                 f"Microsoft.Storage/storageAccounts/{account}",
        "subject": f"/blobServices/default/containers/{container}/blobs/{blob}",
        "eventType": "Microsoft.Storage.BlobCreated",
        "id": str(uuid.uuid4()),
        "eventTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": {"api": api, "clientRequestId": str(uuid.uuid4()), "requestId": str(uuid.uuid4()), "eTag": etag,
                 "contentType": content_type or "application/octet-stream", "contentLength": length,
                 "blobType": "BlockBlob", "accessTier": access_tier, "url": url, "sequencer": f"{time.time_ns():032x}",
                 "storageDiagnostics": {"batchId": str(uuid.uuid4())}},
        "dataVersion": "",
        "metadataVersion": "1",
    }


def webhook_url(functions_host: str, function: str) -> str:
    """The blob extension webhook of ``function`` on a Functions host (``http://localhost:7071`` for Core Tools)."""
    split = urlsplit(functions_host)
    if split.scheme not in ("http", "https") or not split.netloc or split.path.strip("/") or split.query:
        raise ValueError(f"{functions_host!r} is not a Functions host URL such as http://localhost:7071")
    return f"{split.scheme}://{split.netloc}{WEBHOOK_PATH}?functionName={quote('Host.Functions.' + function)}"


def deliver(functions_host: str, function: str, events: list[dict], *, connection_verify=True) -> str:
    """POST ``events`` to the function's webhook as Event Grid does (azure-core's pipeline and retries); returns
    the URL. Raises ``DeliveryFailed`` with the host's answer."""
    url = webhook_url(functions_host, function)
    request = HttpRequest("POST", url, json=events, headers={"aeg-event-type": "Notification"})
    policies = [HeadersPolicy(), RetryPolicy(retry_total=5, retry_backoff_max=8)]  # Event Grid retries too
    with PipelineClient(url, policies=policies) as client:
        try:
            response = client.send_request(request, connection_verify=connection_verify)
        except AzureError as exc:
            raise DeliveryFailed(f"{url}: {type(exc).__name__}: {exc}") from None
    if response.status_code not in (200, 202):
        raise DeliveryFailed(f"{url} answered HTTP {response.status_code}: {response.text()[:300]}")
    return url
