"""Turn API failures into Kopf's retry semantics (every error classified: permanent or retried)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import kopf

from llmpipe_operator.k8s import errors as k8s_errors

TRANSIENT_DELAY_SECONDS = 5.0
"""Conflicts and a restarting API server clear within seconds."""
FORBIDDEN_DELAY_SECONDS = 60.0
"""Missing RBAC needs a human; retry slowly so the fix is picked up without a restart."""


class Forbidden(kopf.TemporaryError):
    """The operator's RBAC does not allow the step (retried slowly: a human must grant it)."""


@asynccontextmanager
async def classified(step: str) -> AsyncIterator[None]:
    """Re-raise API failures of `step` as kopf.TemporaryError or kopf.PermanentError."""
    try:
        yield
    except k8s_errors.API_ERRORS as error:
        text = f"{step}: {k8s_errors.describe(error)}"
        if k8s_errors.is_transient(error):
            raise kopf.TemporaryError(text, delay=TRANSIENT_DELAY_SECONDS) from error
        if k8s_errors.is_forbidden(error):
            raise Forbidden(
                f"{text} (check the operator's RBAC: helm/llmpipe/templates/rbac.yaml)",
                delay=FORBIDDEN_DELAY_SECONDS,
            ) from error
        raise kopf.PermanentError(text) from error
