"""PURE: media an engine would fetch for a client, found anywhere in a request body.

vLLM fetches the URL of every media part it parses (a request-forgery path, CVE-2025-6242):
typed parts `image_url`, `input_image` (the Responses API, a plain string), `audio_url`,
`video_url`, and parts without `type` that carry one of those keys
(`_parse_chat_message_content_mm_part` in vllm/entrypoints/chat_utils.py, v0.10-v0.11), on
every route that takes messages (chat, responses, embeddings, score, pooling). SGLang reads
the same parts; Hugging Face processors also load `{"type": "image", "url" | "path" | ...}`.

So the check does not follow the shape of one route or one part kind: it walks the whole body
(linear in its size) and refuses any fetchable reference under a media key, with or without
`type`. Inline `data:` URLs are the one kind an engine does not fetch.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sparkd.gateway.errors import GatewayError

# Keys whose string value (or whose {"url": ...}) is a URL an engine fetches.
URL_KEYS: Final = ("image_url", "audio_url", "video_url", "file_url", "input_image",
                   "input_video", "input_audio_url")
# In a part whose type names a medium, these keys may hold a URL or a path as well.
MEDIA_TYPES: Final = frozenset({
    "image", "video", "audio", "file", "image_url", "video_url", "audio_url", "input_image",
    "input_video", "input_audio", "input_file", "image_pil", "image_embeds"})
PART_KEYS: Final = ("url", "image", "video", "audio", "path", "file", "uri")
_URL_KEY_SET: Final = frozenset(URL_KEYS)
_SCHEME: Final = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*:")


def is_inline(url: str) -> bool:
    """An inline data: URL: the one kind an engine does not fetch."""
    return url.lstrip()[:5].lower() == "data:"


def _names_a_resource(value: str) -> bool:
    """In a loose key (`image`, `path`...): a URL with a scheme other than data:, or a path.
    Raw base64 has neither a scheme nor a leading `/`... except JPEG's (`/9j/`): a leading
    slash counts as a path only when it is not base64 of an image."""
    if _SCHEME.match(value):
        return not is_inline(value)
    stripped = value.lstrip()
    return stripped.startswith(("/", "~", "./", "../")) and not stripped.startswith("/9j/")


def remote_media(body: object) -> str | None:
    """Where in `body` a fetchable media reference is (`messages[0].content[1].video_url`),
    or None. The URL itself is not returned: it may carry a secret."""
    if not _any_remote(body):  # the common case, without building paths
        return None
    return _find(body)


def _hit(node: dict[Any, Any]) -> str | None:
    """The key of `node` holding a fetchable reference, if any."""
    if not _URL_KEY_SET.isdisjoint(node):
        for key in URL_KEYS:
            if key in node:
                ref = node[key]
                url = ref.get("url") if type(ref) is dict else ref
                if isinstance(url, str) and not is_inline(url):
                    return key
    kind = node.get("type")
    if type(kind) is str and kind in MEDIA_TYPES:
        for key in PART_KEYS:
            value = node.get(key)
            if type(value) is str and (
                    (key == "url" and not is_inline(value)) or _names_a_resource(value)):
                return key
    return None


def _any_remote(body: object) -> bool:
    """One pass over the containers (JSON gives dicts and lists only), no paths built."""
    stack = [body]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            if _hit(node) is not None:
                return True
            values: Any = node.values()
        elif type(node) is list:
            values = node
        else:
            continue
        for value in values:
            if value and (type(value) is dict or type(value) is list):
                push(value)
    return False


def _find(body: object) -> str | None:
    stack: list[tuple[object, tuple[Any, ...] | None]] = [(body, None)]
    while stack:
        node, where = stack.pop()
        if type(node) is dict:
            key = _hit(node)
            if key is not None:
                return _render((where, key))
            stack.extend((v, (where, k)) for k, v in node.items() if type(v) in (dict, list))
        elif type(node) is list:
            stack.extend((v, (where, i)) for i, v in enumerate(node) if type(v) in (dict, list))
    return None


def _render(where: tuple[Any, ...] | None) -> str:
    parts: list[Any] = []
    while where is not None:
        where, last = where
        parts.append(last)
    text = ""
    for part in reversed(parts):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the body)"


def refuse_remote(body: object) -> None:
    """Raise 400 `remote_media_refused` for a body with a fetchable media reference."""
    where = remote_media(body)
    if where is not None:
        raise GatewayError(
            400, "remote_media_refused",
            f"{where}: media must be inline data: URLs; remote URLs and paths are refused (an"
            " engine that fetches them for a client is a request-forgery path, vLLM"
            " CVE-2025-6242; gateway.allow_remote_images turns them on)",
            param=where.split(".", 1)[0].split("[", 1)[0])
