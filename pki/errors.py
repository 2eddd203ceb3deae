"""Errors raised by the pure X.509 layer.

Every error names the field it is about, so the edge (CLI, function app) can print it
as it is. ``ValueError`` subclasses mean "bad value"; ``TypeError`` is left to Python.
"""


class PkiError(Exception):
    """Base of every error raised by ``pki``."""


class InvalidInput(PkiError, ValueError):
    """A value given to ``pki`` breaks a rule; ``field`` names it, the message says the rule."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class InvalidRegistrationId(InvalidInput):
    pass


class InvalidCsr(InvalidInput):
    pass


class InvalidPem(InvalidInput):
    pass


class SigningError(PkiError):
    """A remote signer returned something that cannot be a signature for the key."""
