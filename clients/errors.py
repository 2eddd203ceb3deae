"""One place that turns azure-core exceptions into the handlers' error tree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from handlers.errors import (
    AlreadyExists,
    Conflict,
    NoCredential,
    NotFound,
    NotPermitted,
    TransientError,
)

# Throttling, timeouts and server faults may pass; everything else is a verdict on the request.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def not_permitted(what: str, status: int, message: str, codes: tuple[str, ...] = ()) -> NotPermitted:
    """The refusal in the service's own words (Key Vault names the caller, the action and the resource)."""
    text = " ".join(str(message).split())[:600]
    if not status:  # the credential chain produced no token: the request never reached the service
        return NoCredential(what, text)
    where = " ".join([f"HTTP {status}", "/".join(c for c in codes if c)]).strip()
    return NotPermitted(f"{what}: not permitted ({where}): {text}")


def _codes(exc: HttpResponseError) -> tuple[str, ...]:
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None) or {}
    code = getattr(exc, "error_code", None) or getattr(error, "code", None) or ""
    return code, inner.get("code", "") if isinstance(inner, dict) else ""


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run an SDK call; re-raise its failure as NotFound / AlreadyExists / Conflict / TransientError."""
    try:
        yield
    except ResourceNotFoundError as exc:
        raise NotFound(f"{what}: not found") from exc
    except ResourceExistsError as exc:
        raise AlreadyExists(f"{what}: already exists") from exc
    except ResourceModifiedError as exc:
        raise Conflict(f"{what}: changed by someone else (ETag mismatch)") from exc
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except HttpResponseError as exc:
        status = exc.status_code or 0
        code = getattr(exc, "error_code", None) or ""
        if status in (401, 403) or isinstance(exc, ClientAuthenticationError):
            raise not_permitted(what, status, exc.message or str(exc), _codes(exc)) from exc
        if status in TRANSIENT_STATUS:
            raise TransientError(f"{what}: HTTP {status} {code}".rstrip()) from exc
        if status == 412:
            raise Conflict(f"{what}: changed by someone else (precondition failed)") from exc
        if status == 409:
            raise AlreadyExists(f"{what}: conflict ({code or 'exists'})") from exc
        raise
