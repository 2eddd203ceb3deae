"""Where a customer's devices live in IoT Hub, as DPS and the records tell it: the commands' view of the hubs."""

from __future__ import annotations

from collections.abc import Mapping

from .leases import update
from .ports import Ports, Provisioning


def assigned(registration: dict | None) -> bool:
    return bool(registration) and registration.get("status", "assigned") == "assigned" \
        and bool(registration.get("assignedHub"))


def registered_through(dps: Provisioning, instance: str, group_id: str, registration_id: str) -> bool:
    """Whether the device's registration went through enrollment group ``group_id``. DPS's registration state does not
    name its enrollment (DeviceRegistrationState in the service API spec, 2021-10-01: no group field); the query of
    one group's registrations (DeviceRegistrationState_Query) is the only place that says, so it is read, paged,
    until the device turns up."""
    wanted = registration_id.lower()  # DPS registration ids compare case-insensitively
    return any((state.get("registrationId") or "").lower() == wanted for state in dps.registrations(instance, group_id))


def hub_placement(registration: dict | None, known: Mapping[str, str] | None) -> dict | None:
    """Where a device lives in IoT Hub: DPS's registration state when its latest attempt was assigned, otherwise what
    the device record learned when it last was. A refused attempt (``disabled``, ``failed``) names no hub, and the
    device is still where it was assigned before it (DPS does not remove it from the hub)."""
    if assigned(registration):
        return {"name": registration["assignedHub"],
                "deviceId": registration.get("deviceId") or registration.get("registrationId")}
    return {"name": known["name"], "deviceId": known["deviceId"]} if known and known.get("name") else None


def hub_devices_document(customer_id: str) -> str:
    """Where the hub devices that ``disable-customer`` disabled are kept, by hub: DPS forgets a device's hub once its
    latest attempt was refused (a disabled group refuses every device that tries again), so the enable that
    follows must find them here."""
    return f"customers/{customer_id}/hub-devices.json"


def remember_hub_devices(ports: Ports, customer_id: str, by_hub: dict[str, list[str]]) -> dict[str, list[str]]:
    """Merge ``by_hub`` into the kept list; returns the union (what an enable must reach)."""
    def merge(data: dict | None) -> dict | None:
        kept = (data or {}).get("hubs") or {}
        merged = {hub: sorted(set(kept.get(hub, [])) | set(by_hub.get(hub, []))) for hub in set(kept) | set(by_hub)}
        if data is not None and merged == kept:
            return None
        return {**(data or {"customerId": customer_id}), "hubs": merged}

    return update(ports.store, hub_devices_document(customer_id), merge).data["hubs"]
