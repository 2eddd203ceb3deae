"""devhost drives any v2 function app against Azurite: queue, blob and timer triggers, poison, receipts."""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from devhost.host import HostConfig, HostError, read_functions
from devhost.schedule import Schedule, ScheduleError
from devhost.stack import app_settings, launch_devhost

from .worlds import wait_for

REPO = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "devhost_app"


def test_ncrontab_schedules():
    import datetime as dt

    at = dt.datetime(2026, 11, 29, 2, 30, 10, tzinfo=dt.UTC)
    assert Schedule.parse("0 0 3 * * *").next_after(at) == at.replace(hour=3, minute=0, second=0)
    assert Schedule.parse("*/15 * * * * *").next_after(at) == at.replace(second=15)
    assert Schedule.parse("0 30 9 * * mon-fri").next_after(at).weekday() == 0  # the 29th is a Sunday
    assert Schedule.parse("00:05:00").next_after(at) == at + dt.timedelta(minutes=5)
    for bad in ("* * * *", "61 * * * * *", "0 0 0 * * funday"):
        with pytest.raises(ScheduleError):
            Schedule.parse(bad)


def test_host_json_settings_are_read():
    config = HostConfig.from_host_json(json.loads((REPO / "host.json").read_text()))
    assert config.max_dequeue_count == 5
    assert config.visibility_timeout_s == 30


def test_unsupported_triggers_and_missing_settings_are_named():
    import azure.functions as func

    app = func.FunctionApp()

    @app.service_bus_queue_trigger(arg_name="m", queue_name="q", connection="SERVICE_BUS")
    def bus(m: func.ServiceBusMessage) -> None:  # pragma: no cover - never invoked
        pass

    with pytest.raises(HostError, match="function bus: devhost runs queue, blob, timer and HTTP triggers only"):
        read_functions(app, {})
    queue_app = func.FunctionApp()

    @queue_app.queue_trigger(arg_name="m", queue_name="%MISSING%", connection="AzureWebJobsStorage")
    def q(m: func.QueueMessage) -> None:  # pragma: no cover
        pass

    with pytest.raises(HostError, match="setting MISSING is not set"):
        read_functions(queue_app, {})


_STORAGE = ("AzureWebJobsStorage", "AZURE_CLIENT_ID", "IDENTITY_", "EMULATOR_CA_PATH")


@pytest.fixture
def app_env(request, azurite, emulators):
    """The host's storage connection as Functions defines it: identity-based (the default here and on Azure), or
    a connection string (still supported); ``_AZURITE`` is for the test's own key-authorized inspection."""
    suffix = secrets.token_hex(4)
    if getattr(request, "param", "identity") == "identity":
        storage = {k: v for k, v in app_settings(azurite, emulators).items() if k.startswith(_STORAGE)}
    else:
        storage = {"AzureWebJobsStorage": azurite.connection_string, "EMULATOR_CA_PATH": str(emulators.ca_path)}
    return {
        **storage,
        "_AZURITE": azurite,
        "TEST_QUEUE": f"work-{suffix}",
        "TEST_FAIL_QUEUE": f"fails-{suffix}",
        "TEST_CONTAINER": f"uploads-{suffix}",
        "TEST_RESULTS": f"results-{suffix}",
        "TEST_SLOW_CONTAINER": f"slow-{suffix}",
        "TEST_SLOW_SECONDS": "5",
        "TEST_SCHEDULE": "*/1 * * * * *",
        "TEST_OVERLAP_QUEUE": f"overlap-{suffix}",
        "TEST_SLEEPY_QUEUE": f"sleepy-{suffix}",
        "TEST_SLEEPY_SECONDS": "4",
        "TEST_TIMER_FAILURES": "2",
        # Each test is an app of its own: its own blob event queue, subscriptions and timer status.
        "AzureFunctionsWebHost__hostid": f"test-{suffix}",
    }


