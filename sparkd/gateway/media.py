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
from collections.abc import Mapping
from typing import Any, Final

# Keys whose string value (or whose {"url": ...}) is a URL an engine fetches.
URL_KEYS: Final = ("image_url", "audio_url", "video_url", "file_url", "input_image",
                   "input_video", "input_audio_url")
# In a part whose type names a medium, these keys may hold a URL or a path as well.
MEDIA_TYPES: Final = frozenset({
    "image", "video", "audio", "file", "image_url", "video_url", "audio_url", "input_image",
    "input_video", "input_audio", "input_file", "image_pil", "image_embeds"})
PART_KEYS: Final = ("url", "image", "video", "audio", "path", "file", "uri")
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
    """Where in `body` a fetchable media reference is (`messages[0].content[1]
    .video_url`), or None. The URL itself is not returned: it may carry a secret."""
    stack: list[tuple[object, tuple[Any, ...] | None]] = [(body, None)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, Mapping):
            for key in URL_KEYS:
                if key in node:
                    ref = node[key]
                    url = ref.get("url") if isinstance(ref, Mapping) else ref
                    if isinstance(url, str) and not is_inline(url):
                        return _render((where, key))
            kind = node.get("type")
            if isinstance(kind, str) and kind in MEDIA_TYPES:
                for key in PART_KEYS:
                    value = node.get(key)
                    if isinstance(value, str) and (
                        (key == "url" and not is_inline(value)) or _names_a_resource(value)
                    ):
                        return _render((where, key))
            for key, value in node.items():
                if isinstance(value, Mapping | list):
                    stack.append((value, (where, key)))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, Mapping | list):
                    stack.append((value, (where, i)))
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
