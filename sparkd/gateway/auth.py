"""Who may use the gateway: API keys (digests only, compared in constant time), per-key models
and rate limits, and the Host and Origin checks that keep a browser page from using a gateway
it can reach (DNS rebinding, cross-site requests).

Pure except `load_keys`/`read_keys_file`, which read the keys file (or the systemd credential
it is delivered as) and check its mode.

Keys. A key is `sk-sparkd-` and 43 characters of `secrets.token_urlsafe(32)` (256 random
bits), shown once when it is made (`sparkd gateway-key add`). The keys file keeps
HMAC-SHA-256(salt, key) with a random salt per entry; with 256 random bits a fast keyed hash
is the right one (nothing to guess, so nothing for a slow hash to slow down). A presented key
is compared against every entry with `hmac.compare_digest` and no early exit. Keys never go
on a command line, into the config, into a log, or to an engine (the gateway does not forward
the client's Authorization when keys are on).

    # /etc/sparkd/gateway-keys.toml (mode 0600 root, or 0640 root:sparkd-gateway)
    [keys.alice]
    digest = "hmac-sha256:SALT:DIGEST"
    models = ["qwen"]          # optional: only these models (default: every model)
    rate_per_minute = 120      # optional: a token bucket (default: no limit)
    burst = 20                 # optional: the bucket's size (default: rate_per_minute)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sparkd.config import Config, listen_is_loopback
from sparkd.errors import ConfigError

KEY_PREFIX: Final = "sk-sparkd-"
DIGEST_SCHEME: Final = "hmac-sha256"
CREDENTIAL: Final = "gateway-keys"  # LoadCredential=gateway-keys:... in the unit
# What the unit's SetCredential= hands over when the keys file is missing (systemd 252 takes
# no empty value there).
NO_KEYS_FILE: Final = "# sparkd: no keys file"
KEY_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_DIGEST_RE: Final = re.compile(rf"{DIGEST_SCHEME}:([0-9a-f]{{32}}):([0-9a-f]{{64}})\Z")
_ENTRY_KEYS: Final = ("digest", "models", "rate_per_minute", "burst")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    salt: bytes
    digest: bytes
    models: frozenset[str] | None = None  # None: every model
    rate_per_minute: float | None = None
    burst: float | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Keys:
    entries: tuple[KeyEntry, ...] = ()
    source: str | None = None  # where they were read from, for messages

    def __bool__(self) -> bool:
        return bool(self.entries)

    def verify(self, presented: str) -> KeyEntry | None:
        """The entry of a presented key. Every entry is compared (no early exit), each in
        constant time."""
        raw = presented.encode("utf-8", "surrogateescape")
        found: KeyEntry | None = None
        for entry in self.entries:
            mac = hmac.new(entry.salt, raw, hashlib.sha256).digest()
            if hmac.compare_digest(mac, entry.digest) and found is None:
                found = entry
        return found


def digest_of(key: str, salt: bytes) -> str:
    mac = hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()
    return f"{DIGEST_SCHEME}:{salt.hex()}:{mac}"


def new_key() -> tuple[str, str]:
    """A new key and the digest to store: (secret, "hmac-sha256:SALT:DIGEST")."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, digest_of(secret, secrets.token_bytes(16))


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents: `Authorization: Bearer KEY` (OpenAI clients) or
    `x-api-key: KEY` (Anthropic clients, /v1/messages)."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key is not None and x_api_key.strip():
        return x_api_key.strip()
    return None


def parse_keys(text: str, *, source: str) -> Keys:
    """The keys file's text as Keys; errors name the file and the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = [k for k in raw if k != "keys"]
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown key; the file holds [keys.NAME]"
                          " tables")
    table = raw.get("keys", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: keys: expected tables [keys.NAME]")
    entries = [_entry(source, name, value) for name, value in table.items()]
    return Keys(tuple(entries), source)


def _entry(source: str, name: str, t: object) -> KeyEntry:
    where = f"{source}: keys.{name}"
    if not KEY_NAME_RE.match(name):
        raise ConfigError(f"{where}: a key name is letters, digits, '_', '.', '-' (at most 64)")
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    for k in t:
        if k not in _ENTRY_KEYS:
            raise ConfigError(f"{where}.{k}: unknown key; known keys here: "
                              + ", ".join(_ENTRY_KEYS))
    digest = t.get("digest")
    m = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if m is None:
        raise ConfigError(f"{where}.digest: expected \"{DIGEST_SCHEME}:SALT:DIGEST\" as"
                          " `sparkd gateway-key add` writes it (never the key itself)")
    models = t.get("models")
    if models is not None and (not isinstance(models, list)
                               or not all(isinstance(x, str) for x in models)):
        raise ConfigError(f"{where}.models: expected a list of model names")
    rate = _positive(where, t, "rate_per_minute")
    burst = _positive(where, t, "burst")
    if burst is not None and rate is None:
        raise ConfigError(f"{where}.burst: needs rate_per_minute")
    return KeyEntry(name, bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2)),
                    None if models is None else frozenset(models), rate, burst)


def _positive(where: str, t: Mapping[str, Any], key: str) -> float | None:
    value = t.get(key)
    if value is None:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not 0 < value <= 1e9 or math.isnan(value)):
        raise ConfigError(f"{where}.{key}: expected a number from 0 (excluded) to 1e9")
    return float(value)


def read_keys_file(path: Path, *, check_mode: bool = True) -> Keys:
    """The keys in a file, refusing one that others may write or read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: gateway.keys_file not found (create a key with"
                          f" `sparkd gateway-key add NAME --file {path}`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: gateway.keys_file: cannot open: {exc.strerror}"
                          " (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: gateway.keys_file: not a regular file")
        if check_mode and st.st_mode & 0o027:
            raise ConfigError(
                f"{path}: gateway.keys_file: mode {stat.S_IMODE(st.st_mode):04o} lets other"
                f" users {'change' if st.st_mode & 0o022 else 'read'} it: chmod 0600 {path}"
                " (the unit reads it as a systemd credential), or 0640 with group"
                " sparkd-gateway")
        data = f.read(1 << 20)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: gateway.keys_file: not UTF-8 text") from None
    return parse_keys(text, source=str(path))