def start_devhost(env: dict, *extra: str) -> subprocess.Popen:
    """devhost on the test app, once ready (its Event Grid subscription exists: blobs uploaded now fire)."""
    settings = {k: v for k, v in env.items() if not k.startswith("_")}
    if "--fire" in extra:
        return subprocess.Popen([sys.executable, "-m", "devhost", "--script-root", str(APP), "--log-level", "WARNING",
                                 *extra], cwd=REPO,
                                env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **settings},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return launch_devhost(["--script-root", str(APP), "--log-level", "WARNING", "--message-lease", "10", *extra],
                          {"PATH": os.environ["PATH"], **settings}, stdout=subprocess.PIPE)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output


def results(env: dict, kind: str) -> list[dict]:
    container = env["_AZURITE"].blob_service().get_container_client(env["TEST_RESULTS"])
    if not container.exists():
        return []
    return [json.loads(container.download_blob(b.name).readall()) for b in container.list_blobs(f"{kind}/")]


def queue(env: dict, name: str) -> QueueClient:
    return env["_AZURITE"].queue_client(name)


def upload(env: dict, name: str, data: bytes, container: str = "TEST_CONTAINER") -> None:
    service = env["_AZURITE"].blob_service()
    client = service.get_container_client(env[container])
    if not client.exists():
        client.create_container()
    client.upload_blob(name, data, overwrite=True)


def event_queue(env: dict) -> QueueClient:
    """The blob extension's queue of blob events (``azure-webjobs-blobtrigger-{hostId}``)."""
    return queue(env, f"azure-webjobs-blobtrigger-{env['AzureFunctionsWebHost__hostid']}")


def drained(client: QueueClient) -> bool:
    """No message left, visible or held by a running invocation."""
    return client.get_queue_properties().approximate_message_count == 0


def host_json(tmp_path: Path, **settings) -> str:
    """A host.json of the test app's settings changed by ``settings`` ({"queues": {...}, "functionTimeout": ...})."""
    document = json.loads((APP / "host.json").read_text())
    for key, value in settings.items():
        if isinstance(value, dict):
            document["extensions"].setdefault(key, {}).update(value)
        else:
            document[key] = value
    path = tmp_path / "host.json"
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.integration
@pytest.mark.parametrize("app_env", ["identity", "connection string"], indirect=True)
def test_queue_blob_and_timer_triggers_run_end_to_end(app_env):
    queue(app_env, app_env["TEST_QUEUE"]).send_message("hello")
    process = start_devhost(app_env)
    try:
        upload(app_env, "acme/batch-1.csv", b"deviceId\nd1\n")  # after the Event Grid subscription exists
        wait_for(lambda: results(app_env, "queue"), what="the queue function")
        wait_for(lambda: results(app_env, "blob"), what="the blob function")
        wait_for(lambda: results(app_env, "timer"), what="the timer function")
        echo = wait_for(lambda: list(queue(app_env, app_env["TEST_QUEUE"] + "-out").receive_messages()),
                        what="the queue output binding")
    finally:
        output = stop(process)
    assert process.returncode == 0, output
    assert results(app_env, "queue") == [{"body": "hello", "dequeueCount": 1}]
    blob = results(app_env, "blob")[0]
    assert blob == {"name": f"{app_env['TEST_CONTAINER']}/acme/batch-1.csv", "length": 12,
                    "data": "deviceId\nd1\n", "function": "on_blob"}
    assert echo[0].content == "echo:hello"
    assert queue(app_env, app_env["TEST_QUEUE"]).peek_messages() == []


@pytest.mark.integration
def test_a_failing_function_ends_in_the_poison_queue_after_max_dequeue_count(app_env):
    queue(app_env, app_env["TEST_FAIL_QUEUE"]).send_message("doomed")
    process = start_devhost(app_env)
    try:
        poisoned = wait_for(lambda: queue(app_env, app_env["TEST_FAIL_QUEUE"] + "-poison").peek_messages(),
                            what="the poison queue")
    finally:
        stop(process)
    assert [m.content for m in poisoned] == ["doomed"]
    assert sorted(r["dequeueCount"] for r in results(app_env, "fails")) == [1, 2, 3]  # maxDequeueCount 3
    assert queue(app_env, app_env["TEST_FAIL_QUEUE"]).peek_messages() == []


