"""Identifier rules.

DPS registration ids for X.509 attestation: lowercase alphanumerics and ``- . _ :``, at most
64 characters, ending in an alphanumeric or ``-`` (DPS "registration id" rules; 64 is also
X.520's ub-common-name, and the id is the certificate's CN). The id doubles as the IoT Hub
device id.
"""

from __future__ import annotations

import string

from .errors import InvalidRegistrationId

MAX_REGISTRATION_ID_LENGTH = 64
_ALNUM = frozenset(string.ascii_lowercase + string.digits)
_ALLOWED = _ALNUM | frozenset("-._:")
_ALLOWED_LAST = _ALNUM | {"-"}


def registration_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid registration id, or ``None`` when it is."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_REGISTRATION_ID_LENGTH:
        return f"must be at most {MAX_REGISTRATION_ID_LENGTH} characters, got {len(value)}"
    for position, char in enumerate(value, start=1):
        if char not in _ALLOWED:
            if char.isupper() and char.lower() in _ALLOWED:
                return f"must be lowercase: {char!r} at position {position}"
            return f"character {char!r} at position {position} is not allowed; use a-z, 0-9, '-', '.', '_', ':'"
    if value[-1] not in _ALLOWED_LAST:
        return f"must end in a letter, a digit or '-', not {value[-1]!r}"
    return None


def check_registration_id(value: object, *, field: str = "deviceId") -> str:
    """``value`` if it is a valid registration id; ``InvalidRegistrationId`` naming the rule otherwise."""
    problem = registration_id_problem(value)
    if problem:
        shown = repr(value) if isinstance(value, str) and len(value) <= 100 else "value"
        raise InvalidRegistrationId(field, f"{shown} is not a valid DPS registration id: {problem}")
    return value  # type: ignore[return-value]
