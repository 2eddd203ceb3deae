"""The handlers' error tree. ``clients`` translate SDK exceptions into these; only the edges
(``function_app``, ``pkictl``, ``devhost``) decide what each means for a message or an exit code."""


class HandlerError(Exception):
    """Base of every error a handler or a port raises on purpose."""


class Rejected(HandlerError):
    """The request cannot be carried out; retrying will not help. Recorded with its reason, not retried.
    ``field`` names the culprit where there is one."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class InvalidMessage(Rejected, ValueError):
    """The input is malformed or breaks a rule of its contract."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field=field)


class CapacityExhausted(Rejected):
    """No room left where the request needs it (e.g. every DPS instance holds 100 enrollment groups)."""


class NotFound(HandlerError):
    """A record or remote object the use case needs does not exist."""


class AlreadyExists(HandlerError):
    """A create-if-absent lost: the thing exists already."""


class Conflict(HandlerError):
    """A conditional write lost (stale ETag) or the request contradicts recorded state."""


class TransientError(HandlerError):
    """A dependency failed in a way that may pass (throttling, 5xx, timeouts): retry later."""


class NotPermitted(TransientError):
    """The service refused the caller's identity: no token, or no role granting the operation. Not the input's
    fault, and it may pass (a role assignment takes minutes to propagate): retried like a transient failure,
    and a message still refused lands in the poison queue with this reason."""


class NoCredential(NotPermitted):
    """No token at all: no credential in the chain could sign in (no managed identity here, no `az login`...).
    The service treats it as any refusal of its identity; the CLI names the settings to check. ``what``: the
    resource the token was for."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: no token: {reason}")
        self.what = what