@pytest.mark.integration
def test_blobs_created_while_devhost_was_down_fire_after_a_restart_and_processed_ones_never_again(app_env):
    """The Event Grid subscription outlives the host (Event Grid retries delivery for up to 24 hours:
    learn.microsoft.com/azure/event-grid/delivery-and-retry); an event is delivered once per blob creation."""
    first = start_devhost(app_env)
    upload(app_env, "acme/one.csv", b"1")
    upload(app_env, "acme/two.csv", b"2")
    wait_for(lambda: len(results(app_env, "blob")) == 2 and drained(event_queue(app_env)), what="both blobs")
    first.kill()
    first.communicate(timeout=30)
    upload(app_env, "acme/three.csv", b"3")  # while no host runs
    second = start_devhost(app_env)
    try:
        wait_for(lambda: len(results(app_env, "blob")) >= 3, what="the blob created while devhost was down")
        time.sleep(3)  # several more scans
    finally:
        stop(second)
    names = sorted(r["name"].rsplit("/", 1)[1] for r in results(app_env, "blob"))
    assert names == ["one.csv", "three.csv", "two.csv"]


@pytest.mark.integration
def test_event_grid_blob_trigger_fires_once_per_creation_never_for_old_blobs_metadata_or_tags(app_env):
    """BlobCreated is raised when a blob is created or replaced, not when its metadata or tags change; a
    subscription sees only events after it exists (learn.microsoft.com/azure/event-grid/event-schema-blob-storage,
    learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger)."""
    upload(app_env, "acme/old.csv", b"before the subscription")
    process = start_devhost(app_env)
    try:
        upload(app_env, "acme/new.csv", b"v1")
        wait_for(lambda: results(app_env, "blob"), what="the new blob")
        blob = app_env["_AZURITE"].blob_service().get_blob_client(app_env["TEST_CONTAINER"], "acme/new.csv")
        blob.set_blob_metadata({"output": "changed-after-upload"})
        blob.set_blob_tags({"stage": "tagged"})
        time.sleep(3)  # several scans: nothing fires
        assert [r["data"] for r in results(app_env, "blob")] == ["v1"]
        upload(app_env, "acme/new.csv", b"v2")  # replaced: a new creation
        wait_for(lambda: len(results(app_env, "blob")) == 2, what="the re-upload")
        time.sleep(3)
    finally:
        output = stop(process)
    assert sorted(r["data"] for r in results(app_env, "blob")) == ["v1", "v2"], output


@pytest.mark.integration
def test_a_failing_blob_function_is_retried_then_poisoned_by_the_blob_extension(app_env, tmp_path):
    """Retried through the extension's queue, then a message on webjobs-blobtrigger-poison after
    poisonBlobThreshold attempts (learn.microsoft.com/azure/azure-functions/functions-bindings-storage-blob-trigger
    #poison-blobs, functions-bindings-storage-blob#hostjson-settings)."""
    process = start_devhost(app_env, "--host-json", host_json(tmp_path, blobs={"poisonBlobThreshold": 2}))
    try:
        upload(app_env, "acme/bad.csv", b"fail")
        poison = queue(app_env, "webjobs-blobtrigger-poison")
        mine = wait_for(lambda: [m for m in poison.peek_messages(max_messages=32)
                                 if json.loads(m.content)["ContainerName"] == app_env["TEST_CONTAINER"]],
                        what="the blob poison queue")
    finally:
        output = stop(process)
    assert len(results(app_env, "blob")) == 2, output  # poisonBlobThreshold
    message = json.loads(mine[0].content)
    assert (message["FunctionId"], message["BlobName"]) == ("Host.Functions.on_blob", "acme/bad.csv")
    assert drained(event_queue(app_env))


@pytest.mark.integration
def test_fire_runs_a_timer_on_demand(app_env):
    process = start_devhost(app_env, "--fire", "on_timer")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert results(app_env, "timer") == [{"pastDue": False}]
    bad = start_devhost(app_env, "--fire", "on_message")
    output, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2
    assert "no timer function 'on_message'; timer functions: on_timer" in output


