"""Fault directives: parsing the ``[[sim ...]]`` blocks and the ``X-Sim`` header.

Contract
--------
A request chooses its faults in two places:

* the **last user message** may contain any number of ``[[sim key=value key2=value2 flag]]``
  blocks; they are merged left to right (a later block wins per key) and are removed from the
  text before the answer is generated (:func:`strip_directives`);
* the ``X-Sim`` request header uses the same ``key=value ...`` syntax and wins per key over the
  message.

Tokens are separated by whitespace (commas are tolerated). A bare word is a flag (``diverge``);
``flag=1|true|yes|on`` / ``flag=0|false|no|off`` are accepted too. Unknown keys, bad values and
contradictory combinations raise :class:`DirectiveError`, which the server answers with HTTP 400
in OpenAI's error shape, so a typo in a test fails loudly instead of silently serving a clean
stream.

Keys are split in two groups (see ``docs/simulator.md``):

* **fault keys** (:data:`FAULT_KEYS`) change *how* the answer is delivered; with ``times=N`` they
  apply only to the first N requests with the same fingerprint;
* **shape keys** (``chunks``, ``times``, ``key``, ``diverge``) always apply, so a retried request
  produces the same answer as the failed one (unless ``diverge`` asks otherwise).

This module is pure: no I/O, stdlib only.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "DIRECTIVE_RE",
    "FAULT_KEYS",
    "DirectiveError",
    "Faults",
    "fingerprint",
    "parse_directives",
    "parse_tokens",
    "strip_directives",
]

#: One ``[[sim ...]]`` block. Case-insensitive ``sim``; the body may not contain ``]``.
DIRECTIVE_RE = re.compile(r"\[\[\s*sim\b([^\]]*)\]\]", re.IGNORECASE)

# Delays are capped so that a typo such as ``stall=36000000`` cannot overflow asyncio timers.
_MAX_SECONDS = 86_400.0
_MAX_COUNT = 1_000_000
_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class DirectiveError(ValueError):
    """A directive could not be understood; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Faults:
    """The parsed directives of one request. Every field has the "clean" value by default.

    Times are seconds (floats), counts are content chunks (ints). ``None`` means "not asked for".
    """

    # --- pacing / silence -------------------------------------------------------------------
    gap: float = 0.005  # between content chunks (also the "slow drip" knob)
    first_delay: float = 0.0  # after headers, before the first (role) chunk
    headers_delay: float = 0.0  # before the response headers
    stall_after: int | None = None  # after this many content chunks ...
    stall: float = 3600.0  # ... go silent this long, then continue
    keepalive: float | None = None  # SSE comment every S seconds while silent
    # --- broken streams ---------------------------------------------------------------------
    reset_after: int | None = None  # abort the TCP connection (RST) after N content chunks
    close_after: int | None = None  # close the TCP connection cleanly (FIN) mid-body
    malformed_after: int | None = None  # one ``data: {not json`` line after N chunks
    error_after: int | None = None  # in-stream ``{"error": ...}`` event after N chunks, then end
    # --- HTTP errors ------------------------------------------------------------------------
    status: int | None = None  # answer this status with OpenAI's error JSON, no stream
    retry_after: float | None = None  # ``Retry-After`` (integer seconds, rounded up)
    retry_after_ms: int | None = None  # ``retry-after-ms``
    # --- shape keys (never switched off by ``times``) ---------------------------------------
    chunks: int = 20  # number of content chunks in a complete answer
    times: int | None = None  # faults apply to the first N requests per fingerprint only
    key: str | None = None  # explicit fingerprint
    diverge: bool = False  # the answer text depends on the attempt number

    def given(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (what the request log shows)."""
        default = _DEFAULT
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def clean(self) -> Faults:
        """The same request with every fault key back to its default (used after ``times``)."""
        return replace(_DEFAULT, chunks=self.chunks, times=self.times, key=self.key, diverge=self.diverge)

    @property
    def has_faults(self) -> bool:
        return any(getattr(self, k) != getattr(_DEFAULT, k) for k in FAULT_KEYS)

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` as real servers send it: whole seconds, rounded up."""
        if self.retry_after is None:
            return None
        return str(max(0, math.ceil(self.retry_after)))


_DEFAULT = Faults()

#: Keys switched off for requests beyond ``times``.
FAULT_KEYS: tuple[str, ...] = (
    "gap",
    "first_delay",
    "headers_delay",
    "stall_after",
    "stall",
    "keepalive",
    "reset_after",
    "close_after",
    "malformed_after",
    "error_after",
    "status",
    "retry_after",
    "retry_after_ms",
)


def _seconds(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise DirectiveError(f"{key}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0 or value > _MAX_SECONDS:
        raise DirectiveError(f"{key}={raw!r}: expected seconds between 0 and {_MAX_SECONDS:g}")
    return value


def _count(key: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise DirectiveError(f"{key}={raw!r}: expected a whole number") from None
    if value < 0 or value > _MAX_COUNT:
        raise DirectiveError(f"{key}={raw!r}: expected a whole number between 0 and {_MAX_COUNT}")
    return value


def _status(key: str, raw: str) -> int:
    value = _count(key, raw)
    if not 400 <= value <= 599:
        raise DirectiveError(f"{key}={raw!r}: expected an HTTP error status (400-599)")
    return value


def _flag(key: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DirectiveError(f"{key}={raw!r}: expected a flag (no value, or 1/0, true/false)")


def _name(key: str, raw: str) -> str:
    if not raw:
        raise DirectiveError(f"{key}: expected a name, e.g. {key}=test-1")
    return raw


# key -> (parser, target field). ``stall_first`` is documented as the same thing as first_delay.
_PARSERS: dict[str, tuple[Any, str]] = {
    "gap": (_seconds, "gap"),
    "first_delay": (_seconds, "first_delay"),
    "stall_first": (_seconds, "first_delay"),
    "headers_delay": (_seconds, "headers_delay"),
    "stall_after": (_count, "stall_after"),
    "stall": (_seconds, "stall"),
    "keepalive": (_seconds, "keepalive"),
    "reset_after": (_count, "reset_after"),
    "close_after": (_count, "close_after"),
    "malformed_after": (_count, "malformed_after"),
    "error_after": (_count, "error_after"),
    "status": (_status, "status"),
    "retry_after": (_seconds, "retry_after"),
    "retry_after_ms": (_count, "retry_after_ms"),
    "chunks": (_count, "chunks"),
    "times": (_count, "times"),
    "key": (_name, "key"),
    "diverge": (_flag, "diverge"),
}
_FLAGS = {"diverge"}


def parse_tokens(text: str) -> dict[str, str]:
    """Split ``"a=1 b=2 flag"`` into ``{"a": "1", "b": "2", "flag": ""}`` (raw strings).

    Later occurrences of a key win. Keys are lower-cased; dashes are read as underscores so that
    ``stall-after=3`` works too.
    """
    out: dict[str, str] = {}
    for token in re.split(r"[\s,]+", text.strip()):
        if not token:
            continue
        key, sep, value = token.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not key:
            raise DirectiveError(f"{token!r}: expected key=value")
        if not sep and key not in _FLAGS:
            raise DirectiveError(f"{key}: needs a value ({key}=...)")
        out[key] = value.strip()
    return out


def _message_tokens(message_text: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for match in DIRECTIVE_RE.finditer(message_text):
        merged.update(parse_tokens(match.group(1)))
    return merged


def parse_directives(message_text: str | None, header: str | None = None) -> Faults:
    """Build :class:`Faults` from the last user message's raw text and the ``X-Sim`` header.

    Raises :class:`DirectiveError` on unknown keys, bad values or contradictions.
    """
    raw = _message_tokens(message_text or "")
    if header:
        raw.update(parse_tokens(header))  # the header wins per key
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in _PARSERS:
            known = ", ".join(sorted(_PARSERS))
            raise DirectiveError(f"unknown simulator directive {key!r} (known: {known})")
        parser, target = _PARSERS[key]
        values[target] = parser(key, text)
    if "stall" in values and "stall_after" not in values:
        raise DirectiveError(
            "stall=S needs stall_after=N (or use stall_first=S for a stall before the first chunk)"
        )
    if ("retry_after" in values or "retry_after_ms" in values) and "status" not in values:
        raise DirectiveError("retry_after / retry_after_ms need status=CODE (e.g. status=429)")
    if values.get("keepalive") == 0:
        raise DirectiveError("keepalive=0: expected a positive interval in seconds")
    return Faults(**values)


def strip_directives(text: str) -> str:
    """The text without ``[[sim ...]]`` blocks, whitespace runs collapsed to one space.

    Collapsing makes ``"Hi [[sim gap=1]] there"`` and ``"Hi there"`` the same conversation.
    """
    return " ".join(DIRECTIVE_RE.sub(" ", text).split())


def fingerprint(last_user_text: str, model: str, faults: Faults | None = None) -> str:
    """Identity of "the same request" for ``times`` and ``diverge``.

    ``key=NAME`` if given; otherwise the sha256 of the last user message's raw text (directives
    included, so two tests with different directives never share a counter) and the model.
    """
    if faults is not None and faults.key:
        return faults.key
    digest = hashlib.sha256()
    digest.update(last_user_text.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(model.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def describe(faults: Mapping[str, Any]) -> str:
    """``{"gap": 0.1, "diverge": True}`` -> ``"gap=0.1 diverge"`` (for log lines)."""
    parts = []
    for key, value in faults.items():
        parts.append(key if value is True else f"{key}={value}")
    return " ".join(parts)
