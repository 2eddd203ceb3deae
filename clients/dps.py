"""The DPS pool behind the handlers' ports, over ``azure-iot-deviceprovisioning``.

Each instance is reached with the app's token credential (role "Device Provisioning Service Data Contributor"),
on Azure and against the local emulators alike; a SAS connection string (``DPS_CONNECTION_STRINGS``) replaces
it for an instance that has one.
Creating a group sends no ``If-Match``, so DPS answers 409 when it exists: a retried PUT whose first
attempt did succeed reads as "exists", and the handler checks the group is its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from azure.core.exceptions import HttpResponseError
from azure.iot.deviceprovisioning import DeviceProvisioningClient

from handlers.dps_pool import DpsInstance
from handlers.errors import CapacityExhausted, NotFound, Rejected
from handlers.ports import Enrollment

from .errors import translated

RETRIES = 8

# DPS's answer to one enrollment group too many is undocumented (status and code), and the 100-group limit can be
# raised: a refused create is a full instance when the refusal says so in words, or when the instance holds at
# least the groups this service may put there (DPS_MAX_GROUPS_PER_INSTANCE), counted after the refusal.
_QUOTA_WORDS = ("quota", "maximum", "limit", "exceeded")


def _says_full(exc: HttpResponseError) -> bool:
    message = str(exc.message or "").lower()
    return "enrollment group" in message and any(w in message for w in _QUOTA_WORDS)


class DpsEnrollmentGroups:
    """``EnrollmentGroups`` over every instance of the pool, by name."""

    def __init__(self, clients: Mapping[str, DeviceProvisioningClient], *, max_groups: int = 100):
        self._clients = dict(clients)
        self._max_groups = max_groups

    @classmethod
    def for_pool(cls, pool: tuple[DpsInstance, ...], *, connection_strings: Mapping[str, str],
                 credential=None, connection_verify: str | None = None, max_groups: int = 100) -> DpsEnrollmentGroups:
        # The DPS client builds its own pipeline with ``RetryPolicy(**kwargs)`` (azure/iot/deviceprovisioning/
        # _patch.py) and ignores ``retry_policy=``: retry settings go in as kwargs. Its default RetryPolicy
        # retries PUT/GET/DELETE on 429 and 5xx, which is every call made here; 3 status retries are too
        # few for a busy DPS, so allow as many as the Key Vault client does.
        options: dict = {"retry_total": RETRIES, "retry_status": RETRIES, "retry_backoff_factor": 0.8,
                         "retry_backoff_max": 30}
        if connection_verify:
            options["connection_verify"] = connection_verify
        clients = {}
        for instance in pool:
            if instance.name in connection_strings:
                clients[instance.name] = DeviceProvisioningClient.from_connection_string(
                    connection_strings[instance.name], **options)
            else:
                clients[instance.name] = DeviceProvisioningClient(endpoint=instance.endpoint, credential=credential,
                                                                  **options)
        return cls(clients, max_groups=max_groups)

    def _client(self, dps: str) -> DeviceProvisioningClient:
        try:
            return self._clients[dps]
        except KeyError:
            raise NotFound(f"DPS instance {dps!r} is not configured (DPS_INSTANCES)") from None

    def _operations(self, dps: str, kind: str):
        client = self._client(dps)
        return client.enrollment_group if kind == "enrollment group" else client.enrollment

    def _get(self, dps: str, kind: str, record_id: str) -> Enrollment | None:
        try:
            with translated(f"{kind} {record_id} on {dps}"):
                data = self._operations(dps, kind).get(record_id)
        except NotFound:
            return None
        return Enrollment(data=data, etag=data.get("etag", ""))

    def _put(self, dps: str, kind: str, record_id: str, body: dict, etag: str | None) -> Enrollment:
        """Create (``etag`` None: ``AlreadyExists`` if present) or replace at ``etag`` (``Conflict`` if stale)."""
        try:
            with translated(f"{kind} {record_id} on {dps}"):
                data = self._operations(dps, kind).create_or_update(record_id, body, if_match=etag)
        except HttpResponseError as exc:
            if kind == "enrollment group" and etag is None and exc.status_code in (400, 403) and self._full(dps, exc):
                raise CapacityExhausted(f"DPS instance {dps} is full: {exc.message}") from exc
            if exc.status_code == 400:  # DPS's verdict on the record (e.g. hubs not linked): retrying cannot help
                raise Rejected(f"DPS {dps} refused {kind} {record_id}: {exc.message}") from exc
            raise
        return Enrollment(data=data, etag=data.get("etag", ""))

    def _full(self, dps: str, exc: HttpResponseError) -> bool:
        if _says_full(exc):
            return True
        with translated(f"enrollment groups of {dps}"):
            held = sum(1 for _ in self._client(dps).enrollment_group.query({"query": "*"}))
        return held >= self._max_groups

    def groups(self, dps: str) -> list[dict]:
        """Every enrollment group of the instance (``pkictl doctor --dps``)."""
        with translated(f"enrollment groups of {dps}"):
            return list(self._client(dps).enrollment_group.query({"query": "*"}))

    def get_group(self, dps: str, group_id: str) -> Enrollment | None:
        return self._get(dps, "enrollment group", group_id)

    def create_group(self, dps: str, group: dict) -> Enrollment:
        """Create only if absent: ``AlreadyExists`` if it exists, ``CapacityExhausted`` if DPS is full."""
        return self._put(dps, "enrollment group", group["enrollmentGroupId"], group, None)

    def replace_group(self, dps: str, group: dict, etag: str) -> Enrollment:
        """Replace a group only if unchanged since it was read at ``etag``; ``Conflict`` otherwise."""
        return self._put(dps, "enrollment group", group["enrollmentGroupId"], group, etag)

    # --- individual enrollments (blocking one device of a group) and registration states -------------
    def get_enrollment(self, dps: str, registration_id: str) -> Enrollment | None:
        return self._get(dps, "individual enrollment", registration_id)

    def put_enrollment(self, dps: str, enrollment: dict, etag: str | None) -> Enrollment:
        return self._put(dps, "individual enrollment", enrollment["registrationId"], enrollment, etag)

    def delete_enrollment(self, dps: str, registration_id: str, etag: str) -> None:
        """Delete at ``etag``; gone already is fine."""
        try:
            with translated(f"individual enrollment {registration_id} on {dps}"):
                self._client(dps).enrollment.delete(registration_id, if_match=etag)
        except NotFound:
            pass

    def registration(self, dps: str, registration_id: str) -> dict | None:
        """The device's registration state (``assignedHub``, ``deviceId``), or None if it never registered."""
        try:
            with translated(f"registration {registration_id} on {dps}"):
                return self._client(dps).device_registration_state.get(registration_id)
        except NotFound:
            return None

    def registrations(self, dps: str, group_id: str, page_size: int = 1000) -> Iterator[dict]:
        """Registration states of every device that registered through a group (paged by the SDK)."""
        with translated(f"registrations of enrollment group {group_id} on {dps}"):
            yield from self._client(dps).device_registration_state.query(group_id, top=page_size)