@pytest.mark.integration
def test_a_blob_invocation_longer_than_the_lease_runs_once_even_with_two_hosts(app_env):
    """The event's message is renewed while the function runs (5 s, lease 3 s: renewed every 1.5 s), so neither
    the host running it nor a second instance of the app reading the same event queue runs it again (the host
    renews at half the lease: the Queues extension's QueueListener; learn.microsoft.com/azure/azure-functions/
    functions-bindings-storage-queue-trigger#multiple-instances)."""
    hosts = [start_devhost(app_env, "--message-lease", "3") for _ in range(2)]
    try:
        upload(app_env, "slow.bin", b"x", container="TEST_SLOW_CONTAINER")
        wait_for(lambda: results(app_env, "slow") and drained(event_queue(app_env)), timeout=60,
                 what="the slow invocation to finish")
        time.sleep(3)  # more polls by both hosts
    finally:
        outputs = [stop(host) for host in hosts]
    assert results(app_env, "slow") == [{"name": f"{app_env['TEST_SLOW_CONTAINER']}/slow.bin"}], outputs


@pytest.mark.integration
def test_a_message_dequeued_more_than_max_dequeue_count_is_poisoned_without_invoking(app_env):
    """Each earlier attempt died with its worker (here: received and dropped); the host poisons it first."""
    work = queue(app_env, app_env["TEST_QUEUE"])
    work.send_message("orphan")
    for attempt in range(1, 4):  # maxDequeueCount in devhost_app/host.json
        # Get Messages takes a visibility timeout of 1 s at least; Update Message makes it visible at once.
        [message] = work.receive_messages(visibility_timeout=1)
        assert (message.content, message.dequeue_count) == ("orphan", attempt)
        work.update_message(message, visibility_timeout=0)
    process = start_devhost(app_env)
    try:
        poisoned = wait_for(lambda: queue(app_env, app_env["TEST_QUEUE"] + "-poison").peek_messages(),
                            what="the poison queue")
    finally:
        output = stop(process)
    assert [m.content for m in poisoned] == ["orphan"]
    assert results(app_env, "queue") == [], output
    assert work.peek_messages() == []
    assert "Earlier attempts ended without a result" in output


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda edge: (edge[0], edge[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.integration
def test_queue_concurrency_is_batch_size_plus_new_batch_threshold_per_function(app_env, tmp_path):
    """A batch of batchSize; a new batch only once no more than newBatchThreshold run; so at most their sum at once
    (learn.microsoft.com/azure/azure-functions/functions-bindings-storage-queue-trigger#concurrency; QueuesOptions
    .BatchSize). The worker's 32 threads are not the limit here."""
    work = queue(app_env, app_env["TEST_OVERLAP_QUEUE"])
    for i in range(24):
        work.send_message(str(i))
    process = start_devhost(app_env, "--concurrency", "32",
                            "--host-json", host_json(tmp_path, queues={"batchSize": 4, "newBatchThreshold": 2}))
    try:
        wait_for(lambda: len(results(app_env, "overlap")) == 24, timeout=90, what="24 invocations")
    finally:
        output = stop(process)
    runs = results(app_env, "overlap")
    assert sorted(int(r["body"]) for r in runs) == list(range(24)), output
    assert _max_overlap([(r["start"], r["end"]) for r in runs]) == 6  # 4 + 2, reached and never passed


@pytest.mark.integration
def test_an_invocation_past_function_timeout_is_redelivered_and_counts_toward_poison(app_env, tmp_path):
    """The invocation fails ("Timeout value of ... exceeded"), its message is released and the attempt counts
    toward maxDequeueCount (learn.microsoft.com/azure/azure-functions/functions-host-json#functiontimeout,
    functions-bindings-storage-queue-trigger#poison-messages)."""
    queue(app_env, app_env["TEST_SLEEPY_QUEUE"]).send_message("too slow")
    settings = host_json(tmp_path, functionTimeout="00:00:02", queues={"maxDequeueCount": 2})
    process = start_devhost(app_env, "--host-json", settings)
    try:
        poisoned = wait_for(lambda: queue(app_env, app_env["TEST_SLEEPY_QUEUE"] + "-poison").peek_messages(),
                            timeout=60, what="the poison queue")
    finally:
        output = stop(process)
    assert [m.content for m in poisoned] == ["too slow"]
    assert sorted(r["dequeueCount"] for r in results(app_env, "sleepy")) == [1, 2], output
    assert output.count("ERROR devhost Timeout value of 00:00:02 exceeded by function 'Functions.sleepy'") == 2
    assert "Last error: FunctionTimeout" in output


@pytest.mark.integration
def test_base64_message_encoding_decodes_triggers_encodes_outputs_and_poisons_what_is_not_base64(app_env, tmp_path):
    """messageEncoding base64 (the default): trigger messages are decoded and output messages encoded; one that
    does not decode is moved to the poison queue without an invocation (learn.microsoft.com/azure/azure-functions/
    functions-bindings-storage-queue#hostjson-settings; the Queues extension's MessageDecodingFailed handler)."""
    work = queue(app_env, app_env["TEST_QUEUE"])
    work.send_message(base64.b64encode(b"hello").decode())
    work.send_message("not base64 at all!")
    process = start_devhost(app_env, "--host-json", host_json(tmp_path, queues={"messageEncoding": "base64"}))
    try:
        wait_for(lambda: results(app_env, "queue"), what="the decoded message")
        poisoned = wait_for(lambda: queue(app_env, app_env["TEST_QUEUE"] + "-poison").peek_messages(),
                            what="the message that is not base64")
        echo = wait_for(lambda: list(queue(app_env, app_env["TEST_QUEUE"] + "-out").receive_messages()),
                        what="the output")
    finally:
        output = stop(process)
    assert results(app_env, "queue") == [{"body": "hello", "dequeueCount": 1}], output
    assert [m.content for m in poisoned] == ["not base64 at all!"]
    assert base64.b64decode(echo[0].content) == b"echo:hello"


@pytest.mark.integration
def test_a_failing_timer_is_run_again_by_its_retry_policy(app_env):
    """@app.retry on a timer: the host runs it again, max_retry_count times, delay_interval apart; the function
    sees its retry_context (learn.microsoft.com/azure/azure-functions/functions-bindings-error-pages#retries)."""
    process = start_devhost(app_env, "--fire", "flaky_timer")  # fails twice, then succeeds
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    attempts = sorted(results(app_env, "flaky"), key=lambda r: r["retry"])
    assert [(r["retry"], r["max"]) for r in attempts] == [(0, 2), (1, 2), (2, 2)]
    assert all(b["at"] - a["at"] >= 0.9 for a, b in itertools.pairwise(attempts))  # fixed delay of 1 s
    exhausted = start_devhost({**app_env, "TEST_TIMER_FAILURES": "9"}, "--fire", "flaky_timer")
    output, _ = exhausted.communicate(timeout=60)
    assert exhausted.returncode == 1
    assert "devhost: flaky_timer failed: RuntimeError: attempt 3 fails" in output  # 1 + max_retry_count
    assert len(results(app_env, "flaky")) == 6


def _post(url: str, body, kind: str = "Notification") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "aeg-event-type": kind})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null") or {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null") or {}


