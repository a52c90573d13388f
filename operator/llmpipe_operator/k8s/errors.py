"""Which API failures a retry can fix. No API calls of its own."""

from __future__ import annotations

import httpx2
from lightkube.core.exceptions import ApiError

API_ERRORS: tuple[type[Exception], ...] = (ApiError, httpx2.TransportError)
"""What a call in `k8s.api` may raise besides programming errors."""

_RETRYABLE_CODES = frozenset({408, 409, 429, 500, 502, 503, 504})


def is_transient(error: BaseException) -> bool:
    """Transport failures, conflicts, throttling and server errors pass; 4xx of ours do not."""
    if isinstance(error, httpx2.TransportError):
        return True
    if isinstance(error, ApiError):
        return error.status.code in _RETRYABLE_CODES
    return False


def describe(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return f"API error {error.status.code} {error.status.reason}: {error.status.message}"
    return f"{type(error).__name__}: {error}"


def is_forbidden(error: BaseException) -> bool:
    return isinstance(error, ApiError) and error.status.code == 403
