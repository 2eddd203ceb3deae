"""Runs a Python (v2 programming model) function app against Azure Storage (Azurite) without Core Tools.

It knows nothing of this project's functions: it reads each function's trigger from the app's own
metadata (``app.get_functions()`` -> bindings JSON) and drives it the way the Functions host does:

- queue triggers: poll with a visibility lease (renewed while the function runs), pass a
  ``func.QueueMessage`` with its dequeue count, delete on success, make the message visible again
  after ``visibilityTimeout`` on failure, and move it to ``<queue>-poison`` after ``maxDequeueCount``
  tries (both from host.json, as the host reads them);
- blob triggers (``source`` EventGrid or LogsAndContainerScan alike): scan the container, invoke once
  per new blob version (ETag), with receipts in ``azure-webjobs-hosts`` like the host's
  ``blobreceipts/``, so a restart does not re-fire; failures retry up to ``maxDequeueCount`` and then go
  to ``webjobs-blobtrigger-poison``;
- timer triggers: NCRONTAB / TimeSpan schedules (``%SETTING%`` resolved), ``runOnStartup``,
  ``useMonitor`` status blobs (past-due detection across restarts), and on demand (``fire``).

Queue output bindings (``func.Out[str]``) are written after a successful invocation. It is a
development tool, not a runtime: no scale controller, no singleton locks, no HTTP triggers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import inspect
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from .schedule import Schedule

log = logging.getLogger("devhost")
HOSTS_CONTAINER = "azure-webjobs-hosts"
BLOB_POISON_QUEUE = "webjobs-blobtrigger-poison"
_FINAL_RECEIPTS = frozenset({"done", "poisoned", "superseded"})
_SETTING = re.compile(r"%([^%]+)%")


class HostError(Exception):
    """The app or its settings cannot be run as they are (the message says which function and why)."""


def _timespan(value: str | None, default: float) -> float:
    if not value:
        return default
    parts = [float(p) for p in str(value).split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return parts[-3] * 3600 + parts[-2] * 60 + parts[-1]


@dataclass(frozen=True)
class HostConfig:
    """The host.json settings devhost honours (Functions defaults where host.json is silent)."""

    max_dequeue_count: int = 5
    visibility_timeout_s: float = 0.0
    batch_size: int = 16
    max_polling_interval_s: float = 2.0

    @classmethod
    def from_host_json(cls, document: Mapping[str, Any]) -> HostConfig:
        queues = document.get("extensions", {}).get("queues", {})
        return cls(
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            visibility_timeout_s=_timespan(queues.get("visibilityTimeout"), 0.0),
            batch_size=int(queues.get("batchSize", 16)),
            # The host backs off up to a minute on empty queues; devhost caps it to stay snappy.
            max_polling_interval_s=min(_timespan(queues.get("maxPollingInterval"), 2.0), 2.0),
        )


class _Out(func.Out):
    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


@dataclass
class _Context:
    invocation_id: str
    function_name: str
    function_directory: str
    trace_context: Any = None
    retry_context: Any = None
    thread_local_storage: Any = field(default_factory=threading.local)


@dataclass
class Function:
    name: str
    trigger: dict
    outputs: list[dict]
    call: Callable
    parameters: list[str]


def _resolve(value: str, env: Mapping[str, str], where: str) -> str:
    def lookup(match: re.Match) -> str:
        if match.group(1) not in env:
            raise HostError(f"{where}: setting {match.group(1)} is not set")
        return env[match.group(1)]
    return _SETTING.sub(lookup, value)


def load_app(script_root: Path):
    """Import ``function_app.py`` from the script root and return its ``FunctionApp``."""
    path = script_root / "function_app.py"
    if not path.is_file():
        raise HostError(f"{path} does not exist")
    if str(script_root) not in sys.path:
        sys.path.insert(0, str(script_root))
    spec = importlib.util.spec_from_file_location("function_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["function_app"] = module
    spec.loader.exec_module(module)
    apps = [v for v in vars(module).values() if isinstance(v, func.FunctionApp)]
    if len(apps) != 1:
        raise HostError(f"{path} must define exactly one FunctionApp, found {len(apps)}")
    return apps[0]


def read_functions(app, env: Mapping[str, str]) -> dict[str, Function]:
    functions = {}
    for function in app.get_functions():
        name = function.get_function_name()
        bindings = json.loads(function.get_function_json())["bindings"]
        triggers = [b for b in bindings if b["type"].endswith("Trigger")]
        if len(triggers) != 1 or triggers[0]["type"] not in ("queueTrigger", "blobTrigger", "timerTrigger"):
            raise HostError(f"function {name}: devhost runs queue, blob and timer triggers only, "
                            f"not {[b['type'] for b in triggers]}")
        trigger = {k: _resolve(v, env, f"function {name}") if isinstance(v, str) else v
                   for k, v in triggers[0].items()}
        outputs = [b for b in bindings if b["direction"].upper() == "OUT"]
        for output in outputs:
            if output["type"] != "queue":
                raise HostError(f"function {name}: output binding {output['type']} is not supported by devhost")
            output["queueName"] = _resolve(output["queueName"], env, f"function {name}")
        user_function = function.get_user_function()
        parameters = list(inspect.signature(user_function).parameters)
        known = {b["name"] for b in bindings} | {"context"}
        unknown = [p for p in parameters if p not in known]
        if unknown:
            raise HostError(f"function {name}: parameters {unknown} have no binding")
        functions[name] = Function(name, trigger, outputs, user_function, parameters)
    return functions


def _blob_pattern(path: str) -> tuple[str, str, re.Pattern]:
    container, _, rest = path.partition("/")
    prefix = rest.split("{", 1)[0]
    regex = "".join(f"(?P<{p[1:-1]}>.+?)" if p.startswith("{") else re.escape(p)
                    for p in re.split(r"(\{[^}]+\})", rest))
    return container, prefix, re.compile(regex + "$")


@dataclass(eq=False)
class _InFlight:
    queue_client: Any
    message: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def renew(self, seconds: float) -> None:
        with self.lock:
            updated = self.queue_client.update_message(self.message, visibility_timeout=int(seconds))
            self.message.pop_receipt = updated.pop_receipt


@dataclass(eq=False)
class _BlobClaim:
    """A blob receipt this host holds: every write is conditional on the ETag of its own last write."""

    receipt: Any
    state: dict
    etag: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, state: dict) -> None:
        """Replace the receipt; ResourceModifiedError if another host has taken the claim over."""
        with self.lock:
            self._put(state)

    def renew(self) -> None:
        """Refresh ``since`` so that other hosts do not take a long invocation for an abandoned one."""
        with self.lock:
            if self.state["status"] == "running":  # not finished meanwhile
                self._put({**self.state, "since": time.time()})

    def _put(self, state: dict) -> None:
        result = self.receipt.upload_blob(json.dumps(state), overwrite=True, etag=self.etag,
                                          match_condition=MatchConditions.IfNotModified)
        self.state, self.etag = state, result["etag"]


class FunctionHost:
    def __init__(self, app, env: Mapping[str, str], *, host_config: HostConfig | None = None,
                 concurrency: int = 4, message_lease_s: float = 60.0, poll_interval_s: float = 0.25,
                 host_id: str = "devhost"):
        self.env = dict(env)
        self.config = host_config or HostConfig()
        self.functions = read_functions(app, self.env)
        self.concurrency = concurrency
        self.message_lease_s = message_lease_s
        self.poll_interval_s = poll_interval_s
        self.host_id = host_id
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="devhost")
        self._slots = threading.Semaphore(concurrency)
        self._inflight: set[_InFlight] = set()
        self._claims: dict[str, _BlobClaim] = {}  # by receipt name: blobs being invoked, not to be claimed again
        self._finished: set[str] = set()  # receipt names known final, so scans need not download them again
        self._busy = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._queues: dict[str, Any] = {}
        self._blob_services: dict[Any, BlobServiceClient] = {}
        self._queue_services: dict[Any, QueueServiceClient] = {}
        self._next_timer: dict[str, dt.datetime] = {}
        self._next_scan: dict[str, float] = {}
        self.blob_scan_interval_s = 1.0
        self.stats = {"invocations": 0, "succeeded": 0, "failed": 0, "poisoned": 0}

    # -- connections -------------------------------------------------------------------
    def _connection(self, binding: dict):
        """The binding's storage connection, resolved as the host does: a connection string, or identity-based
        (``<name>__blobServiceUri`` / ``__queueServiceUri`` / ``__credential`` / ``__clientId``)."""
        from settings import SettingsError, storage_connection

        name = binding.get("connection") or "AzureWebJobsStorage"
        try:
            return storage_connection(self.env, name)
        except SettingsError as exc:
            raise HostError(str(exc)) from None

    def _blob_service(self, binding: dict) -> BlobServiceClient:
        from clients.storage import blob_service_client

        connection = self._connection(binding)
        if connection not in self._blob_services:
            self._blob_services[connection] = blob_service_client(connection, ca=self.env.get("EMULATOR_CA_PATH"))
        return self._blob_services[connection]

    def _queue(self, binding: dict, name: str):
        from clients.storage import queue_service_client

        connection = self._connection(binding)
        key = (connection, name)
        if key not in self._queues:
            if connection not in self._queue_services:
                self._queue_services[connection] = queue_service_client(connection,
                                                                        ca=self.env.get("EMULATOR_CA_PATH"))
            client = self._queue_services[connection].get_queue_client(name)
            try:
                client.create_queue()
            except ResourceExistsError:
                pass
            self._queues[key] = client
        return self._queues[key]

    def _hosts_container(self):
        anyone = next(iter(self.functions.values()), None)
        binding = anyone.trigger if anyone else {}
        container = self._blob_service(binding).get_container_client(HOSTS_CONTAINER)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return container

    # -- invoking ------------------------------------------------------------------------
    def _invoke(self, function: Function, trigger_value: Any) -> None:
        invocation_id = str(uuid.uuid4())
        kwargs: dict[str, Any] = {function.trigger["name"]: trigger_value}
        outs = {o["name"]: _Out() for o in function.outputs}
        kwargs.update(outs)
        if "context" in function.parameters:
            kwargs["context"] = _Context(invocation_id, function.name, str(Path.cwd()))
        with self._lock:
            self.stats["invocations"] += 1
        log.info("Executing '%s' (id=%s)", function.name, invocation_id)
        try:
            result = function.call(**{k: v for k, v in kwargs.items() if k in function.parameters})
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except Exception:
            with self._lock:
                self.stats["failed"] += 1
            log.exception("Executed '%s' (Failed, id=%s)", function.name, invocation_id)
            raise
        for output in function.outputs:
            value = outs[output["name"]].get()
            for item in (value if isinstance(value, list) else [value] if value is not None else []):
                self._queue(output, output["queueName"]).send_message(
                    item if isinstance(item, str) else json.dumps(item))
        with self._lock:
            self.stats["succeeded"] += 1
        log.info("Executed '%s' (Succeeded, id=%s)", function.name, invocation_id)

    def _submit(self, work: Callable[[], None]) -> Future:
        with self._lock:
            self._busy += 1

        def run() -> None:
            try:
                work()
            except Exception:  # noqa: BLE001 - function failures are handled inside; this is storage or devhost
                log.exception("devhost could not complete an invocation's bookkeeping")
            finally:
                with self._lock:
                    self._busy -= 1
                self._slots.release()
        return self._executor.submit(run)

    # -- queue triggers ---------------------------------------------------------------------
    def _poll_queue(self, function: Function) -> int:
        queue_name = function.trigger["queueName"]
        client = self._queue(function.trigger, queue_name)
        started = 0
        while self._slots.acquire(blocking=False):
            messages = list(client.receive_messages(max_messages=1, visibility_timeout=int(self.message_lease_s)))
            if not messages:
                self._slots.release()
                break
            inflight = _InFlight(client, messages[0])
            with self._lock:
                self._inflight.add(inflight)
            self._submit(lambda f=function, i=inflight: self._handle_message(f, i))
            started += 1
        return started

    def _handle_message(self, function: Function, inflight: _InFlight) -> None:
        try:
            if inflight.message.dequeue_count > self.config.max_dequeue_count:
                # Every earlier attempt died with its worker, before any failure could be handled; the host
                # poisons such a message before invoking (QueueProcessor.BeginProcessingMessageAsync).
                self._poison_message(function, inflight, "Earlier attempts ended without a result.")
            else:
                self._invoke_message(function, inflight)
        finally:
            with self._lock:
                self._inflight.discard(inflight)

    def _invoke_message(self, function: Function, inflight: _InFlight) -> None:
        message = inflight.message
        body = message.content if isinstance(message.content, (str, bytes)) else str(message.content)
        value = QueueMessage(id=message.id, body=body, pop_receipt=message.pop_receipt,
                                  dequeue_count=message.dequeue_count, insertion_time=message.inserted_on,
                                  expiration_time=message.expires_on)
        try:
            self._invoke(function, value)
        except Exception as exc:  # noqa: BLE001 - the host's retry/poison decision
            if message.dequeue_count >= self.config.max_dequeue_count:
                self._poison_message(function, inflight, f"Last error: {type(exc).__name__}: {exc}")
            else:
                with inflight.lock:
                    inflight.queue_client.update_message(message, visibility_timeout=int(
                        self.config.visibility_timeout_s))
        else:
            with inflight.lock:
                inflight.queue_client.delete_message(message.id, message.pop_receipt)

    def _poison_message(self, function: Function, inflight: _InFlight, why: str) -> None:
        message = inflight.message
        poison = f"{function.trigger['queueName']}-poison"
        with inflight.lock:
            self._queue(function.trigger, poison).send_message(message.content)
            inflight.queue_client.delete_message(message.id, message.pop_receipt)
        with self._lock:
            self.stats["poisoned"] += 1
        log.error("Message %s has reached MaxDequeueCount of %d; moved to %s. %s",
                  message.id, self.config.max_dequeue_count, poison, why)

    def _renew_leases(self) -> None:
        with self._lock:
            inflight = list(self._inflight)
            claims = list(self._claims.values())
        for item in inflight:
            try:
                item.renew(self.message_lease_s)
            except (ResourceNotFoundError, ResourceModifiedError):
                pass  # finished meanwhile
            except Exception:  # noqa: BLE001 - a failed renewal only risks a redelivery, which handlers tolerate
                log.warning("could not renew the lease of message %s", item.message.id, exc_info=True)
        for claim in claims:
            try:
                claim.renew()
            except Exception:  # noqa: BLE001 - as above; a lost claim is reported when the invocation ends
                log.warning("could not renew blob receipt %s", claim.receipt.blob_name, exc_info=True)

    # -- blob triggers -------------------------------------------------------------------------
    def _receipt_name(self, function: Function, container: str, blob_name: str, etag: str) -> str:
        return f"blobreceipts/{self.host_id}/{function.name}/{etag.strip(chr(34))}/{container}/{blob_name}"

    def _scan_blobs(self, function: Function) -> int:
        container_name, prefix, pattern = _blob_pattern(function.trigger["path"])
        service = self._blob_service(function.trigger)
        container = service.get_container_client(container_name)
        receipts = self._hosts_container()
        started = 0
        try:
            blobs = list(container.list_blobs(name_starts_with=prefix or None, include=["metadata"]))
        except ResourceNotFoundError:
            return 0
        for blob in blobs:
            if not pattern.match(blob.name):
                continue
            name = self._receipt_name(function, container_name, blob.name, blob.etag)
            with self._lock:
                if name in self._claims or name in self._finished:
                    continue
            claim = self._claim_receipt(receipts.get_blob_client(name))
            if claim is None:
                continue
            if not self._slots.acquire(blocking=False):
                claim.write({"status": "failed", "attempts": claim.state["attempts"] - 1,
                             "since": claim.state["since"], "retryAt": 0})
                break
            with self._lock:
                self._claims[name] = claim
            self._submit(lambda f=function, c=container, b=blob, s=claim: self._handle_blob(f, c, b, s))
            started += 1
        return started

    def _claim_receipt(self, receipt) -> _BlobClaim | None:
        """Claim a blob version for this host: create its receipt, or take over a retryable one."""
        now = time.time()
        claim = {"status": "running", "attempts": 1, "since": now}
        try:
            result = receipt.upload_blob(json.dumps(claim), overwrite=False)
            return _BlobClaim(receipt, claim, result["etag"])
        except ResourceExistsError:
            pass
        try:
            download = receipt.download_blob()
            state = json.loads(download.readall())
        except ResourceNotFoundError:
            return None
        if state["status"] in _FINAL_RECEIPTS:
            with self._lock:
                self._finished.add(receipt.blob_name)
            return None
        retryable = state["status"] == "failed" and now >= state.get("retryAt", 0)
        abandoned = state["status"] == "running" and now - state["since"] > self.message_lease_s
        if not (retryable or abandoned):
            return None
        claim = {"status": "running", "attempts": state["attempts"] + 1, "since": now}
        try:
            result = receipt.upload_blob(json.dumps(claim), overwrite=True, etag=download.properties.etag,
                                         match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceExistsError):
            return None
        return _BlobClaim(receipt, claim, result["etag"])

    def _finish_blob(self, claim: _BlobClaim, **changes: Any) -> bool:
        """Record the invocation's outcome in the receipt; False if another host has taken the claim over."""
        try:
            claim.write({**claim.state, **changes})
        except ResourceModifiedError:
            log.warning("blob receipt %s was taken over by another host meanwhile; leaving it to that host",
                        claim.receipt.blob_name)
            return False
        return True

    def _handle_blob(self, function: Function, container, blob, claim: _BlobClaim) -> None:
        try:
            self._invoke_blob(function, container, blob, claim)
        finally:
            with self._lock:
                del self._claims[claim.receipt.blob_name]
                if claim.state["status"] in _FINAL_RECEIPTS:
                    self._finished.add(claim.receipt.blob_name)

    def _invoke_blob(self, function: Function, container, blob, claim: _BlobClaim) -> None:
        client = container.get_blob_client(blob.name)
        try:
            data = client.download_blob(etag=blob.etag,
                                        match_condition=MatchConditions.IfNotModified
                                        ).readall()
        except (ResourceNotFoundError, ResourceModifiedError):
            self._finish_blob(claim, status="superseded")
            return  # deleted or overwritten meanwhile: the new version gets its own receipt
        stream = func.blob.InputStream(data=data, name=f"{container.container_name}/{blob.name}", uri=client.url,
                                       length=len(data), metadata=blob.metadata or {},
                                       blob_properties={"ETag": blob.etag, "Length": len(data)})
        try:
            self._invoke(function, stream)
        except Exception as exc:  # noqa: BLE001 - retry, then poison, as the host does for blob triggers
            if claim.state["attempts"] < self.config.max_dequeue_count:
                self._finish_blob(claim, status="failed", retryAt=time.time() + self.config.visibility_timeout_s)
            elif self._finish_blob(claim, status="poisoned", error=type(exc).__name__):
                self._queue(function.trigger, BLOB_POISON_QUEUE).send_message(json.dumps({
                    "Type": "BlobTrigger", "FunctionId": f"{self.host_id}.{function.name}", "BlobType": "BlockBlob",
                    "ContainerName": container.container_name, "BlobName": blob.name, "ETag": blob.etag}))
                with self._lock:
                    self.stats["poisoned"] += 1
                log.error("Blob %s/%s failed %d times; sent to %s", container.container_name, blob.name,
                          claim.state["attempts"], BLOB_POISON_QUEUE)
        else:
            self._finish_blob(claim, status="done")

    # -- timers ----------------------------------------------------------------------------------
    def _timer_status(self, function: Function):
        return self._hosts_container().get_blob_client(f"timers/{self.host_id}/{function.name}/status")

    def _start_timers(self, now: dt.datetime) -> None:
        for function in self._timers():
            schedule = Schedule.parse(function.trigger["schedule"])
            due = schedule.next_after(now)
            past_due = False
            if function.trigger.get("useMonitor", True):
                try:
                    status = json.loads(self._timer_status(function).download_blob().readall())
                    recorded = dt.datetime.fromisoformat(status["Next"])
                    if recorded <= now:
                        due, past_due = now, True
                except ResourceNotFoundError:
                    pass
            if function.trigger.get("runOnStartup"):
                due = now
            self._next_timer[function.name] = due
            if past_due:
                log.info("timer %s is past due: firing now", function.name)

    def _timers(self) -> list[Function]:
        return [f for f in self.functions.values() if f.trigger["type"] == "timerTrigger"]

    def fire(self, name: str, *, past_due: bool = False) -> None:
        """Run a timer function now, in this thread (raises what the function raises)."""
        function = self.functions.get(name)
        if function is None or function.trigger["type"] != "timerTrigger":
            timers = ", ".join(f.name for f in self._timers()) or "none"
            raise HostError(f"no timer function {name!r}; timer functions: {timers}")
        schedule = Schedule.parse(function.trigger["schedule"])
        now = dt.datetime.now(dt.timezone.utc)
        request = TimerRequest(past_due=past_due, schedule={"AdjustForDST": False},
                                    schedule_status={"Last": now.isoformat(), "Next": schedule.next_after(now).isoformat()})
        self._invoke(function, request)
        if function.trigger.get("useMonitor", True):
            self._timer_status(function).upload_blob(json.dumps({
                "Last": now.isoformat(), "Next": schedule.next_after(now).isoformat(),
                "LastUpdated": now.isoformat()}), overwrite=True)

    def _fire_scheduled(self, name: str, past_due: bool) -> None:
        try:
            self.fire(name, past_due=past_due)
        except Exception:  # noqa: BLE001 - logged by _invoke; the next occurrence runs as scheduled
            pass

    def _tick_timers(self, now: dt.datetime) -> int:
        started = 0
        for name, due in list(self._next_timer.items()):
            if due <= now and self._slots.acquire(blocking=False):
                self._next_timer[name] = Schedule.parse(self.functions[name].trigger["schedule"]).next_after(now)
                self._submit(lambda n=name, late=(now - due).total_seconds() > 1: self._fire_scheduled(n, late))
                started += 1
        return started

    # -- the loop ----------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """One pass over every trigger; the number of invocations started."""
        started = 0
        for function in self.functions.values():
            kind = function.trigger["type"]
            try:
                if kind == "queueTrigger":
                    started += self._poll_queue(function)
                elif kind == "blobTrigger" and time.monotonic() >= self._next_scan.get(function.name, 0.0):
                    # Listing a container costs Azurite a walk over its blobs: scan once a second, not every poll
                    # (Event Grid delivery on Azure takes seconds too).
                    self._next_scan[function.name] = time.monotonic() + self.blob_scan_interval_s
                    started += self._scan_blobs(function)
            except HostError:
                raise
            except Exception:  # noqa: BLE001 - storage hiccup: log, keep polling (the host does the same)
                log.warning("polling %s failed; retrying", function.name, exc_info=True)
        return started + self._tick_timers(dt.datetime.now(dt.timezone.utc))

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def run(self, stop: threading.Event | None = None, *, until_idle: float | None = None) -> None:
        """Poll until ``stop`` is set, or (``until_idle``) until nothing ran for that many seconds."""
        stop = stop or self._stop
        self._start_timers(dt.datetime.now(dt.timezone.utc))
        last_renewal = last_activity = time.monotonic()
        while not stop.is_set():
            started = self.poll_once()
            now = time.monotonic()
            if started or self.busy:
                last_activity = now
            elif until_idle is not None and now - last_activity >= until_idle:
                break
            last_renewal = self._renew_when_due(last_renewal)
            if not started:
                stop.wait(self.poll_interval_s)
        # In-flight work keeps its leases until it ends: a lapsed lease would hand its message or blob to
        # another poller (or to this host's next start) while it still runs.
        while self.busy:
            last_renewal = self._renew_when_due(last_renewal)
            time.sleep(self.poll_interval_s)
        self.close(wait=True)

    def _renew_when_due(self, last_renewal: float) -> float:
        """Renew leases and receipts every half lease; the time of the last renewal."""
        now = time.monotonic()
        if now - last_renewal < self.message_lease_s / 2:
            return last_renewal
        self._renew_leases()
        return now

    def stop(self) -> None:
        self._stop.set()

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)
