"""PURE: the gateway's errors, rendered as OpenAI-style bodies the `openai` client understands,
and upstream engines' error bodies (vLLM's flat form, or OpenAI's) turned into the same."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from sparkd.errors import SparkdError

TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(SparkdError):
    """A request the gateway refuses or cannot serve; `code` is stable and machine-readable."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (the worker process sends refusals back): not just Exception.args.
        return (_rebuild, (self.status, self.code, self.message, self.param, self.retry_after_s))

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, self.message, param=self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def _rebuild(status: int, code: str, message: str, param: str | None,
             retry_after_s: float | None) -> GatewayError:
    return GatewayError(status, code, message, param=param, retry_after_s=retry_after_s)


def error_body(status: int, code: str, message: str, *, param: str | None = None
               ) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def upstream_error_body(status: int, raw: bytes) -> dict[str, Any]:
    """An engine's error reply as an OpenAI-style body (the engine's message kept)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, Mapping):
        err = obj.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return {"error": {"message": err["message"], "type": err.get("type"),
                              "param": err.get("param"), "code": err.get("code")}}
        if isinstance(obj.get("message"), str):  # vLLM / SGLang: {"object": "error", ...}
            return {"error": {"message": obj["message"], "type": obj.get("type"),
                              "param": obj.get("param"), "code": obj.get("code")}}
        if isinstance(obj.get("detail"), str):  # FastAPI
            return error_body(status, "upstream_error", obj["detail"])
    text = raw[:500].decode("utf-8", "replace").strip() or "(empty body)"
    return error_body(status, "upstream_error", f"the engine answered HTTP {status}: {text}")
