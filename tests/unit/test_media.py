"""media: every fetchable media reference in a body, whatever the route or part kind
(issue 10 item 2)."""

from __future__ import annotations

from typing import Any

import pytest

from sparkd.gateway.media import remote_media

URL = "http://169.254.169.254/latest/meta-data"
DATA = "data:image/png;base64,iVBORw0KGgo="


def chat(*parts: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


@pytest.mark.parametrize(("body", "where"), [
    (chat({"type": "image_url", "image_url": {"url": URL}}), "messages[0].content[0].image_url"),
    (chat({"image_url": {"url": URL}}), "messages[0].content[0].image_url"),  # no type
    (chat({"image_url": URL}), "messages[0].content[0].image_url"),
    (chat({"type": "video_url", "video_url": {"url": URL}}), "messages[0].content[0].video_url"),
    (chat({"video_url": {"url": " " + URL}}), "messages[0].content[0].video_url"),
    (chat({"type": "audio_url", "audio_url": {"url": URL}}), "messages[0].content[0].audio_url"),
    (chat({"audio_url": {"url": "file:///etc/shadow"}}), "messages[0].content[0].audio_url"),
    (chat({"type": "image", "url": URL}), "messages[0].content[0].url"),
    (chat({"type": "video", "path": "/var/lib/sparkd/x.mp4"}), "messages[0].content[0].path"),
    (chat({"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": URL}}),
     "messages[0].content[1].image_url"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": URL}]}]}, "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"type": "input_file", "file_url": URL}]}, "input[0].file_url"),
    ({"model": "m", "messages": [{"role": "tool", "content": [{"image_url": {"url": URL}}]}]},
     "messages[0].content[0].image_url"),
])
def test_remote_media_is_found(body: Any, where: str) -> None:
    assert remote_media(body) == where


@pytest.mark.parametrize("body", [
    chat({"type": "image_url", "image_url": {"url": DATA}}),
    chat({"image_url": {"url": "DATA:image/png;base64,AAAA"}}),
    chat({"type": "image_url", "image_url": 5}),
    chat({"type": "text", "text": "see http://example.com/cat.png"}),
    chat({"type": "image", "image": "/9j/4AAQSkZJRgABAQ"}),  # base64 of a JPEG
    chat({"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}),
    {"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"image_url": {"type": "string"},
                                         "url": {"type": "string"}}}}}]},
    {"model": "m", "prompt": "http://example.com"},
    [1, "x", None],
])
def test_inline_media_and_plain_text_are_not(body: Any) -> None:
    assert remote_media(body) is None


def test_the_url_is_not_in_the_answer() -> None:
    where = remote_media(chat({"image_url": {"url": "http://u:secret@h/x"}}))
    assert where is not None and "secret" not in where


def test_deep_and_wide_bodies_are_walked_without_recursion() -> None:
    deep: Any = {"image_url": URL}
    for _ in range(50_000):
        deep = [deep]
    assert remote_media(deep) is not None
    wide = chat(*({"type": "text", "text": "x"} for _ in range(100_000)))
    assert remote_media(wide) is None
