"""The Azure Functions app: a table of contents of triggers.

Each trigger decodes its binding, calls one handler and leaves the verdict - done, rejected
(recorded) or retry (raise) - to ``edge.queue``. See the README for the message contracts.
"""

import datetime as dt

import azure.functions as func

from edge.queue import run_queue_message
from edge.services import Services, services
from handlers import onboarding

app = func.FunctionApp()


def _onboard(body: bytes, wired: Services, message_id: str | None) -> str:
    request = onboarding.OnboardingRequest.parse(body)
    outcome = onboarding.onboard_customer(
        request, store=wired.store, keys=wired.keys, groups=wired.groups, audit=wired.audit,
        settings=wired.onboarding, now=dt.datetime.now(dt.timezone.utc), message_id=message_id)
    return f"customer {request.customer_id}: {outcome.status} (requestId {request.request_id})"


@app.queue_trigger(arg_name="msg", queue_name=onboarding.QUEUE, connection="AzureWebJobsStorage")
def customer_onboarding(msg: func.QueueMessage) -> None:
    """ERP "new customer" -> intermediate CA in Key Vault + DPS enrollment group."""
    run_queue_message(msg, queue=onboarding.QUEUE, services=services, handle=_onboard)
