"""Device-side DPS registration over HTTPS with an X.509 certificate (mutual TLS).

DPS's device API (learn.microsoft.com/rest/api/iot-dps/device/runtime-registration):
``PUT https://{endpoint}/{idScope}/registrations/{registrationId}/register`` answers 202
``{"operationId", "status": "assigning"}``; the device then polls
``GET .../registrations/{registrationId}/operations/{operationId}``, waiting what ``Retry-After`` says, until
the status is ``assigned``, ``failed`` or ``disabled``. An X.509 refusal (401002...) comes back on the
register call itself. The same code talks to Azure (``global.azure-devices-provisioning.net``) and to the
emulators; only the endpoint and the CA to trust differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from azure.core import PipelineClient
from azure.core.exceptions import AzureError
from azure.core.pipeline.policies import HeadersPolicy, RetryPolicy, UserAgentPolicy
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest, HttpResponse

DEFAULT_ENDPOINT = "global.azure-devices-provisioning.net"
# The device API version the Azure IoT device SDKs send (azure-iot-device's provisioning HTTP transport).
# 2021-10-01: a stable device API with a published spec (device.json; the service answers the same shapes as
# 2026-11-01, whose table tests/contracts/dps-device.json checks the emulator against).
API_VERSION = "2021-10-01"
# How long to wait between polls when DPS sends no Retry-After (the device SDKs' default interval).
DEFAULT_POLL_INTERVAL_S = 2.0
# 429 and 5xx are retried (honouring Retry-After) this many times per call before giving up.
RETRIES = 4
# Throttling and server faults may pass; any other 4xx is DPS's verdict on this device.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RegistrationResult:
    """The outcome of a registration operation; ``raw`` is DPS's last answer as received."""

    status: str
    assigned_hub: str | None
    device_id: str | None
    error_code: int | None
    message: str | None
    raw: dict

    @property
    def payload(self) -> dict | None:
        """What the enrollment's custom allocation webhook returned to the device, if anything."""
        return (self.raw.get("registrationState") or {}).get("payload")


class RegistrationError(Exception):
    """Registration did not complete. ``error_code``/``status_code``/``tracking_id`` are DPS's when it answered."""

    def __init__(self, message: str, *, error_code: int | None = None, status_code: int | None = None,
                 tracking_id: str | None = None, result: RegistrationResult | None = None):
        super().__init__(message)
        self.error_code = error_code
        self.status_code = status_code
        self.tracking_id = tracking_id
        self.result = result


class RegistrationRefused(RegistrationError):
    """DPS said no (e.g. 401002: no enrollment group's certificate in the chain). Retrying will not help."""


class RegistrationUnavailable(RegistrationError):
    """DPS could not be reached, kept throttling or failing, or did not finish in time. May pass."""


