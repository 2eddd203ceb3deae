"""devhost drives any v2 function app against Azurite: queue, blob and timer triggers, poison, receipts."""

from __future__ import annotations

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
from devhost.stack import app_settings

REPO = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "devhost_app"


def test_ncrontab_schedules():
    import datetime as dt

    at = dt.datetime(2026, 11, 29, 2, 30, 10, tzinfo=dt.timezone.utc)
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

    @app.route(route="x")
    def http(req: func.HttpRequest) -> func.HttpResponse:  # pragma: no cover - never invoked
        return func.HttpResponse("x")

    with pytest.raises(HostError, match="function http: devhost runs queue, blob and timer triggers only"):
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
    }


def start_devhost(env: dict, *extra: str) -> subprocess.Popen:
    settings = {k: v for k, v in env.items() if not k.startswith("_")}
    return subprocess.Popen([sys.executable, "-m", "devhost", "--script-root", str(APP), "--log-level", "WARNING",
                             "--message-lease", "10", *extra],
                            cwd=REPO, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **settings},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output


def results(env: dict, kind: str) -> list[dict]:
    container = env["_AZURITE"].blob_service().get_container_client(env["TEST_RESULTS"])
    if not container.exists():
        return []
    return [json.loads(container.download_blob(b.name).readall()) for b in container.list_blobs(f"{kind}/")]


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def queue(env: dict, name: str) -> QueueClient:
    return env["_AZURITE"].queue_client(name)


def upload(env: dict, name: str, data: bytes, container: str = "TEST_CONTAINER") -> None:
    service = env["_AZURITE"].blob_service()
    client = service.get_container_client(env[container])
    if not client.exists():
        client.create_container()
    client.upload_blob(name, data, overwrite=True)


def receipts(env: dict, function: str) -> list[dict]:
    container = env["_AZURITE"].blob_service().get_container_client("azure-webjobs-hosts")
    if not container.exists():
        return []
    return [json.loads(container.download_blob(b.name).readall())
            for b in container.list_blobs(f"blobreceipts/devhost/{function}/")]


@pytest.mark.integration
@pytest.mark.parametrize("app_env", ["identity", "connection string"], indirect=True)
def test_queue_blob_and_timer_triggers_run_end_to_end(app_env):
    queue(app_env, app_env["TEST_QUEUE"]).send_message("hello")
    upload(app_env, "acme/batch-1.csv", b"deviceId\nd1\n")
    process = start_devhost(app_env)
    try:
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
def test_killing_and_restarting_devhost_does_not_refire_processed_blobs(app_env):
    upload(app_env, "acme/one.csv", b"1")
    upload(app_env, "acme/two.csv", b"2")
    first = start_devhost(app_env)
    wait_for(lambda: len(results(app_env, "blob")) == 2, what="both blobs")
    first.kill()
    first.communicate(timeout=30)
    second = start_devhost(app_env)
    try:
        upload(app_env, "acme/three.csv", b"3")
        wait_for(lambda: len(results(app_env, "blob")) >= 3, what="the new blob after the restart")
        time.sleep(2)  # several more scans
    finally:
        stop(second)
    names = sorted(r["name"].rsplit("/", 1)[1] for r in results(app_env, "blob"))
    assert names == ["one.csv", "three.csv", "two.csv"]
    upload(app_env, "acme/one.csv", b"1 again")  # a new version is a new blob for the trigger
    third = start_devhost(app_env)
    try:
        wait_for(lambda: len(results(app_env, "blob")) == 4, what="the new version")
    finally:
        stop(third)


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
    """The receipt is renewed while the function runs (5 s, lease 3 s): neither the host running it nor a
    second host polling the same receipts takes it for abandoned."""
    hosts = [start_devhost(app_env, "--message-lease", "3") for _ in range(2)]
    try:
        upload(app_env, "slow.bin", b"x", container="TEST_SLOW_CONTAINER")
        wait_for(lambda: [r for r in receipts(app_env, "slow_blob") if r["status"] == "done"], timeout=60,
                 what="the slow invocation to finish")
        time.sleep(3)  # more scans by both hosts
    finally:
        outputs = [stop(host) for host in hosts]
    assert results(app_env, "slow") == [{"name": f"{app_env['TEST_SLOW_CONTAINER']}/slow.bin"}], outputs
    assert [r["status"] for r in receipts(app_env, "slow_blob")] == ["done"]
    assert "taken over by another host" not in "".join(outputs)


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
