"""A test function app for devhost: one function per trigger type, recording what it saw in blobs."""

import json
import os
import time
import uuid

import azure.functions as func
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

app = func.FunctionApp()


def _service() -> BlobServiceClient:
    """The app's storage, the way the host was told to reach it: a connection string, or its managed identity."""
    ca = os.environ.get("EMULATOR_CA_PATH")
    if os.environ.get("AzureWebJobsStorage"):
        return BlobServiceClient.from_connection_string(os.environ["AzureWebJobsStorage"], connection_verify=ca)
    from azure.identity import ManagedIdentityCredential

    credential = ManagedIdentityCredential(client_id=os.environ["AzureWebJobsStorage__clientId"])
    return BlobServiceClient(os.environ["AzureWebJobsStorage__blobServiceUri"], credential=credential,
                             connection_verify=ca)


def _record(kind: str, data: dict) -> None:
    service = _service()
    container = service.get_container_client(os.environ["TEST_RESULTS"])
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    container.upload_blob(f"{kind}/{uuid.uuid4()}.json", json.dumps(data))


@app.queue_trigger(arg_name="msg", queue_name="%TEST_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%TEST_QUEUE%-out", connection="AzureWebJobsStorage")
def on_message(msg: func.QueueMessage, out: func.Out[str]) -> None:
    body = msg.get_body().decode()
    _record("queue", {"body": body, "dequeueCount": msg.dequeue_count})
    out.set(f"echo:{body}")


@app.queue_trigger(arg_name="msg", queue_name="%TEST_FAIL_QUEUE%", connection="AzureWebJobsStorage")
def always_fails(msg: func.QueueMessage) -> None:
    _record("fails", {"body": msg.get_body().decode(), "dequeueCount": msg.dequeue_count})
    raise RuntimeError("this function always fails")


@app.blob_trigger(arg_name="blob", path="%TEST_CONTAINER%/{customer}/{name}", connection="AzureWebJobsStorage",
                  source="EventGrid")
def on_blob(blob: func.InputStream, context) -> None:
    _record("blob", {"name": blob.name, "length": blob.length, "data": blob.read().decode(),
                     "function": context.function_name})


@app.blob_trigger(arg_name="blob", path="%TEST_SLOW_CONTAINER%/{name}", connection="AzureWebJobsStorage",
                  source="EventGrid")
def slow_blob(blob: func.InputStream) -> None:
    _record("slow", {"name": blob.name})
    time.sleep(float(os.environ["TEST_SLOW_SECONDS"]))


@app.timer_trigger(arg_name="timer", schedule="%TEST_SCHEDULE%", run_on_startup=False, use_monitor=True)
def on_timer(timer: func.TimerRequest) -> None:
    _record("timer", {"pastDue": timer.past_due})