@pytest.mark.integration
def test_the_blob_webhook_takes_event_grid_deliveries_as_core_tools_serves_them(app_env):
    """POST /runtime/webhooks/blobs?functionName=Host.Functions.NAME with aeg-event-type (learn.microsoft.com/azure/
    azure-functions/functions-event-grid-blob-trigger; the validation handshake: learn.microsoft.com/azure/
    event-grid/webhook-event-delivery); events of the BlobCreated schema (event-grid/event-schema-blob-storage)."""
    from clients.event_grid import blob_created_event
    from devhost.azurite import free_port

    port = free_port()
    process = start_devhost(app_env, "--event-grid", "webhook", "--webhook-port", str(port))
    url = f"http://127.0.0.1:{port}/runtime/webhooks/blobs?functionName=Host.Functions.on_blob"
    try:
        upload(app_env, "acme/unannounced.csv", b"no event")
        upload(app_env, "acme/announced.csv", b"event")
        blob = app_env["_AZURITE"].blob_service().get_blob_client(app_env["TEST_CONTAINER"], "acme/announced.csv")
        props = blob.get_blob_properties()
        event = blob_created_event(container=app_env["TEST_CONTAINER"], blob="acme/announced.csv", url=blob.url,
                                   etag=props.etag, length=props.size)
        assert _post(url, [{"data": {"validationCode": "abc"}}], "SubscriptionValidation") == \
            (200, {"validationResponse": "abc"})
        assert _post(url, [event], "Nonsense")[0] == 400
        status, body = _post(url, [{**event, "data": {k: v for k, v in event["data"].items() if k != "url"}}])
        assert (status, body) == (400, {"error": "the event's data lacks url"})
        assert _post(url.replace("on_blob", "no_such_function"), [event])[0] == 404
        assert _post(url, [event]) == (202, {})
        wait_for(lambda: results(app_env, "blob"), what="the announced blob")
        time.sleep(3)  # devhost does not poll in webhook mode: the unannounced blob never fires
    finally:
        output = stop(process)
    assert [r["data"] for r in results(app_env, "blob")] == ["event"], output


