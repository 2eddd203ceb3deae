"""The BlobCreated event and webhook URL that ``pkictl send batch --functions-host`` and devhost use, checked
against the Event Grid schema of the REST specs (tests/contracts/eventgrid-blob-created.json) and the documented
webhook of the blob extension (learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from clients.event_grid import blob_created_event, webhook_url
from devhost.host import event_problem

CONTRACT = json.loads((Path(__file__).parent / "contracts" / "eventgrid-blob-created.json").read_text())
_TYPES = {"string": str, "object": dict, "integer": int}


def schema_problems(value: dict, definition: str) -> list[str]:
    spec = CONTRACT["definitions"][definition]
    problems = [f"{definition}: {name} is required" for name in spec["required"] if name not in value]
    for name, item in value.items():
        kind = spec["properties"].get(name)
        if kind is None:
            problems.append(f"{definition}: {name} is not in the schema")
        elif kind == "date-time":
            try:
                dt.datetime.fromisoformat(item)
            except (AttributeError, ValueError):
                problems.append(f"{definition}: {name} {item!r} is not a date-time")
        elif kind in CONTRACT["definitions"]:
            if item not in CONTRACT["definitions"][kind]["enum"]:
                problems.append(f"{definition}: {name} {item!r} is not one of {kind}")
        elif not isinstance(item, _TYPES[kind]) or isinstance(item, bool):
            problems.append(f"{definition}: {name} is not {kind}")
    return problems


def _event(**changes) -> dict:
    return blob_created_event(container="device-batches", blob="acme/line 7.csv", etag='"0x8D96060BDA19D9D"',
                              url="https://pki.blob.core.windows.net/device-batches/acme/line%207.csv", length=17555,
                              content_type="text/csv", account="pki", **changes)


def test_the_event_is_a_blob_created_event_of_the_event_grid_schema():
    event = _event()
    assert schema_problems(event, "EventGridEvent") == []
    assert schema_problems(event["data"], "StorageBlobCreatedEventData") == []
    assert event["eventType"] == "Microsoft.Storage.BlobCreated"
    assert event["subject"] == "/blobServices/default/containers/device-batches/blobs/acme/line 7.csv"
    assert event["topic"].endswith("/providers/Microsoft.Storage/storageAccounts/pki")
    assert event_problem(event) is None  # and devhost's webhook takes it


@pytest.mark.parametrize("break_it, found", [
    (lambda e: e.pop("eventTime"), "EventGridEvent: eventTime is required"),
    (lambda e: e["data"].pop("accessTier"), "StorageBlobCreatedEventData: accessTier is required"),
    (lambda e: e["data"].update(accessTier="Warm"), "accessTier 'Warm' is not one of StorageBlobAccessTier"),
    (lambda e: e["data"].update(contentLength="17555"), "contentLength is not integer"),
    (lambda e: e.update(eventTime="yesterday"), "eventTime 'yesterday' is not a date-time"),
    (lambda e: e.update(blobName="x"), "EventGridEvent: blobName is not in the schema"),
])
def test_the_schema_check_catches_a_broken_event(break_it, found):
    event = _event()
    break_it(event)
    assert any(found in p for p in schema_problems(event, "EventGridEvent") +
               schema_problems(event["data"], "StorageBlobCreatedEventData"))


def test_the_webhook_url_is_the_blob_extensions_local_endpoint():
    assert webhook_url("http://localhost:7071", "device_batch") == \
        "http://localhost:7071/runtime/webhooks/blobs?functionName=Host.Functions.device_batch"
    assert webhook_url("http://localhost:7071/", "device_batch").startswith("http://localhost:7071/runtime/")
    for bad in ("localhost:7071", "http://localhost:7071/api", "ftp://x", "http://h?x=1"):
        with pytest.raises(ValueError, match="is not a Functions host URL"):
            webhook_url(bad, "device_batch")
