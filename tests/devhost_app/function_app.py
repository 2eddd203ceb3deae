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
    data = blob.read().decode()
    _record("blob", {"name": blob.name, "length": blob.length, "data": data, "function": context.function_name})
    if data == "fail":
        raise RuntimeError("this blob always fails")


@app.blob_trigger(arg_name="blob", path="%TEST_SLOW_CONTAINER%/{name}", connection="AzureWebJobsStorage",
                  source="EventGrid")
def slow_blob(blob: func.InputStream) -> None:
    _record("slow", {"name": blob.name})
    time.sleep(float(os.environ["TEST_SLOW_SECONDS"]))


@app.timer_trigger(arg_name="timer", schedule="%TEST_SCHEDULE%", run_on_startup=False, use_monitor=True)
def on_timer(timer: func.TimerRequest) -> None:
    _record("timer", {"pastDue": timer.past_due})


@app.queue_trigger(arg_name="msg", queue_name="%TEST_OVERLAP_QUEUE%", connection="AzureWebJobsStorage")
def overlapping(msg: func.QueueMessage) -> None:
    """Runs 0.4-1.6 s by its number, so that invocations end at different times; records when it ran."""
    started = time.time()
    time.sleep(0.4 * (1 + int(msg.get_body()) % 4))
    _record("overlap", {"body": msg.get_body().decode(), "start": started, "end": time.time()})


@app.queue_trigger(arg_name="msg", queue_name="%TEST_SLEEPY_QUEUE%", connection="AzureWebJobsStorage")
def sleepy(msg: func.QueueMessage) -> None:
    _record("sleepy", {"body": msg.get_body().decode(), "dequeueCount": msg.dequeue_count})
    time.sleep(float(os.environ["TEST_SLEEPY_SECONDS"]))
    _record("woke", {"body": msg.get_body().decode()})


@app.timer_trigger(arg_name="timer", schedule="0 0 0 1 1 *", run_on_startup=False, use_monitor=False)
@app.retry(strategy="fixed_delay", max_retry_count="2", delay_interval="00:00:01")
def flaky_timer(timer: func.TimerRequest, context) -> None:
    """Fails its first TEST_TIMER_FAILURES attempts."""
    retry = context.retry_context.retry_count
    _record("flaky", {"retry": retry, "max": context.retry_context.max_retry_count, "at": time.time()})
    if retry < int(os.environ["TEST_TIMER_FAILURES"]):
        raise RuntimeError(f"attempt {retry + 1} fails")


@app.route(route="echo/{name}", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def echo(req: func.HttpRequest) -> func.HttpResponse:
    if req.params.get("fail"):
        raise RuntimeError("the function failed, with a secret cause")
    return func.HttpResponse(json.dumps({"body": req.get_body().decode(), "route": req.url}), status_code=201,
                             mimetype="application/json", headers={"x-echo": "1"})