@pytest.mark.integration
def test_http_triggers_answer_on_api_route_with_the_function_key_as_the_host_asks(app_env):
    """/api/{route} (host.json's default routePrefix); authLevel function: the key in ``code`` or the
    ``x-functions-key`` header, else 401 (learn.microsoft.com/azure/azure-functions/function-keys-how-to); only the
    trigger's methods; a function that raises answers 500 without its cause."""
    import urllib.error
    import urllib.request

    from devhost.azurite import free_port

    port, key = free_port(), "test-function-key-" + os.urandom(8).hex()
    process = start_devhost({**app_env, "DEVHOST_FUNCTION_KEY": key}, "--webhook-port", str(port))

    def call(path: str, method: str = "POST", headers: dict | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"hello" if method == "POST" else None,
                                         method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    try:
        assert call("/api/echo/x")[0] == 401
        assert call("/api/echo/x?code=wrong")[0] == 401
        status, headers, body = call(f"/api/echo/x?code={key}")
        assert (status, headers["x-echo"], json.loads(body)["body"]) == (201, "1", "hello")
        assert call("/api/echo/x", headers={"x-functions-key": key})[0] == 201
        assert call(f"/api/echo/x?code={key}", method="GET")[0] == 404  # the trigger takes POST only
        assert call(f"/api/nothing?code={key}")[0] == 404
        status, _, body = call(f"/api/echo/x?code={key}&fail=1")
        assert status == 500 and b"secret cause" not in body
    finally:
        output = stop(process)
    assert key not in output  # the key is never logged


def test_retry_delays_follow_the_hosts_strategies():
    """Fixed delay; exponential: minimum_interval first, then minimum + rand[0.8, 1.2) * 2^(n-2) * minimum, capped
    at maximum_interval (learn.microsoft.com/azure/azure-functions/functions-bindings-error-pages#retry-strategies)."""
    from devhost.host import RetryPolicy

    fixed = RetryPolicy.from_settings({"strategy": "fixed_delay", "max_retry_count": "2", "delay_interval": "00:00:05"})
    assert [fixed.delay(n) for n in (1, 2)] == [5, 5] and fixed.allows(2) and not fixed.allows(3)
    backoff = RetryPolicy.from_settings({"strategy": "exponential_backoff", "max_retry_count": "-1",
                                         "minimum_interval": "00:01:00", "maximum_interval": "00:30:00"})
    assert [backoff.delay(n, rand=lambda: 0.5) for n in (1, 2, 3, 4)] == [60, 120, 180, 300]
    assert backoff.delay(20, rand=lambda: 0.0) == 1800 and backoff.allows(1000)
