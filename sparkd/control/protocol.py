"""The wire format, pure: one JSON object per line each way.

Request:  {"method": "status", "params": {...}}
Reply:    {"ok": true, "result": {...}}
     or   {"ok": false, "error": {"code": "...", "message": "..."}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from sparkd.errors import BadRequest, SparkdError

MAX_LINE: Final = 1 << 20  # a reply line (status of many engines, an event) the clients read
# A request line the daemon reads: requests are a method and a few parameters. With the
# connection limit this bounds what idle clients can make the daemon hold (256 x 64 KiB).
MAX_REQUEST_LINE: Final = 64 << 10


class Busy(SparkdError):
    """The daemon holds as many connections as it takes: try again."""

    code = "busy"


class RequestTimeout(SparkdError):
    """A client sent no complete request within the idle timeout."""

    code = "timeout"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request is not JSON: {exc}") from None
    except RecursionError:
        # `[[[[...` 60,000 deep: the decoder gives up at the recursion limit. Without this
        # the connection died with no reply (issue 10).
        raise BadRequest("request is nested too deeply to be a sparkd request") from None
    if not isinstance(obj, dict):
        raise BadRequest("request must be a JSON object")
    method = obj.get("method")
    if not isinstance(method, str):
        raise BadRequest('request needs "method": a string')
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest('"params" must be an object')
    return Request(method=method, params=params)


def ok_reply(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_reply(exc: SparkdError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}


def error_from_reply(error: Any) -> SparkdError:
    """Rebuild the daemon's error on the client side, keeping its code."""
    if not isinstance(error, dict):
        return SparkdError(f"malformed error reply: {error!r}")
    exc = SparkdError(str(error.get("message", "unknown error")))
    exc.code = str(error.get("code", "error"))
    return exc
