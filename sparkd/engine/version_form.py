"""PURE: what an engine version looks like, per engine, and how versions compare.

vLLM and SGLang versions are Python package versions (PEP 440, compared with
`packaging.version`, a dependency of sparkd): pre-releases sort before their release
(0.11.2rc1 < 0.11.2), and a local version such as pip shows for CUDA wheels
("0.34.0+cu130") is the release before the "+". llama.cpp versions are build numbers: "b11434"
(how llama.cpp tags its releases) or "11434" (what `llama-server --version` prints).
"""

from __future__ import annotations

import re
from typing import Final

from packaging.version import InvalidVersion, Version

_BUILD_RE: Final = re.compile(r"b?(\d+)")

#: The form of a version per engine, for error messages.
FORMS: Final = {
    "vllm": 'a vLLM release as pip shows it, such as "0.34.0" (or "0.34.0+cu130")',
    "sglang": 'an SGLang release as pip shows it, such as "0.5.23" (or "0.5.23.post1")',
    "llamacpp": 'a llama.cpp build number, such as "b11434" or "11434"',
}


def escaped(text: str) -> str:
    """Text with its control characters (and other non-printables) written as \\xNN."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def parse_version(engine: str, text: str) -> Version:
    """`text` as a version of `engine`; ValueError (saying which form was expected) when it
    is not one: "b11434" is no vLLM release, "0.34" no llama.cpp build."""
    form = FORMS.get(engine)
    if form is None:
        raise ValueError(f"{engine} has no versions")
    if engine == "llamacpp":
        m = _BUILD_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"expected {form}")
        return Version(m.group(1))
    if text != text.strip() or text[:1] in ("b", "B"):
        raise ValueError(f"expected {form}")
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"expected {form}") from None


def any_version(text: str) -> Version:
    """A version of any engine ("0.34.0", "b11434"), for the table's own entries."""
    m = _BUILD_RE.fullmatch(text)
    return Version(m.group(1)) if m else Version(text)
