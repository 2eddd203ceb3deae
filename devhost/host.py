"""Runs a Python (v2 programming model) function app against Azure Storage (Azurite) without Core Tools.

It knows nothing of this project's functions: it reads each function's trigger from the app's own metadata
(``app.get_functions()`` -> bindings JSON, retry settings) and drives it the way the Functions host does. Each
rule follows the host's documentation or source (references in the code):

- queue triggers, per function and per instance: up to ``batchSize`` messages fetched at once, more fetched only
  when no more than ``newBatchThreshold`` are running (so at most ``batchSize + newBatchThreshold``); messages held
  by the host's own lease (10 minutes, renewed every 5 while the function runs); after a failure visible again
  after ``visibilityTimeout``; ``<queue>-poison`` after ``maxDequeueCount`` tries; ``messageEncoding`` base64 or
  none (a message that is not base64 under base64 goes straight to poison);
- ``functionTimeout``: an invocation past it is failed ("Timeout value of ... exceeded") and its message released,
  the attempt counting toward poison; the Python thread cannot be killed, so it is abandoned;
- blob triggers with ``source="EventGrid"``: fired by ``Microsoft.Storage.BlobCreated`` events only, once per
  creation, never for blobs that existed before the subscription, never for metadata or tag changes. devhost is
  Azurite's Event Grid (it turns new blob creations into events) or receives events on the host's webhook
  (``--event-grid webhook``: ``POST /runtime/webhooks/blobs?functionName=Host.Functions.NAME``, as Core Tools
  does). Either way an event becomes a message on ``azure-webjobs-blobtrigger-{hostId}``, run with the blob
  extension's queue settings and poisoned to ``webjobs-blobtrigger-poison`` after ``poisonBlobThreshold`` tries;
- blob triggers polling the container (``LogsAndContainerScan``): every new blob version, with receipts in
  ``azure-webjobs-hosts`` (``blobreceipts/``);
- timer triggers: NCRONTAB / TimeSpan schedules, ``runOnStartup``, ``useMonitor`` status blobs (past-due detection
  across restarts), the function's retry policy (``@app.retry``: fixed delay or exponential backoff), and on
  demand (``fire``).

Sync functions run on a thread pool of ``concurrency`` threads, as the Python worker runs them on its own
(``PYTHON_THREADPOOL_THREAD_COUNT``). Queue output bindings are written after a successful invocation. It is a
development tool, not a runtime: no scale controller, no singleton locks, no HTTP triggers, no dynamic concurrency.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import datetime as dt
import importlib.util
import inspect
import json
import logging
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import azure.functions as func
from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from clients.event_grid import blob_created_event
from settings import HostLimits, timespan

from .schedule import Schedule

log = logging.getLogger("devhost")
HOSTS_CONTAINER = "azure-webjobs-hosts"
BLOB_POISON_QUEUE = "webjobs-blobtrigger-poison"
_FINAL_RECEIPTS = frozenset({"done", "poisoned", "superseded"})
_SETTING = re.compile(r"%([^%]+)%")
# The listener receives messages invisible for 10 minutes and renews that every half of it while the function runs
# (Microsoft.Azure.WebJobs.Extensions.Storage.Queues QueueListener: _visibilityTimeout, visibilityTimeout / 2).
HOST_MESSAGE_LEASE_S = 600.0
CORES = os.cpu_count() or 1


class HostError(Exception):
    """The app or its settings cannot be run as they are (the message says which function and why)."""


class FunctionTimeout(Exception):
    """An invocation ran past ``functionTimeout``."""


@dataclass(frozen=True)
class HostConfig:
    """The host.json settings devhost honours, with the host's defaults where host.json is silent
    (learn.microsoft.com/azure/azure-functions/functions-bindings-storage-queue#hostjson-settings,
    functions-bindings-storage-blob#hostjson-settings, functions-host-json#functiontimeout)."""

    max_dequeue_count: int = 5
    visibility_timeout_s: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int | None = None  # None: batchSize / 2 times the cores
    max_polling_interval_s: float = 2.0
    message_encoding: str = "base64"
    function_timeout_s: float | None = 1800.0  # Flex Consumption, Premium, Dedicated: 30 minutes
    blob_poison_threshold: int = 5
    blob_max_parallelism: int = 8 * CORES

    @classmethod
    def from_host_json(cls, document: Mapping[str, Any]) -> HostConfig:
        extensions = document.get("extensions", {})
        queues, blobs = extensions.get("queues", {}), extensions.get("blobs", {})
        encoding = str(queues.get("messageEncoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise HostError(f"host.json extensions.queues.messageEncoding: {encoding!r} is not base64 or none")
        limits = HostLimits.of(document, CORES)
        if not 1 <= limits.batch_size <= 32:
            raise HostError(f"host.json extensions.queues.batchSize: {limits.batch_size} is not 1-32")
        return cls(
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            visibility_timeout_s=timespan(queues.get("visibilityTimeout"), 0.0) or 0.0,
            batch_size=limits.batch_size,
            new_batch_threshold=limits.new_batch_threshold,
            # The host caps the back-off at 2 s in Development, which devhost always is.
            max_polling_interval_s=min(timespan(queues.get("maxPollingInterval"), 2.0) or 2.0, 2.0),
            message_encoding=encoding,
            function_timeout_s=limits.function_timeout_s,
            blob_poison_threshold=int(blobs.get("poisonBlobThreshold", 5)),
            blob_max_parallelism=int(blobs.get("maxDegreeOfParallelism", 8 * CORES)),
        )

    @property
    def threshold(self) -> int:
        return self.new_batch_threshold if self.new_batch_threshold is not None else self.batch_size // 2 * CORES

    def for_blob_events(self) -> HostConfig:
        """The queue settings of the blob extension's own queue: from ``maxDegreeOfParallelism`` and
        ``poisonBlobThreshold`` (SharedBlobQueueListenerFactory.BlobsOptionsToQueuesOptions)."""
        batch = min(32, self.blob_max_parallelism // 2 + 1)
        return HostConfig(max_dequeue_count=self.blob_poison_threshold, visibility_timeout_s=0.0, batch_size=batch,
                          new_batch_threshold=max(0, self.blob_max_parallelism - batch),
                          max_polling_interval_s=self.max_polling_interval_s, message_encoding="none",
                          function_timeout_s=self.function_timeout_s)


class _Out(func.Out):
    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


@dataclass
class _RetryContext:
    retry_count: int
    max_retry_count: int
    exception: Any = None


@dataclass
class _Context:
    invocation_id: str
    function_name: str
    function_directory: str
    trace_context: Any = None
    retry_context: Any = None
    thread_local_storage: Any = field(default_factory=threading.local)


@dataclass(frozen=True)
class RetryPolicy:
    """``@app.retry``: the host runs a failed invocation again, ``max_retry_count`` times (-1: forever), waiting a
    fixed delay or, exponentially, ``minimum`` first and then ``minimum + rand[0.8, 1.2) * 2^(n-2) * minimum`` up to
    ``maximum`` (RandomizedExponentialBackoffStrategy; learn.microsoft.com/azure/azure-functions/
    functions-bindings-error-pages#retries)."""

    strategy: str
    max_retry_count: int
    delay_s: float = 0.0
    minimum_s: float = 0.0
    maximum_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> RetryPolicy | None:
        if not settings:
            return None
        strategy = "fixed_delay" if settings.get("strategy") == "fixed_delay" else "exponential_backoff"
        return cls(strategy, int(settings.get("max_retry_count", 0)),
                   delay_s=timespan(settings.get("delay_interval"), 0.0) or 0.0,
                   minimum_s=timespan(settings.get("minimum_interval"), 0.0) or 0.0,
                   maximum_s=timespan(settings.get("maximum_interval"), 0.0) or 0.0)

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        if self.strategy == "fixed_delay":
            return self.delay_s
        if retry <= 1:
            return self.minimum_s
        return min(self.maximum_s, self.minimum_s + (0.8 + 0.4 * rand()) * 2 ** (retry - 2) * self.minimum_s)

    def allows(self, retry: int) -> bool:
        return self.max_retry_count == -1 or retry <= self.max_retry_count


def run_with_retries(policy: RetryPolicy | None, attempt: Callable[[_RetryContext | None], Any], *,
                     wait: Callable[[float], bool], name: str = "function") -> Any:
    """The host's retry loop (FunctionExecutorExtensions.TryExecuteAsync): a failed attempt runs again by the
    policy, each a new invocation with its ``retry_context``, until one succeeds or the retries are spent (then
    the last error is raised). ``wait(seconds)`` sleeps between attempts and returns True if the host stops."""
    retry = 0
    while True:
        try:
            return attempt(_RetryContext(retry, policy.max_retry_count) if policy else None)
        except Exception:
            retry += 1
            if policy is None or not policy.allows(retry):
                raise
            delay = policy.delay(retry)
            log.warning("Executed '%s' failed; retry %d of %s in %.1f s", name, retry, policy.max_retry_count, delay)
            if wait(delay):
                raise


@dataclass
class Function:
    name: str
    trigger: dict
    outputs: list[dict]
    call: Callable
    parameters: list[str]
    retry: RetryPolicy | None = None

    @property
    def event_grid(self) -> bool:
        return self.trigger["type"] == "blobTrigger" and str(self.trigger.get("source", "")).lower() == "eventgrid"


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
        if len(triggers) != 1 or triggers[0]["type"] not in ("queueTrigger", "blobTrigger", "timerTrigger",
                                                             "httpTrigger"):
            raise HostError(f"function {name}: devhost runs queue, blob, timer and HTTP triggers only, "
                            f"not {[b['type'] for b in triggers]}")
        trigger = {k: _resolve(v, env, f"function {name}") if isinstance(v, str) else v
                   for k, v in triggers[0].items()}
        # an HTTP trigger's response is its return value (the "$return" http output binding), not an output to write
        outputs = [b for b in bindings if b["direction"].upper() == "OUT" and b["type"] != "http"]
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
        # The Python worker sends the retry policy to the host as RpcRetryOptions (azure-functions-python-worker
        # loader.build_retry_protos); it is not in the bindings JSON.
        retry = RetryPolicy.from_settings(function.get_settings_dict("retry_policy"))
        functions[name] = Function(name, trigger, outputs, user_function, parameters, retry)
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


@dataclass
class _Poller:
    """One queue the host listens to: the function(s) it feeds, its settings, how many of its messages run."""

    queue: str
    binding: dict
    config: HostConfig
    handle: Callable[[_InFlight], None]
    running: int = 0
    backoff_s: float = 0.0
    next_poll: float = 0.0


_EVENT_FIELDS = ("id", "topic", "subject", "eventType", "eventTime", "data", "dataVersion", "metadataVersion")
# What the event schema requires of the data (accessTier, storageDiagnostics: GeneratedSystemEvents.json in the REST
# specs; see tests/contracts/eventgrid-blob-created.json) and what Storage always sends and the extension reads.
_DATA_FIELDS = ("api", "eTag", "contentLength", "blobType", "accessTier", "url", "sequencer", "storageDiagnostics")


def event_problem(event: Any) -> str | None:
    """What makes ``event`` not a BlobCreated event of the documented schema, or None."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    missing = [f for f in _EVENT_FIELDS if f not in event]
    if missing:
        return f"the event lacks {', '.join(missing)}"
    data = event["data"]
    if not isinstance(data, dict) or [f for f in _DATA_FIELDS if f not in data]:
        return ("the event's data lacks "
                + ", ".join(f for f in _DATA_FIELDS if not isinstance(data, dict) or f not in data))
    if event["eventType"] != "Microsoft.Storage.BlobCreated":
        return f"eventType {event['eventType']!r}: a blob trigger's subscription delivers Microsoft.Storage.BlobCreated"
    if not re.fullmatch(r"/blobServices/default/containers/[^/]+/blobs/.+", str(event["subject"])):
        return f"subject {event['subject']!r} is not /blobServices/default/containers/NAME/blobs/NAME"
    return None


def _container_and_blob(url: str) -> tuple[str, str]:
    """A blob URL's container and name: ``https://ACCOUNT.blob.core.windows.net/C/NAME``, or path-style as
    emulators serve it (``https://127.0.0.1:PORT/ACCOUNT/C/NAME``), as ``BlobUriBuilder`` reads both."""
    split = urlsplit(url)
    path = unquote(split.path).lstrip("/")
    if re.fullmatch(r"[\d.]+|localhost|\[[0-9a-fA-F:]+\]", split.hostname or ""):
        path = path.split("/", 1)[1] if "/" in path else ""
    container, _, blob = path.partition("/")
    if not container or not blob:
        raise ValueError(f"data.url {url!r} does not name a blob")
    return container, blob


class FunctionHost:
    def __init__(self, app, env: Mapping[str, str], *, host_config: HostConfig | None = None,
                 concurrency: int = 4, message_lease_s: float = HOST_MESSAGE_LEASE_S, poll_interval_s: float = 0.25,
                 host_id: str = "devhost", event_grid: str = "poll"):
        if event_grid not in ("poll", "webhook"):
            raise HostError(f"event_grid: {event_grid!r} is not poll or webhook")
        self.env = dict(env)
        self.config = host_config or HostConfig()
        self.functions = read_functions(app, self.env)
        self.concurrency = concurrency
        self.message_lease_s = message_lease_s
        self.poll_interval_s = poll_interval_s
        self.host_id = host_id
        self.event_grid = event_grid
        # The Python worker's thread pool (sync functions run there) and the host's own dispatch threads, which
        # hold the messages, wait for the worker and enforce functionTimeout.
        self._worker = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="worker")
        self._dispatch = ThreadPoolExecutor(max_workers=256, thread_name_prefix="host")
        self._inflight: set[_InFlight] = set()
        self._claims: dict[str, _BlobClaim] = {}  # by receipt name: blobs being invoked, not to be claimed again
        self._finished: set[str] = set()  # receipt names known final, so scans need not download them again
        self._announced: set[str] = set()  # event receipts this host created or saw (no need to re-check them)
        self._subscriptions: dict[str, tuple[dt.datetime, frozenset[str]]] = {}
        self._busy = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._queues: dict[Any, Any] = {}
        self._blob_services: dict[Any, BlobServiceClient] = {}
        self._queue_services: dict[Any, QueueServiceClient] = {}
        self._next_timer: dict[str, dt.datetime] = {}
        self._next_scan: dict[str, float] = {}
        self.blob_scan_interval_s = 1.0
        self.stats = {"invocations": 0, "succeeded": 0, "failed": 0, "poisoned": 0, "timeouts": 0}
        self._pollers = self._make_pollers()

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

    def _hosts_binding(self) -> dict:
        return {"connection": "AzureWebJobsStorage"}  # the host's own storage

    def _hosts_container(self):
        container = self._blob_service(self._hosts_binding()).get_container_client(HOSTS_CONTAINER)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return container

    @property
    def blob_event_queue(self) -> str:
        """The blob extension's queue of blob events for this host (``azure-webjobs-blobtrigger-{hostId}``)."""
        return f"azure-webjobs-blobtrigger-{self.host_id}".lower()[:63]

    def _make_pollers(self) -> list[_Poller]:
        pollers = [_Poller(f.trigger["queueName"], f.trigger, self.config,
                           lambda item, f=f: self._handle_message(f, item))
                   for f in self.functions.values() if f.trigger["type"] == "queueTrigger"]
        if any(f.event_grid for f in self.functions.values()):
            pollers.append(_Poller(self.blob_event_queue, self._hosts_binding(), self.config.for_blob_events(),
                                   self._handle_blob_event))
        return pollers

    # -- invoking ------------------------------------------------------------------------
    def _invoke(self, function: Function, trigger_value: Any, retry_context: _RetryContext | None = None) -> None:
        """One invocation: the function on a worker thread, bounded by ``functionTimeout``; then its outputs."""
        invocation_id = str(uuid.uuid4())
        kwargs: dict[str, Any] = {function.trigger["name"]: trigger_value}
        outs = {o["name"]: _Out() for o in function.outputs}
        kwargs.update(outs)
        if "context" in function.parameters:
            kwargs["context"] = _Context(invocation_id, function.name, str(Path.cwd()), retry_context=retry_context)
        with self._lock:
            self.stats["invocations"] += 1
        log.info("Executing '%s' (id=%s)", function.name, invocation_id)

        def call() -> None:
            result = function.call(**{k: v for k, v in kwargs.items() if k in function.parameters})
            if inspect.iscoroutine(result):
                asyncio.run(result)

        future = self._worker.submit(call)
        timeout = self.config.function_timeout_s
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            # FunctionExecutor.OnFunctionTimeout: the invocation fails; the host restarts the worker, which a
            # Python thread cannot be made to do: it is abandoned and its result ignored.
            with self._lock:
                self.stats["failed"] += 1
                self.stats["timeouts"] += 1
            seconds = int(timeout)
            message = (f"Timeout value of {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d} "
                       "exceeded by function "
                       f"'Functions.{function.name}' (Id: '{invocation_id}'). Initiating cancellation.")
            log.error(message)
            raise FunctionTimeout(message) from None
        except Exception:
            with self._lock:
                self.stats["failed"] += 1
            log.exception("Executed '%s' (Failed, id=%s)", function.name, invocation_id)
            raise
        for output in function.outputs:
            value = outs[output["name"]].get()
            for item in (value if isinstance(value, list) else [value] if value is not None else []):
                text = item if isinstance(item, str) else json.dumps(item)
                if self.config.message_encoding == "base64":
                    text = base64.b64encode(text.encode()).decode()
                self._queue(output, output["queueName"]).send_message(text)
        with self._lock:
            self.stats["succeeded"] += 1
        log.info("Executed '%s' (Succeeded, id=%s)", function.name, invocation_id)

    def _invoke_with_retries(self, function: Function, trigger_value: Any) -> None:
        run_with_retries(function.retry, lambda retry: self._invoke(function, trigger_value, retry),
                         wait=self._stop.wait, name=function.name)

    def _submit(self, work: Callable[[], None]) -> None:
        with self._lock:
            self._busy += 1

        def run() -> None:
            try:
                work()
            except Exception:  # function failures are handled inside; this is storage or devhost
                log.exception("devhost could not complete an invocation's bookkeeping")
            finally:
                with self._lock:
                    self._busy -= 1
        self._dispatch.submit(run)

    # -- queues (queue triggers, and the blob extension's event queue) --------------------------------------
    def _poll(self, poller: _Poller) -> int:
        """Fetch a batch when no more than ``newBatchThreshold`` of this queue's messages are running
        (QueueListener.WaitForNewBatchThreshold); back off exponentially on an empty queue."""
        now = time.monotonic()
        with self._lock:
            if poller.running > poller.config.threshold or now < poller.next_poll:
                return 0
        client = self._queue(poller.binding, poller.queue)
        messages = list(client.receive_messages(messages_per_page=poller.config.batch_size,
                                                max_messages=poller.config.batch_size,
                                                visibility_timeout=int(self.message_lease_s)))
        if not messages:
            # RandomizedExponentialBackoffStrategy(100 ms, maxPollingInterval)
            poller.backoff_s = min(poller.config.max_polling_interval_s,
                                   0.1 + (0.8 + 0.4 * random.random()) * max(0.1, poller.backoff_s * 2))
            poller.next_poll = now + poller.backoff_s
            return 0
        poller.backoff_s, poller.next_poll = 0.0, 0.0
        for message in messages:
            inflight = _InFlight(client, message)
            with self._lock:
                poller.running += 1
                self._inflight.add(inflight)
            self._submit(lambda p=poller, i=inflight: self._run_message(p, i))
        return len(messages)

    def _run_message(self, poller: _Poller, inflight: _InFlight) -> None:
        try:
            if inflight.message.dequeue_count > poller.config.max_dequeue_count:
                # Every earlier attempt died with its worker, before any failure could be handled; the host
                # poisons such a message before invoking (QueueProcessor.BeginProcessingMessageAsync).
                self._poison_message(poller, inflight, "Earlier attempts ended without a result.")
            else:
                poller.handle(inflight)
        finally:
            with self._lock:
                poller.running -= 1
                self._inflight.discard(inflight)

    def _settle(self, poller: _Poller, inflight: _InFlight, error: BaseException | None) -> None:
        """Delete a handled message; release a failed one after ``visibilityTimeout``, or poison it."""
        message = inflight.message
        if error is None:
            with inflight.lock:
                inflight.queue_client.delete_message(message.id, message.pop_receipt)
        elif message.dequeue_count >= poller.config.max_dequeue_count:
            self._poison_message(poller, inflight, f"Last error: {type(error).__name__}: {error}")
        else:
            with inflight.lock:
                inflight.queue_client.update_message(message, visibility_timeout=int(
                    poller.config.visibility_timeout_s))

    def _handle_message(self, function: Function, inflight: _InFlight) -> None:
        message = inflight.message
        body = message.content if isinstance(message.content, (str, bytes)) else str(message.content)
        if self.config.message_encoding == "base64":
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                # QueueServiceClientProvider.CreateMessageDecodingFailedHandler: straight to poison, not retried
                self._poison_message(self._poller_of(function), inflight, "The message is not valid base64.")
                return
        value = QueueMessage(id=message.id, body=body, pop_receipt=message.pop_receipt,
                             dequeue_count=message.dequeue_count, insertion_time=message.inserted_on,
                             expiration_time=message.expires_on)
        try:
            self._invoke(function, value)
        except Exception as exc:  # noqa: BLE001 - the host's retry/poison decision
            self._settle(self._poller_of(function), inflight, exc)
        else:
            self._settle(self._poller_of(function), inflight, None)

    def _poller_of(self, function: Function) -> _Poller:
        return next(p for p in self._pollers if p.queue == function.trigger.get("queueName"))

    def _poison_message(self, poller: _Poller, inflight: _InFlight, why: str) -> None:
        message = inflight.message
        poison = BLOB_POISON_QUEUE if poller.queue == self.blob_event_queue else f"{poller.queue}-poison"
        with inflight.lock:
            self._queue(poller.binding, poison).send_message(message.content)
            inflight.queue_client.delete_message(message.id, message.pop_receipt)
        with self._lock:
            self.stats["poisoned"] += 1
        log.error("Message %s has reached MaxDequeueCount of %d; moved to %s. %s",
                  message.id, poller.config.max_dequeue_count, poison, why)

    def _renew_leases(self) -> None:
        with self._lock:
            inflight = list(self._inflight)
            claims = list(self._claims.values())
        for item in inflight:
            try:
                item.renew(self.message_lease_s)
            except (ResourceNotFoundError, ResourceModifiedError):
                pass  # finished meanwhile
            except Exception:  # a failed renewal only risks a redelivery, which handlers tolerate
                log.warning("could not renew the lease of message %s", item.message.id, exc_info=True)
        for claim in claims:
            try:
                claim.renew()
            except Exception:  # as above; a lost claim is reported when the invocation ends
                log.warning("could not renew blob receipt %s", claim.receipt.blob_name, exc_info=True)

    # -- Event Grid blob triggers -----------------------------------------------------------------------
    def _subscription(self, function: Function) -> tuple[dt.datetime, frozenset[str]]:
        """When the function's Event Grid subscription began, and the blobs that existed then (they never fire).
        Kept in ``azure-webjobs-hosts``, so a restarted host keeps its subscription, as an Azure resource would."""
        if function.name in self._subscriptions:
            return self._subscriptions[function.name]
        marker = self._hosts_container().get_blob_client(f"eventgrid/{self.host_id}/{function.name}/subscription")
        container_name, prefix, _ = _blob_pattern(function.trigger["path"])
        try:
            props = marker.get_blob_properties()
            existing = json.loads(marker.download_blob().readall())["existing"]
        except ResourceNotFoundError:
            container = self._blob_service(function.trigger).get_container_client(container_name)
            try:
                existing = [f"{b.name}@{b.creation_time.isoformat()}"
                            for b in container.list_blobs(name_starts_with=prefix or None)]
            except ResourceNotFoundError:
                existing = []
            try:
                marker.upload_blob(json.dumps({"function": function.name, "existing": existing}), overwrite=False)
            except ResourceExistsError:
                existing = json.loads(marker.download_blob().readall())["existing"]
            props = marker.get_blob_properties()
        self._subscriptions[function.name] = (props.creation_time, frozenset(existing))
        return self._subscriptions[function.name]

    def subscribe(self) -> None:
        """Create every Event Grid subscription now (``--event-grid poll``): blobs created after it fire."""
        if self.event_grid == "poll":
            for function in self.functions.values():
                if function.event_grid:
                    self._subscription(function)

    def _publish_blob_events(self, function: Function) -> int:
        """Azurite's Event Grid: a BlobCreated event for each blob created since the subscription, once (a new
        creation time is a new creation; metadata and tag changes keep it)."""
        since, existing = self._subscription(function)
        container_name, prefix, pattern = _blob_pattern(function.trigger["path"])
        service = self._blob_service(function.trigger)
        container = service.get_container_client(container_name)
        receipts = self._hosts_container()
        try:
            blobs = list(container.list_blobs(name_starts_with=prefix or None))
        except ResourceNotFoundError:
            return 0
        published = 0
        for blob in blobs:
            created = f"{blob.name}@{blob.creation_time.isoformat()}"
            if not pattern.match(blob.name) or blob.creation_time < since or created in existing:
                continue
            receipt = (f"eventgrid/{self.host_id}/{function.name}/events/{container_name}/{blob.name}@"
                       f"{int(blob.creation_time.timestamp())}")
            if receipt in self._announced:
                continue
            try:
                receipts.get_blob_client(receipt).upload_blob(b"", overwrite=False)
            except ResourceExistsError:
                self._announced.add(receipt)
                continue  # published already (by this host before a restart, or by another)
            self._announced.add(receipt)
            url = container.get_blob_client(blob.name).url
            content_type = getattr(blob.content_settings, "content_type", None) or ""
            self.deliver_events(function.name, [blob_created_event(
                container=container_name, blob=blob.name, url=url, etag=blob.etag, length=blob.size,
                content_type=content_type, account=service.account_name)])
            published += 1
        return published

    def deliver_events(self, function_name: str, events: list[dict]) -> int:
        """What the blob extension's webhook does with events (BlobsExtensionConfigProvider.ProcessEventsAsync):
        one ``BlobTriggerMessage`` per event on the host's blob event queue. Raises ``ValueError`` naming what
        is wrong with an event that is not a BlobCreated event of the documented schema."""
        function = self.functions.get(function_name)
        if function is None or not function.event_grid:
            raise LookupError(f"no Event Grid blob trigger function {function_name!r}")
        client = self._queue(self._hosts_binding(), self.blob_event_queue)
        for event in events:
            problem = event_problem(event)
            if problem:
                raise ValueError(problem)
            container, blob = _container_and_blob(event["data"]["url"])
            client.send_message(json.dumps({"Type": "BlobTrigger", "FunctionId": f"Host.Functions.{function.name}",
                                            "BlobType": "BlockBlob", "ContainerName": container, "BlobName": blob,
                                            "ETag": event["data"].get("eTag")}))
        return len(events)

    def _handle_blob_event(self, inflight: _InFlight) -> None:
        """Run the function for one blob event (BlobQueueTriggerExecutor): a blob gone meanwhile is done."""
        poller = next(p for p in self._pollers if p.queue == self.blob_event_queue)
        try:
            event = json.loads(inflight.message.content)
            function = self.functions[event["FunctionId"].removeprefix("Host.Functions.")]
            container = self._blob_service(function.trigger).get_container_client(event["ContainerName"])
            client = container.get_blob_client(event["BlobName"])
            download = client.download_blob()
        except ResourceNotFoundError:
            self._settle(poller, inflight, None)
            return
        except (ValueError, KeyError) as exc:
            self._poison_message(poller, inflight, f"not a blob trigger message: {exc}")
            return
        data = download.readall()
        props = download.properties
        stream = func.blob.InputStream(data=data, name=f"{event['ContainerName']}/{event['BlobName']}",
                                       uri=client.url, length=len(data), metadata=props.metadata or {},
                                       blob_properties={"ETag": props.etag, "Length": len(data)})
        try:
            self._invoke(function, stream)
        except Exception as exc:  # noqa: BLE001 - the extension's queue decides: retry, then poison
            self._settle(poller, inflight, exc)
        else:
            self._settle(poller, inflight, None)

    # -- container-scanning blob triggers (LogsAndContainerScan) -----------------------------------------------
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
            data = client.download_blob(etag=blob.etag, match_condition=MatchConditions.IfNotModified).readall()
        except (ResourceNotFoundError, ResourceModifiedError):
            self._finish_blob(claim, status="superseded")
            return  # deleted or overwritten meanwhile: the new version gets its own receipt
        stream = func.blob.InputStream(data=data, name=f"{container.container_name}/{blob.name}", uri=client.url,
                                       length=len(data), metadata=blob.metadata or {},
                                       blob_properties={"ETag": blob.etag, "Length": len(data)})
        try:
            self._invoke(function, stream)
        except Exception as exc:  # noqa: BLE001 - retry, then poison, as the host does for blob triggers
            if claim.state["attempts"] < self.config.blob_poison_threshold:
                self._finish_blob(claim, status="failed", retryAt=time.time() + self.config.visibility_timeout_s)
            elif self._finish_blob(claim, status="poisoned", error=type(exc).__name__):
                self._queue(function.trigger, BLOB_POISON_QUEUE).send_message(json.dumps({
                    "Type": "BlobTrigger", "FunctionId": f"Host.Functions.{function.name}", "BlobType": "BlockBlob",
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

    # -- HTTP triggers (served by devhost.webhook) ---------------------------------------------
    def http_function(self, route: str) -> tuple[Function, dict[str, str]] | None:
        """The HTTP-triggered function whose route template matches ``route`` (after the ``api/`` prefix; the
        function's name when it sets no route), with the template's parameters (``{name}``, ``{id:int?}``)."""
        for function in self.functions.values():
            if function.trigger["type"] != "httpTrigger":
                continue
            template = (function.trigger.get("route") or function.name).strip("/")
            pattern = "".join(f"(?P<{part[1:-1].split(':')[0].rstrip('?')}>[^/]+)" if part.startswith("{")
                              else re.escape(part) for part in re.split(r"(\{[^}]+\})", template))
            match = re.fullmatch(pattern, route.strip("/"), re.IGNORECASE)
            if match:
                return function, match.groupdict()
        return None

    def invoke_http(self, function: Function, request: func.HttpRequest) -> func.HttpResponse:
        """One HTTP invocation on the worker, bounded by ``functionTimeout``; a function that raises (or runs out
        of time) answers 500, as the host does, with the cause in the log only."""
        with self._lock:
            self.stats["invocations"] += 1
        future = self._worker.submit(function.call, **{function.trigger["name"]: request})
        try:
            response = future.result(timeout=self.config.function_timeout_s)
        except Exception:
            log.exception("Executed '%s' (Failed)", function.name)
            with self._lock:
                self.stats["failed"] += 1
            return func.HttpResponse(status_code=500)
        with self._lock:
            self.stats["succeeded"] += 1
        return response if isinstance(response, func.HttpResponse) else func.HttpResponse(str(response))

    def fire(self, name: str, *, past_due: bool = False) -> None:
        """Run a timer function now, in this thread, with its retry policy (raises what its last attempt raises)."""
        function = self.functions.get(name)
        if function is None or function.trigger["type"] != "timerTrigger":
            timers = ", ".join(f.name for f in self._timers()) or "none"
            raise HostError(f"no timer function {name!r}; timer functions: {timers}")
        schedule = Schedule.parse(function.trigger["schedule"])
        now = dt.datetime.now(dt.UTC)
        request = TimerRequest(past_due=past_due, schedule={"AdjustForDST": False},
                               schedule_status={"Last": now.isoformat(), "Next": schedule.next_after(now).isoformat()})
        try:
            self._invoke_with_retries(function, request)
        finally:
            if function.trigger.get("useMonitor", True):
                self._timer_status(function).upload_blob(json.dumps({
                    "Last": now.isoformat(), "Next": schedule.next_after(now).isoformat(),
                    "LastUpdated": now.isoformat()}), overwrite=True)

    def _fire_scheduled(self, name: str, past_due: bool) -> None:
        try:
            self.fire(name, past_due=past_due)
        except Exception:  # noqa: BLE001, S110 - logged by _invoke; the next occurrence runs as scheduled
            pass

    def _tick_timers(self, now: dt.datetime) -> int:
        started = 0
        for name, due in list(self._next_timer.items()):
            if due <= now:
                self._next_timer[name] = Schedule.parse(self.functions[name].trigger["schedule"]).next_after(now)
                late = (now - due).total_seconds() > 1
                self._submit(lambda n=name, late=late: self._fire_scheduled(n, late))
                started += 1
        return started

    # -- the loop ----------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """One pass over every trigger; the number of invocations started."""
        started = 0
        for poller in self._pollers:
            try:
                started += self._poll(poller)
            except HostError:
                raise
            except Exception:  # storage hiccup: log, keep polling (the host does the same)
                log.warning("polling %s failed; retrying", poller.queue, exc_info=True)
        for function in self.functions.values():
            if function.trigger["type"] != "blobTrigger" or (function.event_grid and self.event_grid != "poll"):
                continue
            if time.monotonic() < self._next_scan.get(function.name, 0.0):
                continue
            # Listing a container costs Azurite a walk over its blobs: once a second, not every poll (Event Grid
            # delivers in seconds as well).
            self._next_scan[function.name] = time.monotonic() + self.blob_scan_interval_s
            try:
                started += self._publish_blob_events(function) if function.event_grid else self._scan_blobs(function)
            except Exception:  # as above
                log.warning("scanning blobs for %s failed; retrying", function.name, exc_info=True)
        return started + self._tick_timers(dt.datetime.now(dt.UTC))

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def run(self, stop: threading.Event | None = None, *, until_idle: float | None = None) -> None:
        """Poll until ``stop`` is set, or (``until_idle``) until nothing ran for that many seconds."""
        stop = stop or self._stop
        self._start_timers(dt.datetime.now(dt.UTC))
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
        self._stop.set()  # retries waiting between attempts end now
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
        self._dispatch.shutdown(wait=wait)
        self._worker.shutdown(wait=False)  # an abandoned (timed-out) invocation may still hold a thread
