"""The IoT hubs' device registries behind the handlers' ``HubRegistry`` port, over ``azure-iot-hub``.

``IoTHubRegistryManager`` is an msrest client (not azure-core): its errors are ``HttpOperationError``,
and its CA trust is msrest's connection configuration (``protocol.config.connection.verify``, set to the
local stack's CA when ``EMULATOR_CA_PATH`` is). With a token credential it takes the hub's host name
(``IoTHubRegistryManager.from_token_credential`` puts ``https://`` in front itself: azure-iot-hub 2.7,
``iothub_registry_manager.py``) and asks for ``https://iothubs.azure.net/.default`` tokens.
Registry operations are throttled by IoT Hub at 100/min per S1 unit, shared by the
whole hub: every call here takes a token from a client-side bucket (``IOT_HUB_REGISTRY_OPS_PER_MIN``),
and a bulk call changes up to 100 devices for one token. Throttling (429) and server faults become
``TransientError``: the command message is retried by the host.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence

from handlers.errors import Conflict, NotFound, Rejected, TransientError
from handlers.ports import BulkOutcome

from .errors import not_permitted
from .retry import TokenBucket

BULK_LIMIT = 100  # devices per bulk registry call (IoT Hub's limit)
_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    from azure.core.exceptions import ClientAuthenticationError
    from msrest.exceptions import ClientRequestError, HttpOperationError

    try:
        yield
    except HttpOperationError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            raise NotFound(f"{what}: not found") from exc
        if status == 412:
            raise Conflict(f"{what}: changed by someone else (etag mismatch)") from exc
        if status in (401, 403):  # IoT Hub answers a principal without a role with 401 IotHubUnauthorized
            raise not_permitted(what, status, exc.response.text[:600]) from exc
        if status in _TRANSIENT:
            raise TransientError(f"{what}: HTTP {status}") from exc
        body = exc.response.text[:300] if exc.response is not None else ""
        raise Rejected(f"{what}: IoT Hub answered HTTP {status}: {body}") from exc
    except ClientRequestError as exc:
        raise TransientError(f"{what}: {exc}") from exc
    except ClientAuthenticationError as exc:  # no token: raised by the credential inside msrest's adapter
        raise not_permitted(what, 0, exc.message or str(exc)) from exc


def host_name(hub: str) -> str:
    """A hub as ``from_token_credential`` wants it: the host name alone (it adds ``https://`` itself)."""
    return hub.removeprefix("https://").removeprefix("http://").rstrip("/")


class IotHubRegistries:
    """``HubRegistry`` over every hub the DPS pool assigns to, by host name."""

    def __init__(self, *, connection_strings: Mapping[str, str], credential=None, ops_per_min: float = 100,
                 connection_verify: str | None = None):
        self._connection_strings = dict(connection_strings)
        self._credential = credential
        self._verify = connection_verify
        self._bucket = TokenBucket(ops_per_min / 60)
        self._managers: dict[str, object] = {}
        self._lock = threading.Lock()

    def _manager(self, hub: str):
        from azure.iot.hub import IoTHubRegistryManager

        with self._lock:
            if hub not in self._managers:
                if hub in self._connection_strings:
                    manager = IoTHubRegistryManager.from_connection_string(self._connection_strings[hub])
                elif self._credential is not None:
                    manager = IoTHubRegistryManager.from_token_credential(host_name(hub), self._credential)
                else:
                    raise Rejected(f"IoT hub {hub} has no connection configured (IOT_HUB_CONNECTION_STRINGS)")
                if self._verify:
                    manager.protocol.config.connection.verify = self._verify
                self._managers[hub] = manager
            return self._managers[hub]

    def device(self, hub: str, device_id: str) -> dict | None:
        """The device's ``status``, ``etag`` and ``iotEdge``, or None if the hub does not know it."""
        self._bucket.acquire()
        try:
            with _translated(f"device {device_id} on {hub}"):
                device = self._manager(hub).get_device(device_id)
        except NotFound:
            return None
        return {"deviceId": device_id, "status": device.status, "etag": device.etag,
                "iotEdge": bool(device.capabilities and device.capabilities.iot_edge)}

    def set_status(self, hub: str, device: Mapping, status: str, reason: str) -> None:
        """Set one device's status at the etag ``device`` was read with (``Conflict`` if it changed since)."""
        self._bucket.acquire()
        with _translated(f"device {device['deviceId']} on {hub}"):
            self._manager(hub).update_device_with_certificate_authority(
                device["deviceId"], device["etag"], status, iot_edge=device["iotEdge"], status_reason=reason[:128])

    def set_desired(self, hub: str, device_id: str, desired: Mapping) -> None:
        """Merge ``desired`` into the device twin's desired properties (UpdateTwin, If-Match ``*``: a merge of
        our own keys needs no etag); within the same rate as registry operations."""
        from azure.iot.hub.models import Twin, TwinProperties

        self._bucket.acquire()
        with _translated(f"twin of {device_id} on {hub}"):
            self._manager(hub).update_twin(device_id, Twin(properties=TwinProperties(desired=dict(desired))), "*")

    def set_statuses(self, hub: str, device_ids: Sequence[str], status: str, reason: str, *,
                     iot_edge: bool = False) -> BulkOutcome:
        """Set many devices' status, ``BULK_LIMIT`` per call (import mode ``update``: a device the hub no longer has
        is a per-device ``DeviceNotFound``, never created). Bulk Update Registry answers 200 when every device was
        updated and 400 both for per-device errors and for a request refused as a whole; only
        ``isSuccessful: true`` is success, and a 400 without per-device errors is the whole call failing."""
        from azure.iot.hub.models import (
            AuthenticationMechanism,
            DeviceCapabilities,
            ExportImportDevice,
        )

        problems, absent = [], []
        for start in range(0, len(device_ids), BULK_LIMIT):
            page = device_ids[start:start + BULK_LIMIT]
            devices = [ExportImportDevice(id=device_id, import_mode="update", status=status,
                                          status_reason=reason[:128],
                                          authentication=AuthenticationMechanism(type="certificateAuthority"),
                                          capabilities=DeviceCapabilities(iot_edge=iot_edge))
                       for device_id in page]
            self._bucket.acquire()
            what = f"bulk update of {len(page)} devices on {hub}"
            with _translated(what):
                # the manager's own call (bulk_create_or_update_devices), with the raw response kept for its status
                raw = self._manager(hub).protocol.bulk_registry.update_registry(devices, raw=True)
            result = raw.output
            if result is not None and result.is_successful is True:
                continue
            errors = (result.errors if result is not None else None) or []
            if not errors:
                raise TransientError(f"{what}: IoT Hub refused the request: HTTP {raw.response.status_code} "
                                     f"{raw.response.text[:300]}")
            absent += [e.device_id for e in errors if e.error_code == "DeviceNotFound"]
            problems += [f"{e.device_id}: {e.error_code} {e.error_status}" for e in errors
                         if e.error_code != "DeviceNotFound"]
        return BulkOutcome(problems=tuple(problems), absent=tuple(absent))