def register(endpoint: str, id_scope: str, registration_id: str, cert_chain_path: str | Path,
             key_path: str | Path, *, ca_path: str | Path | None = None, timeout_s: float = 30,
             api_version: str = API_VERSION, payload: dict | None = None) -> RegistrationResult:
    """Register ``registration_id`` with DPS, presenting the certificate chain in ``cert_chain_path``.

    ``cert_chain_path`` holds the device certificate followed by its intermediate(s): DPS matches an
    enrollment group only against certificates the device sends (401002 otherwise). ``ca_path`` is the CA
    bundle to trust instead of the system's (the emulators' CA). ``timeout_s`` bounds the whole exchange.
    Returns the ``assigned`` result; raises ``RegistrationRefused`` or ``RegistrationUnavailable``. ``payload``
    (a JSON object) goes to the enrollment's custom allocation webhook; what it returns is the result's
    ``payload`` (DeviceRegistrationResult.payload, device.json).
    """
    for name, value in (("endpoint", endpoint), ("id_scope", id_scope), ("registration_id", registration_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    for name, path in (("cert_chain_path", cert_chain_path), ("key_path", key_path), ("ca_path", ca_path)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}: no such file {str(path)!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")

    base_url = endpoint.rstrip("/") if "://" in endpoint else f"https://{endpoint}"
    resource = f"{base_url}/{quote(id_scope, safe='')}/registrations/{quote(registration_id, safe='')}"
    deadline = time.monotonic() + timeout_s
    transport = RequestsTransport(connection_cert=(str(cert_chain_path), str(key_path)),
                                  connection_verify=str(ca_path) if ca_path else True)
    policies = [
        HeadersPolicy(base_headers={"Accept": "application/json"}),
        UserAgentPolicy(sdk_moniker="iot-pki-device-registration"),
        RetryPolicy(retry_total=RETRIES, retry_connect=1, retry_backoff_factor=0.5, retry_backoff_max=8),
    ]
    with PipelineClient(base_url, policies=policies, transport=transport) as client:
        call = _Caller(client, registration_id, deadline, timeout_s)
        response, body = call(HttpRequest("PUT", f"{resource}/register", params={"api-version": api_version},
                                          json={"registrationId": registration_id,
                                                **({"payload": payload} if payload is not None else {})}))
        while body.get("status") in ("unassigned", "assigning"):
            operation_id = body.get("operationId")
            if not isinstance(operation_id, str) or not operation_id:
                raise RegistrationError(f"DPS answered status {body.get('status')!r} without an operationId")
            call.wait(_retry_after(response))
            response, body = call(HttpRequest("GET", f"{resource}/operations/{quote(operation_id, safe='')}",
                                              params={"api-version": api_version}))
    return _outcome(registration_id, body)


class _Caller:
    """Sends one request within the overall deadline and turns every failure into a ``RegistrationError``."""

    def __init__(self, client: PipelineClient, registration_id: str, deadline: float, timeout_s: float):
        self.client = client
        self.registration_id = registration_id
        self.deadline = deadline
        self.timeout_s = timeout_s

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RegistrationUnavailable(f"registration of {self.registration_id!r} did not complete within "
                                          f"{self.timeout_s:g} s")
        return remaining

    def wait(self, seconds: float) -> None:
        time.sleep(min(seconds, self._remaining()))

    def __call__(self, request: HttpRequest) -> tuple[HttpResponse, dict]:
        try:
            # ``timeout`` is the RetryPolicy's absolute budget for this call, retries and their waits included.
            response = self.client.send_request(request, timeout=self._remaining())
        except AzureError as exc:  # connection, TLS, timeout: the request may not have reached DPS
            raise RegistrationUnavailable(f"could not reach DPS at {request.url}: {exc}") from exc
        body = _json(response)
        if response.status_code >= 400:
            error = body if isinstance(body, dict) else {}
            code, message = error.get("errorCode"), error.get("message") or response.text()[:500] or response.reason
            transient = response.status_code in TRANSIENT_STATUS
            kind, verb = (RegistrationUnavailable, "could not serve") if transient else (RegistrationRefused, "refused")
            raise kind(f"DPS {verb} registration {self.registration_id!r}: HTTP {response.status_code}, "
                       f"errorCode {code}: {message}", error_code=code, status_code=response.status_code,
                       tracking_id=error.get("trackingId"))
        if not isinstance(body, dict):
            raise RegistrationError(f"DPS answered HTTP {response.status_code} to {request.method} with a body "
                                    "that is not a JSON object", status_code=response.status_code)
        return response, body


def _json(response: HttpResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _retry_after(response: HttpResponse) -> float:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value else DEFAULT_POLL_INTERVAL_S
    except ValueError:  # an HTTP date: DPS sends seconds, so fall back to the default interval
        return DEFAULT_POLL_INTERVAL_S


def _outcome(registration_id: str, body: dict) -> RegistrationResult:
    state = body.get("registrationState") or {}
    result = RegistrationResult(status=body.get("status") or "", assigned_hub=state.get("assignedHub"),
                                device_id=state.get("deviceId"), error_code=state.get("errorCode"),
                                message=state.get("errorMessage"), raw=body)
    if result.status == "assigned":
        return result
    if result.status in ("failed", "disabled"):
        raise RegistrationRefused(f"DPS did not assign {registration_id!r}: status {result.status}, errorCode "
                                  f"{result.error_code}: {result.message}", error_code=result.error_code,
                                  result=result)
    raise RegistrationError(f"DPS answered an unknown registration status {result.status!r}", result=result)
