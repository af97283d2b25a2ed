"""PURE: the gateway's routes, an explicit allow-list, and the one way a request target becomes
a route.

A request target is normalized before it is matched: percent-decoded once, dot segments
resolved (RFC 3986 5.2.4), repeated and trailing slashes dropped. What is left must be made of
the characters a route can hold (letters, digits, `-`, `_`, `.`, `~`, `/`), so a target that
still holds `%` after decoding (double encoding), a backslash, a control character or
anything else matches nothing. The path the engine is sent is the canonical one built here,
never the client's text: `/v1/chat/completions/` is the chat route (with its checks),
`/v1/../metrics` is the gateway's own /metrics, and `/v1/%2e%2e/admin` or
`/v1/..%2f..%2fadmin` are `/admin`, which is no route (404), so nothing outside this table
reaches an engine (vLLM's dev routes, SGLang's `/update_weights_from_disk`, and the routes
past vLLM's `--api-key`, which guards `/v1` only).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["chat", "completions", "models", "health", "metrics", "passthrough"]

MAX_TARGET: Final = 2048
_SAFE: Final = re.compile(r"[A-Za-z0-9._~/-]*\Z")
_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
GET_METHODS: Final = frozenset({"GET", "HEAD"})
POST_METHODS: Final = frozenset({"POST"})


@dataclass(frozen=True, slots=True)
class Route:
    template: str  # "/v1/responses/{id}": what metrics and errors name
    kind: Kind
    methods: frozenset[str]

    @property
    def json_body(self) -> bool:
        """Whether the route takes a JSON body (and so a JSON Content-Type)."""
        return "POST" in self.methods


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    path: str  # canonical: the path the engine is sent


@dataclass(frozen=True, slots=True)
class NoRoute:
    status: Literal[404, 405]
    code: str
    message: str
    allow: frozenset[str] = frozenset()


def _r(template: str, kind: Kind, methods: frozenset[str] = POST_METHODS) -> Route:
    return Route(template, kind, methods)


# The allow-list. The gateway's own routes, then the engines' /v1 routes it passes through (to
# the model the body names, else the loaded one): what vLLM, SGLang and llama.cpp serve under
# /v1 that a client needs. Not here, on purpose: /v1/load_lora_adapter and
# /v1/unload_lora_adapter (vLLM: load files from the engine's disk), /v1/files and /v1/batches
# (SGLang: write files), /v1/audio/* (multipart bodies, which the media check cannot read).
ROUTES: Final[tuple[Route, ...]] = (
    _r("/v1/chat/completions", "chat"),
    _r("/v1/completions", "completions"),
    _r("/v1/models", "models", GET_METHODS),
    _r("/health", "health", GET_METHODS),
    _r("/metrics", "metrics", GET_METHODS),
    _r("/v1/embeddings", "passthrough"),
    _r("/v1/responses", "passthrough"),
    _r("/v1/responses/{id}", "passthrough", GET_METHODS),
    _r("/v1/responses/{id}/cancel", "passthrough"),
    _r("/v1/rerank", "passthrough"),
    _r("/v1/score", "passthrough"),
    _r("/v1/tokenize", "passthrough"),
    _r("/v1/detokenize", "passthrough"),
    _r("/v1/messages", "passthrough"),
    _r("/v1/messages/count_tokens", "passthrough"),
)

_STATIC: Final = {r.template: r for r in ROUTES if "{" not in r.template}
_PATTERNS: Final = tuple((r.template.split("/")[1:], r) for r in ROUTES if "{" in r.template)


def normalize(target: str) -> str | None:
    """The canonical path of a request target (its query dropped), or None when it cannot
    name a route."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if len(path) > MAX_TARGET or not path.startswith("/"):
        return None
    if "%" in path:
        try:
            path = urllib.parse.unquote(path, errors="strict")
        except UnicodeDecodeError:
            return None
    if not _SAFE.match(path):
        return None
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def find(path: str) -> Route | None:
    """The route of a canonical path."""
    route = _STATIC.get(path)
    if route is not None:
        return route
    segments = path.split("/")[1:]
    for parts, candidate in _PATTERNS:
        if len(parts) == len(segments) and all(
            p == s or (p == "{id}" and _ID.match(s)) for p, s in zip(parts, segments, strict=True)
        ):
            return candidate
    return None


def match(method: str, target: str) -> Match | NoRoute:
    """The route a request (method, raw target) asks for, or why there is none."""
    path = target.split("?", 1)[0]
    route = _STATIC.get(path)  # the common case: already canonical
    if route is None:
        canonical = normalize(target)
        route = None if canonical is None else find(canonical)
        if route is None or canonical is None:
            shown = path if len(path) <= 200 else path[:200] + "..."
            return NoRoute(404, "not_found",
                           f"no route {shown!r}: the gateway serves "
                           + ", ".join(sorted(r.template for r in ROUTES)))
        path = canonical
    if method not in route.methods:
        allow = ", ".join(sorted(route.methods))
        return NoRoute(405, "method_not_allowed", f"{method} {route.template}: only {allow}",
                       route.methods)
    return Match(route, path)


def redact(text: str, url: str) -> str:
    """`text` (an error about `url`) without the credentials `url` may carry
    (`http://user:password@host`): they never reach a client or a log."""
    _scheme, sep, rest = url.partition("://")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0] if sep else ""
    if not userinfo:
        return text
    text = text.replace(userinfo + "@", "***@")
    for part in userinfo.split(":"):
        if len(part) >= 3:
            text = text.replace(part, "***")
            unquoted = urllib.parse.unquote(part)
            if unquoted != part:
                text = text.replace(unquoted, "***")
    return text