def load_keys(keys_file: Path | None, environ: Mapping[str, str] = os.environ) -> Keys:
    """The keys in force: the systemd credential `gateway-keys` when the unit delivers the
    keys file as one (LoadCredential=, read by systemd as root), else gateway.keys_file,
    else none."""
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and keys_file is not None:
        path = Path(creds) / CREDENTIAL
        try:
            with path.open("rb") as f:
                placeholder = f.read(len(NO_KEYS_FILE) + 2).strip() in (
                    b"", NO_KEYS_FILE.encode())
            if not placeholder:
                # systemd made it readable by this service's user only.
                return read_keys_file(path, check_mode=False)
        except FileNotFoundError:
            pass
    if keys_file is None:
        return Keys()
    return read_keys_file(keys_file)


def check_keys(config: Config, environ: Mapping[str, str] = os.environ) -> Keys:
    """The keys in force, refused (ConfigError) when the file is bad, or when there are none
    and gateway.listen reaches beyond this machine (`sparkd check-config`, the gateway's
    start and reload)."""
    keys = load_keys(config.gateway.keys_file, environ)
    if not keys and not listen_is_loopback(config.gateway.listen):
        raise ConfigError(
            f"{config.gateway.keys_file}: no API keys, and gateway.listen"
            f" ({config.gateway.listen}) is reachable from other machines: add one with"
            f" `sparkd gateway-key add NAME --file {config.gateway.keys_file}`, or listen on"
            ' "127.0.0.1:PORT"')
    return keys


def add_entry(text: str, name: str, digest: str, *, models: tuple[str, ...] = (),
              rate_per_minute: float | None = None, burst: float | None = None) -> str:
    """The keys file's text with one more entry (appended: comments and order kept)."""
    existing = parse_keys(text, source="keys file")
    if not KEY_NAME_RE.match(name):
        raise ConfigError(f"{name!r}: a key name is letters, digits, '_', '.', '-'"
                          " (at most 64)")
    if any(e.name == name for e in existing.entries):
        raise ConfigError(f"keys.{name} exists already: remove it first, or pick another name")
    lines = [f"[keys.{name}]", f'digest = "{digest}"']
    if models:
        lines.append("models = [" + ", ".join(f'"{m}"' for m in models) + "]")
    if rate_per_minute is not None:
        lines.append(f"rate_per_minute = {rate_per_minute:g}")
    if burst is not None:
        lines.append(f"burst = {burst:g}")
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    result = text + sep + "\n".join(lines) + "\n"
    parse_keys(result, source="keys file")  # what we write must read back
    return result


# --- Host and Origin ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """A Host header the gateway answers: an IP literal (no DNS name, so no rebinding),
    `localhost`, or a configured name (gateway.allowed_hosts)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name, sep, port = host.rpartition(":")
        if not sep or not port.isdigit():
            name = host
    name = name.rstrip(".")
    if not name:
        return False
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=512)
def origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """A browser's Origin the gateway serves: a page on this machine (loopback, localhost)
    or under a configured name. `null` (sandboxed frames, file: pages) is foreign."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        name = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not name:
        return False
    if name == "localhost" or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# --- rate limits -----------------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """`rate_per_minute` requests a minute on average, `burst` at once."""

    rate_per_s: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate_per_minute: float, burst: float | None, now: float) -> TokenBucket:
        capacity = max(1.0, burst if burst is not None else rate_per_minute)
        return cls(rate_per_minute / 60.0, capacity, capacity, now)

    def take(self, now: float) -> float:
        """0 when a request may go now (one token taken), else the seconds until it may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass(slots=True)
class RateLimits:
    """One bucket per key name (kept across reloads while the key's limits stay)."""

    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def wait(self, entry: KeyEntry, now: float) -> float:
        if entry.rate_per_minute is None:
            return 0.0
        bucket = self.buckets.get(entry.name)
        expected = (entry.rate_per_minute / 60.0,
                    max(1.0, entry.burst if entry.burst is not None else entry.rate_per_minute))
        if bucket is None or (bucket.rate_per_s, bucket.capacity) != expected:
            bucket = self.buckets[entry.name] = TokenBucket.full(
                entry.rate_per_minute, entry.burst, now)
        return bucket.take(now)
