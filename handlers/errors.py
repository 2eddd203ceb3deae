"""The handlers' error tree. ``clients`` translate SDK exceptions into these; only the edges
(``function_app``, ``pkictl``, ``devhost``) decide what each means for a message or an exit code."""


class HandlerError(Exception):
    """Base of every error a handler or a port raises on purpose."""


class InvalidMessage(HandlerError, ValueError):
    """The input cannot be accepted as it is; retrying will not help. ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class NotFound(HandlerError):
    """A record or remote object the use case needs does not exist."""


class AlreadyExists(HandlerError):
    """A create-if-absent lost: the thing exists already."""


class Conflict(HandlerError):
    """A conditional write lost (stale ETag) or the request contradicts recorded state."""


class TransientError(HandlerError):
    """A dependency failed in a way that may pass (throttling, 5xx, timeouts): retry later."""
