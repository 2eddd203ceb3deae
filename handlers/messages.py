"""Decoding queue messages into checked fields, once, at the edge of each use case.

Producers differ: ERP systems usually send plain JSON, Azure tools (Storage Explorer, the
Functions host's own output bindings with the default encoding) send base64. Both are accepted.
Every problem is an ``InvalidMessage`` naming the field and the rule.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidMessage

MAX_MESSAGE_BYTES = 64 * 1024  # Azure Storage queue messages are at most 64 KiB
MAX_JSON_DEPTH = 32  # no contract nests deeper than 4; deeper input is refused before the parser recurses
# One rule for every requestId (queue messages and batch metadata): it is logged, audited and compared.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID_RULE = "must be 1-128 printable ASCII characters without spaces"


class JsonProblem(ValueError):
    """Why a text is not JSON this service accepts (each input turns it into its own rejection)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:  # RFC 8259 4: names SHOULD be unique; keeping the last one lets one text say two things
            raise JsonProblem(f"has the key {key!r} twice")
        document[key] = value
    return document


def _deepest(text: str) -> int:
    """How deep arrays and objects nest, outside strings (linear; cheap when brackets are few)."""
    if text.count("{") + text.count("[") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _valid_unicode(value: Any) -> None:
    """No lone surrogate (``"\\ud800"`` is valid JSON and invalid text): it would break every UTF-8 writer later."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonProblem("holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key)
            _valid_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item)


def load_json(text: str) -> Any:
    """JSON as every input of the service is read: nested at most ``MAX_JSON_DEPTH`` deep, no key twice in an
    object, every string valid Unicode. ``JsonProblem`` (a ``ValueError``) says what is wrong."""
    if _deepest(text) > MAX_JSON_DEPTH:
        raise JsonProblem(f"nests arrays or objects more than {MAX_JSON_DEPTH} deep")
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except JsonProblem:
        raise
    except (ValueError, RecursionError) as exc:
        raise JsonProblem(f"is not valid JSON ({exc})") from None
    _valid_unicode(document)
    return document


@dataclass(frozen=True)
class Delivery:
    """Which queue message a handler is running: its id (the same on every redelivery) and enqueue time."""

    message_id: str | None = None
    enqueued_at: dt.datetime | None = None


def decode_json_message(raw: bytes | str) -> dict[str, Any]:
    """The JSON object in a queue message body, plain or base64-encoded."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidMessage("message", f"is {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
    text = data.strip()
    if not text:
        raise InvalidMessage("message", "is empty; expected a JSON object")
    if not text.startswith((b"{", b"[")):
        try:
            text = base64.b64decode(text, validate=True).strip()
        except (binascii.Error, ValueError):
            raise InvalidMessage("message", "is neither JSON nor base64-encoded JSON") from None
    try:
        document = load_json(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidMessage("message", "is not UTF-8 text") from None
    except JsonProblem as exc:
        raise InvalidMessage("message", str(exc)) from None
    if not isinstance(document, dict):
        raise InvalidMessage("message", f"must be a JSON object, not {type(document).__name__}")
    return document


class Fields:
    """Typed access to a message's fields that records which were read, to reject unknown ones."""

    def __init__(self, document: Mapping[str, Any], prefix: str = ""):
        self._document = document
        self._prefix = prefix
        self._read: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self._document and self._document[key] is not None

    def _value(self, key: str, required: bool) -> Any:
        """The raw value (marking the key as known); ``None`` when absent and optional."""
        self._read.add(key)
        value = self._document.get(key)
        if value is None and required:
            raise InvalidMessage(self._name(key), "is required")
        return value

    def text(self, key: str, *, required: bool = False, max_length: int = 256,
             pattern: re.Pattern | None = None, rule: str = "") -> str | None:
        value = self._value(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidMessage(self._name(key), f"must be a string, not {_json_type(value)}")
        if required and not value.strip():
            raise InvalidMessage(self._name(key), "must not be empty")
        if len(value) > max_length:
            raise InvalidMessage(self._name(key), f"must be at most {max_length} characters, got {len(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidMessage(self._name(key), f"{value!r} {rule}")
        return value

    def integer(self, key: str, *, required: bool = False, minimum: int = 0, maximum: int = 2 ** 31) -> int | None:
        value = self._value(key, required)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidMessage(self._name(key), f"must be a whole number, not {_json_type(value)}")
        if not minimum <= value <= maximum:
            raise InvalidMessage(self._name(key), f"must be between {minimum} and {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        self._read.add(key)
        value = self._document.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidMessage(self._name(key), f"must be true or false, not {_json_type(value)}")
        return value

    def text_list(self, key: str, *, max_items: int = 10, max_length: int = 256) -> tuple[str, ...] | None:
        self._read.add(key)
        value = self._document.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InvalidMessage(self._name(key), "must be a list of non-empty strings")
        if len(value) > max_items:
            raise InvalidMessage(self._name(key), f"must have at most {max_items} items, got {len(value)}")
        for item in value:
            if len(item) > max_length:
                raise InvalidMessage(self._name(key), f"items must be at most {max_length} characters")
        return tuple(value)

    def obj(self, key: str, *, max_bytes: int = 16 * 1024) -> dict | None:
        self._read.add(key)
        value = self._document.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidMessage(self._name(key), f"must be a JSON object, not {_json_type(value)}")
        size = len(json.dumps(value))
        if size > max_bytes:
            raise InvalidMessage(self._name(key), f"must be at most {max_bytes} bytes of JSON, got {size}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._document) - self._read)
        if unknown:
            raise InvalidMessage(self._name(unknown[0]) if len(unknown) == 1 else "message",
                                 f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(sorted(self._read))}")


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
