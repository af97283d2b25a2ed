"""PURE: one OpenAI request body made ready for an engine: parsed and checked (`limits`),
classified (`classify`), its messages rewritten for the model's role policy (`rewrite`), and
encoded again when the rewrite changed something.

A function of bytes and settings to a value (or a GatewayError): the gateway runs it on its
event loop for small bodies and in its worker process for large ones (`worker`), where the
same code gives the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from sparkd.gateway import classify, limits, media, rewrite
from sparkd.gateway.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Recipe:
    """What preparing a request needs from the config (small, and picklable)."""

    models: tuple[str, ...]  # the configured model names, sorted
    policies: Mapping[str, rewrite.PolicyChoice]
    rules: classify.CompiledRules
    limits: limits.Limits
    allow_remote_images: bool


@dataclass(frozen=True, slots=True)
class Prepared:
    model: str
    raw: bytes  # what goes to the engine: the client's bytes unless the rewrite changed some
    stream: bool
    workload: classify.Workload
    changes: int  # the rewrite's; 0: `raw` is the client's body byte for byte
    policy: str = "passthrough"
    roles_before: tuple[str, ...] = ()
    roles_after: tuple[str, ...] = ()


def prepare(raw: bytes, recipe: Recipe, *, chat: bool, user_agent: str = "",
            workload: classify.Workload | None = None) -> Prepared:
    """Raises GatewayError (4xx) for a body the gateway refuses."""
    body = limits.parse_body(raw)
    name = body.get("model")
    if not isinstance(name, str):
        raise GatewayError(400, "invalid_type", "model: expected a string", param="model")
    if name not in recipe.policies:
        known = ", ".join(recipe.models) or "none"
        raise GatewayError(404, "model_not_found",
                           f"The model `{name}` does not exist (configured: {known}).",
                           param="model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(400, "invalid_type", "stream: expected a boolean", param="stream")
    messages = limits.check_chat(body, recipe.limits) if chat else None
    if not recipe.allow_remote_images:  # every media kind, on every route (media.py)
        media.refuse_remote(body)
    if workload is None:
        workload = classify.classify(body, user_agent=user_agent, rules=recipe.rules,
                                     max_chars=recipe.limits.classifier_chars).workload
    if messages is None:
        return Prepared(name, raw, bool(stream), workload, 0)
    choice = recipe.policies[name]
    try:
        result = rewrite.rewrite(messages, choice)  # tool call arguments become JSON text
    except RecursionError:
        raise GatewayError(400, "invalid_json", "request body: nested too deeply") from None
    if not result.changes:
        return Prepared(name, raw, bool(stream), workload, 0, choice.policy,
                        result.roles_before, result.roles_after)
    body["messages"] = result.messages
    return Prepared(name, encode(body), bool(stream), workload, result.changes, choice.policy,
                    result.roles_before, result.roles_after)


def model_name(raw: bytes, *, allow_remote: bool) -> str | None:
    """The `model` a body names, if it is a JSON object naming one (the other /v1 routes: the
    engine reports anything else). Unless `allow_remote`, a fetchable media reference
    anywhere in it is refused (GatewayError 400), as on the chat routes."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not allow_remote:
        media.refuse_remote(body)
    name = body.get("model") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None


def encode(body: object) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        limits.check_unicode(body)  # names the character
        raise
    except RecursionError:
        raise GatewayError(400, "invalid_json", "request body: nested too deeply") from None
