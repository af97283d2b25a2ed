"""PURE: typed checks of TOML values for sparkd.config. Each error names the file and the dotted
key, says what was expected and shows what was found; unknown keys get a suggestion."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn, cast

from sparkd.errors import ConfigError

# A user or group name systemd's User=/Group= and the group database take without complaint
# (the portable POSIX subset, at most 31 characters).
ACCOUNT_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")
# The largest number any key takes unless it says otherwise: finite, and far from overflow.
NUMBER_MAX: Final = 1e9


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def plain(number: float) -> str:
    """A bound as people write it: 604800, 0.1, 1000000000."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


#: The longest found value an error message shows whole; a longer one is cut, with its length.
SHOWN_CHARS: Final = 120


def show(value: object) -> str:
    """A found value for an error message; control characters as \\xNN, never raw (a
    terminal would act on them); a long value cut to SHOWN_CHARS with its length said."""
    if isinstance(value, str):
        cut = value[:SHOWN_CHARS]
        text = '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in cut) + '"'
        return text if cut == value else f"{text}... ({len(value)} characters)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


#: The largest config file sparkd reads: a real one is a few KiB; a bigger one (a mistake, or
#: hostile) would be parsed, copied to the accepted copy and read by every engine start.
MAX_CONFIG_BYTES: Final = 1 << 20


def read_config_text(path: Path, env: str) -> str:
    """The text of the config file at `path` (UTF-8, at most MAX_CONFIG_BYTES), or a
    ConfigError naming the file and the fix; `env` is the variable that can point elsewhere."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (create it, or point --config/{env} at one)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a sparkd "
                          "config (a real one is a few KiB); point --config at the right "
                          "file, or cut this one down")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


class Validator:
    """Typed getters that raise ConfigError naming the file and dotted key."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, expected: str, found: object) -> NoReturn:
        shown = found if found == "nothing" else show(found)
        raise ConfigError(f"{self.source}: {key}: expected {expected}, got {shown}")

    def known_keys(self, t: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for k in t:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise ConfigError(
                    f"{self.source}: {where}: unknown key{suggest(k, list(allowed))}; "
                    f"known keys here: {', '.join(allowed)}"
                )

    def table(self, t: Mapping[str, Any], key: str, *, path: str | None = None) -> dict[str, Any]:
        value = t.get(key.rpartition(".")[2], {})
        if not isinstance(value, dict):
            self.fail(path or key, "a table", value)
        return cast(dict[str, Any], value)

    def _get(self, t: Mapping[str, Any], key: str) -> Any:
        return t.get(key.rpartition(".")[2])

    def _typed(
        self, t: Mapping[str, Any], key: str, default: Any, check: Callable[[Any], bool], what: str
    ) -> Any:
        value = self._get(t, key)
        if value is None:
            return default
        if not check(value):
            self.fail(key, what, value)
        return value

    def string(self, t: Mapping[str, Any], key: str, default: str) -> str:
        return cast(str, self._typed(t, key, default, lambda x: isinstance(x, str), "a string"))

    def opt_string(self, t: Mapping[str, Any], key: str) -> str | None:
        return cast(
            "str | None", self._typed(t, key, None, lambda x: isinstance(x, str), "a string")
        )

    def opt_strings(self, t: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
        value = self._get(t, key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            self.fail(key, "a list of strings", value)
        return tuple(value)

    def boolean(self, t: Mapping[str, Any], key: str, default: bool) -> bool:  # noqa: FBT001
        return cast(
            bool, self._typed(t, key, default, lambda x: isinstance(x, bool), "true or false")
        )

    def integer(self, t: Mapping[str, Any], key: str, default: int, *, lo: int, hi: int) -> int:
        what = f"an integer from {lo} to {hi}"
        return cast(
            int,
            self._typed(
                t,
                key,
                default,
                lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi,
                what,
            ),
        )

    def number(
        self, t: Mapping[str, Any], key: str, default: float, *, lo: float,
        hi: float = NUMBER_MAX,
    ) -> float:
        """A finite number within [lo, hi]: `inf` would crash arithmetic, `1e300` would
        render a 300-digit unit setting."""
        what = f"a number from {plain(lo)} to {plain(hi)}"
        value = self._typed(
            t,
            key,
            default,
            lambda x: (isinstance(x, int | float) and not isinstance(x, bool)
                       and math.isfinite(x) and lo <= x <= hi),
            what,
        )
        return float(value)

    def account(self, t: Mapping[str, Any], key: str, default: str, kind: str) -> str:
        """A user or group name (letters, digits, _ and -; at most 31)."""
        value = self.string(t, key, default)
        if not ACCOUNT_NAME_RE.fullmatch(value):
            self.fail(key, f"a plain {kind} name (a letter or _, then letters, digits, _ or -; "
                      "at most 31)", value)
        return value

    def choice(
        self, t: Mapping[str, Any], key: str, options: tuple[str, ...], default: str
    ) -> str:
        value = self._get(t, key)
        if value is None:
            return default
        if value not in options:
            hint = suggest(value, list(options)) if isinstance(value, str) else ""
            self.fail(key, "one of " + ", ".join(options) + hint, value)
        return cast(str, value)

    def abspath(self, t: Mapping[str, Any], key: str, default: Path) -> Path:
        value = self.opt_string(t, key)
        if value is None:
            return default
        if not value.startswith("/"):
            self.fail(key, "an absolute path", value)
        return Path(value)
