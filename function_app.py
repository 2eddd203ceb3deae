"""The Azure Functions app: a table of contents of triggers.

Each trigger decodes its binding, calls one handler and leaves the verdict - done, rejected
(recorded) or retry (raise) - to ``edge.queue``. See the README for the message contracts.
"""

import datetime as dt

import azure.functions as func

from edge.http import run_http
from edge.queue import run_blob, run_queue_message, run_timer
from edge.services import Services, services
from edge.telemetry import configure as configure_telemetry
from handlers import (
    batch_chunk,
    batch_intake,
    command_message,
    commands,
    expiry_sweep,
    onboarding,
    records,
    renewal,
)
from handlers.messages import Delivery

configure_telemetry()  # OpenTelemetry: Application Insights when its connection string is set (edge/telemetry.py)
app = func.FunctionApp()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def handle_onboarding(body: bytes, wired: Services, delivery: Delivery) -> str:
    request = onboarding.OnboardingRequest.parse(body)
    outcome = onboarding.onboard_customer(
        request, store=wired.store, keys=wired.keys, groups=wired.groups, audit=wired.audit,
        settings=wired.onboarding, now=_now(), message_id=delivery.message_id)
    return f"customer {request.customer_id}: {outcome.status} (requestId {request.request_id})"


@app.queue_trigger(arg_name="msg", queue_name=onboarding.QUEUE, connection="AzureWebJobsStorage")
def customer_onboarding(msg: func.QueueMessage) -> None:
    """ERP "new customer" -> intermediate CA in Key Vault + DPS enrollment group."""
    run_queue_message(msg, queue=onboarding.QUEUE, services=services, handle=handle_onboarding)


def handle_batch(path: str, wired: Services) -> str:
    return batch_intake.intake_batch(path, files=wired.files, outputs=wired.files, store=wired.store, queue=wired.queue,
                                     secrets_store=wired.secrets, audit=wired.audit, settings=wired.batches, now=_now())


@app.blob_trigger(arg_name="blob", path="device-batches/{customerId}/{batchName}", connection="AzureWebJobsStorage",
                  source="EventGrid")
def device_batch(blob: func.InputStream) -> None:
    """A device batch (CSV/JSONL) -> validated, recorded, fanned out as chunk messages."""
    run_blob(blob, services=services, handle=handle_batch)


def handle_chunk(body: bytes, wired: Services, delivery: Delivery) -> str:
    return batch_chunk.process_chunk(
        records.ChunkMessage.parse(body), files=wired.files, outputs=wired.files, store=wired.store,
        keys=wired.keys, secrets_store=wired.secrets, audit=wired.audit, settings=wired.batches, now=_now(),
        registrar=wired.registrar)


@app.queue_trigger(arg_name="msg", queue_name=batch_intake.CHUNK_QUEUE, connection="AzureWebJobsStorage")
def batch_chunk_issue(msg: func.QueueMessage) -> None:
    """One chunk of a batch -> one certificate per device; the last chunk assembles the report."""
    run_queue_message(msg, queue=batch_intake.CHUNK_QUEUE, services=services, handle=handle_chunk)


def handle_command(body: bytes, wired: Services, delivery: Delivery) -> str:
    return commands.run_command(command_message.Command.parse(body), delivery, ports=wired.commands, now=_now())


@app.queue_trigger(arg_name="msg", queue_name=command_message.QUEUE, connection="AzureWebJobsStorage")
def operator_command(msg: func.QueueMessage) -> None:
    """Operator/ERP command -> device or customer disabled/enabled (IoT Hub + DPS), intermediate renewed."""
    run_queue_message(msg, queue=command_message.QUEUE, services=services, handle=handle_command)


def handle_sweep(wired: Services) -> str:
    report = expiry_sweep.run_sweep(ports=wired.commands, queue=wired.queue, settings=wired.sweep, now=_now())
    return f"expiry sweep {report['date']}: {report['counts']}"


@app.timer_trigger(arg_name="timer", schedule="%EXPIRY_SWEEP_SCHEDULE%", run_on_startup=False, use_monitor=True)
@app.retry(strategy="exponential_backoff", max_retry_count="4", minimum_interval="00:01:00",
           maximum_interval="00:30:00")
def expiry_sweep_timer(timer: func.TimerRequest) -> None:
    """Daily: renew intermediates near expiry, notify customers of expiring devices, warn about the root."""
    run_timer(timer, name="expiry-sweep", services=services, handle=handle_sweep)


def handle_allocation(body: bytes, wired: Services) -> dict:
    return renewal.handle_allocation(renewal.AllocationRequest.parse(body), store=wired.store, keys=wired.keys,
                                     audit=wired.audit, settings=wired.renewals, now=_now())


@app.route(route=renewal.ROUTE, methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def dps_allocation(req: func.HttpRequest) -> func.HttpResponse:
    """DPS's custom allocation webhook -> the device's hub, and a renewed certificate when its payload asks."""
    return run_http(req, route=renewal.ROUTE, services=services, handle=handle_allocation)
