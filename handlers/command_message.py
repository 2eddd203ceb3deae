"""The ``pki-commands`` message: its contract (``Command.parse``), its identity and its order."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pki.ids import registration_id_problem

from .errors import InvalidMessage
from .messages import REQUEST_ID, REQUEST_ID_RULE, Delivery, Fields, decode_json_message
from .records import check_customer_id

QUEUE = "pki-commands"


COMMANDS = ("disable-device", "enable-device", "disable-customer", "enable-customer", "renew-intermediate",
            "enable-custom-allocation", "disable-custom-allocation")


DEVICE_COMMANDS = ("disable-device", "enable-device")
ALLOCATION_COMMANDS = ("enable-custom-allocation", "disable-custom-allocation")


@dataclass(frozen=True)
class Command:
    command: str
    customer_id: str
    reason: str
    device_id: str | None = None
    request_id: str | None = None
    disable_devices: bool = False
    force: bool = False

    @classmethod
    def parse(cls, raw: bytes | str) -> Command:
        """Check a message against the contract; ``InvalidMessage`` names the first bad field."""
        fields = Fields(decode_json_message(raw))
        command = fields.text("command", required=True, max_length=32)
        if command not in COMMANDS:
            raise InvalidMessage("command", f"{command!r} must be one of {', '.join(COMMANDS)}")
        customer_id = check_customer_id(fields.text("customerId", required=True, max_length=63))
        device_id = fields.text("deviceId", max_length=128)
        if command in DEVICE_COMMANDS:
            if device_id is None:
                raise InvalidMessage("deviceId", f"is required for {command}")
            problem = registration_id_problem(device_id)
            if problem:
                raise InvalidMessage("deviceId", f"{device_id!r} {problem}")
        elif device_id is not None:
            raise InvalidMessage("deviceId", f"is not allowed for {command}")
        reason = fields.text("reason", required=True, max_length=512)
        if not reason.isprintable():
            raise InvalidMessage("reason", "must be printable text on one line")
        disable_devices = fields.boolean("disableDevices")
        if disable_devices and command != "disable-customer":
            raise InvalidMessage("disableDevices", "is only for disable-customer")
        force = fields.boolean("force")
        if force and command != "renew-intermediate":
            raise InvalidMessage("force", "is only for renew-intermediate")
        request_id = fields.text("requestId", max_length=128, pattern=REQUEST_ID, rule=REQUEST_ID_RULE)
        fields.reject_unknown()
        return cls(command=command, customer_id=customer_id, reason=reason, device_id=device_id,
                   request_id=request_id, disable_devices=disable_devices, force=force)


def order_key(command: Command, delivery: Delivery) -> str:
    """Later commands sort later: enqueue time (microseconds), then requestId, then message id."""
    at = delivery.enqueued_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") \
        if delivery.enqueued_at else ""
    return f"{at}|{command.request_id or ''}|{delivery.message_id or ''}"


def command_id(command: Command, delivery: Delivery) -> str:
    """What makes two deliveries "the same command": its requestId, else its queue message id."""
    return command.request_id or f"message:{delivery.message_id}"


def enqueued_before(order: str, other: str) -> bool:
    """Whether the command of ``order`` was enqueued strictly before that of ``other``. Queue insertion times have
    one-second resolution (Azure Storage's InsertionTime; Azurite's too), so two commands of the same second cannot
    be told apart by it, and the requestId after it is random: neither supersedes the other, the later delivery
    is applied on top (the record and DPS/IoT Hub then end in its state)."""
    return order.split("|", 1)[0] < other.split("|", 1)[0]

