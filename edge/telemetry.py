"""Logs and metrics out of the app: OpenTelemetry, to Application Insights on Azure, to the console or a file
locally.

- ``configure(env)`` at start-up (``function_app``): with ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set, the Azure
  Monitor distro (``configure_azure_monitor``) takes the app's logs, metrics and traces, as
  learn.microsoft.com/azure/azure-functions/opentelemetry-howto shows for Python (with ``"telemetryMode":
  "OpenTelemetry"`` in host.json and ``PYTHON_ENABLE_OPENTELEMETRY=true``, so the host does not log them twice).
  Locally ``PKI_TELEMETRY_EXPORT`` = ``console`` or ``file:PATH`` (JSON lines) exports metrics and logs with the
  OpenTelemetry SDK; unset, nothing is exported and the instruments are no-ops.
- ``log_context(...)``: every log record made inside it and handled by the root logger's handlers carries
  ``customerId``, ``requestId``, ``messageId``, ``batch`` and ``chunk`` as attributes (empty when not known; the
  ``customerId`` of a message as the message claims it, before it is validated). OpenTelemetry's logging handler
  turns a record's extra attributes into log attributes, so they are queryable in Application Insights
  (``customDimensions``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

CONTEXT_FIELDS = ("customerId", "requestId", "messageId", "batch", "chunk")
EXPORT_SETTING = "PKI_TELEMETRY_EXPORT"
_current: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("pki_log_context", default=None)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Within it, log records carry these fields (added to the enclosing context's)."""
    known = {k: str(v) for k, v in fields.items() if v is not None and v != ""}
    token = _current.set({**(_current.get() or {}), **known})
    try:
        yield
    finally:
        _current.reset(token)


class ContextFilter(logging.Filter):
    """Gives a record the context's fields it does not already carry (a logging call's own ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get() or {}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name, ""))
        return True


def install_log_context(*handlers: logging.Handler) -> None:
    """Put the context filter on every handler of the root logger (where the Functions worker's and the exporters'
    handlers are) and on ``handlers``. A filter, not a record factory: a record factory's attributes would make
    any logging call passing one of these names in ``extra=`` fail. Idempotent."""
    for handler in [*logging.getLogger().handlers, *handlers]:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())


def peek(body: bytes | str | None) -> dict[str, str]:
    """The context fields an input carries where this app's messages keep them (``customerId``, ``requestId``,
    ``batchName``, ``chunk``; the webhook's ``enrollmentGroup.enrollmentGroupId``), read without judging it: a
    message that is not JSON, or says nothing, gives nothing."""
    from handlers.messages import decode_json_message  # the app's one guarded JSON reader (depth, size, duplicates)

    try:
        data = decode_json_message(body) if body else None
    except Exception:  # noqa: BLE001 - anything unreadable: the handler's rejection says why, not the log context
        return {}
    if not isinstance(data, dict):
        return {}
    group = data.get("enrollmentGroup")
    found = {"customerId": data.get("customerId") or (group.get("enrollmentGroupId") if isinstance(group, dict)
                                                       else None),
             "requestId": data.get("requestId"), "batch": data.get("batchName"), "chunk": data.get("chunk")}
    return {k: str(v) for k, v in found.items()
            if isinstance(v, str) or (k == "chunk" and isinstance(v, int) and not isinstance(v, bool))}


def configure(env: Mapping[str, str] | None = None) -> str:
    """Set up the exporters ``env`` asks for; returns which (``azure-monitor``, ``console``, ``file:PATH`` or
    ``none``)."""
    env = os.environ if env is None else env
    target = env.get(EXPORT_SETTING, "").strip()
    if target and target != "console" and not target.startswith("file:"):
        raise ValueError(f"{EXPORT_SETTING}: {target!r} is not console or file:PATH")
    try:
        if env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
            from azure.monitor.opentelemetry import configure_azure_monitor

            configure_azure_monitor()  # reads the connection string; logs from the root logger, metrics, traces
            target = "azure-monitor"
        elif target:
            _local_sdk(target)
        else:
            target = "none"
    except Exception as exc:  # noqa: BLE001 - telemetry must never stop the app from loading its functions
        logging.getLogger("pki").error("telemetry is off: %s: %s", type(exc).__name__, exc)
        target = "none"
    install_log_context()
    return target


def _local_sdk(target: str) -> None:
    """Metrics every 10 s and logs as they come, to stdout or appended to a file, one JSON object per line."""
    from opentelemetry import _logs, metrics
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import ConsoleLogExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if target == "console":
        stream = None
    else:
        stream = open(target.removeprefix("file:"), "a", encoding="utf-8")  # noqa: SIM115 - lives with the process

    def one_line(item: Any) -> str:
        return json.dumps(json.loads(item.to_json())) + os.linesep

    log_exporter = ConsoleLogExporter(out=stream, formatter=one_line) if stream else ConsoleLogExporter(
        formatter=one_line)
    metric_exporter = ConsoleMetricExporter(out=stream, formatter=one_line) if stream else ConsoleMetricExporter(
        formatter=one_line)
    metrics.set_meter_provider(MeterProvider(metric_readers=[
        PeriodicExportingMetricReader(metric_exporter, export_interval_millis=10_000)]))
    logs = LoggerProvider()
    logs.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    _logs.set_logger_provider(logs)
    logging.getLogger().addHandler(LoggingHandler(level=logging.INFO, logger_provider=logs))
