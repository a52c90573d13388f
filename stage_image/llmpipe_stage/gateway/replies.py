"""aiohttp responses in OpenAI's error shape: `{"error": {"message", "type", ...}}`."""

from __future__ import annotations

from aiohttp import web

from llmpipe_stage import api_requests


def error_response(
    message: str,
    *,
    status: int,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def request_error(error: api_requests.RequestError) -> web.Response:
    return error_response(
        str(error), status=error.status, kind="invalid_request_error", param=error.param
    )


def unavailable(message: str) -> web.Response:
    return error_response(message, status=503, kind="service_unavailable")
