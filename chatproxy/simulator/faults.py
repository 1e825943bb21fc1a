"""Fault directives: parsing the ``[[sim ...]]`` blocks and the ``X-Sim`` header.

Contract
--------
A request chooses its faults in two places:

* the **last user message** may contain any number of ``[[sim key=value key2=value2 flag]]``
  blocks; they are merged left to right (a later block wins per key) and are removed from the
  text before the answer is generated (:func:`strip_directives`);
* the ``X-Sim`` request header uses the same ``key=value ...`` syntax and wins per key over the
  message;
* under both, a **rule** of the simulator instance (:class:`FaultRules`: per model name or glob,
  set at start or over ``/_sim/faults``) supplies defaults, so a test can make one model of one
  instance fail while the others answer normally.

Tokens are separated by whitespace (commas are tolerated). A bare word is a flag (``diverge``);
``flag=1|true|yes|on`` / ``flag=0|false|no|off`` are accepted too. Unknown keys, bad values and
contradictory combinations raise :class:`DirectiveError`, which the server answers with HTTP 400
in OpenAI's error shape, so a typo in a test fails loudly instead of silently serving a clean
stream.

Keys are split in two groups (see ``docs/simulator.md``):

* **fault keys** (:data:`FAULT_KEYS`) change *how* the answer is delivered; with ``times=N`` they
  apply only to the first N requests with the same fingerprint;
* **shape keys** (``chunks``, ``times``, ``key``, ``diverge``, ``per_model``, ``count``,
  ``tool_calls``, ``reasoning``) always apply, so a retried request produces the same answer as
  the failed one (unless ``diverge`` asks otherwise).

This module is pure: no I/O, stdlib only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "DIRECTIVE_RE",
    "ERRORS",
    "FAULT_KEYS",
    "ApiError",
    "DirectiveError",
    "FaultRule",
    "FaultRules",
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
class ApiError:
    """A named request error (``error=NAME``) as each API words it. ``{model}`` is filled in."""

    status: int
    type: str
    code: str | None
    param: str | None
    message: str
    anthropic_status: int
    anthropic_type: str
    anthropic_message: str


#: ``error=NAME`` presets: the bodies api.openai.com / api.anthropic.com send for these causes.
ERRORS: dict[str, ApiError] = {
    "context_length_exceeded": ApiError(
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
        "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "131072 tokens. Please reduce the length of the messages.",
        400,
        "invalid_request_error",
        "prompt is too long: 210000 tokens > 200000 maximum",
    ),
    "model_not_found": ApiError(
        404,
        "invalid_request_error",
        "model_not_found",
        None,
        "The model `{model}` does not exist or you do not have access to it.",
        404,
        "not_found_error",
        "model: {model}",
    ),
    "content_filter": ApiError(
        400,
        "invalid_request_error",
        "content_filter",
        "prompt",
        "The response was filtered due to the prompt triggering the content management policy (simulated).",
        400,
        "invalid_request_error",
        "Output blocked by content filtering policy (simulated).",
    ),
    "insufficient_quota": ApiError(
        429,
        "insufficient_quota",
        "insufficient_quota",
        None,
        "You exceeded your current quota, please check your plan and billing details.",
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API.",
    ),
    "overloaded": ApiError(
        503,
        "server_error",
        None,
        None,
        "The engine is currently overloaded, please try again later (simulated).",
        529,
        "overloaded_error",
        "Overloaded",
    ),
}


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
    usage_delay: float = 0.0  # after the finish chunk, before the usage chunk (or [DONE])
    # --- broken streams ---------------------------------------------------------------------
    reset_after: int | None = None  # abort the TCP connection (RST) after N content chunks
    close_after: int | None = None  # close the TCP connection cleanly (FIN) mid-body
    malformed_after: int | None = None  # one ``data: {not json`` line after N chunks
    error_after: int | None = None  # in-stream ``{"error": ...}`` event after N chunks, then end
    # --- HTTP errors ------------------------------------------------------------------------
    status: int | None = None  # answer this status with OpenAI's error JSON, no stream
    error: str | None = None  # a named request error (:data:`ERRORS`), no stream
    retry_after: float | None = None  # ``Retry-After`` (integer seconds, rounded up)
    retry_after_ms: int | None = None  # ``retry-after-ms``
    # --- answer content faults --------------------------------------------------------------
    refuse: bool = False  # answer with a refusal instead of content
    content_filter_after: int | None = None  # end with finish_reason content_filter after N chunks
    pings_only: bool = False  # after the headers only keepalives (``event: ping``), nothing else
    # --- shape keys (never switched off by ``times``) ---------------------------------------
    chunks: int = 20  # number of content chunks in a complete answer
    times: int | None = None  # faults apply to the first N requests per fingerprint only
    key: str | None = None  # explicit fingerprint
    diverge: bool = False  # the answer text depends on the attempt number
    per_model: bool = False  # the answer text depends on the model name
    count: str = "all"  # what "after N" counts: every streamed unit, or tool-call "args" only
    tool_calls: int | None = None  # how many tool calls an answer with tools makes
    reasoning: int | None = None  # reasoning units before the answer (None: by model name)
    only: str | None = None  # fault keys apply only to requests for a model matching this glob
    no_prefill: bool = False  # a request ending with an assistant message (a prefill) is refused with 400

    def given(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (what the request log shows)."""
        default = _DEFAULT
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        }

    def clean(self) -> Faults:
        """The same request with every fault key back to its default (used after ``times``)."""
        return replace(_DEFAULT, **{k: getattr(self, k) for k in SHAPE_KEYS})

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
    "usage_delay",
    "reset_after",
    "close_after",
    "malformed_after",
    "error_after",
    "status",
    "error",
    "retry_after",
    "retry_after_ms",
    "refuse",
    "content_filter_after",
    "pings_only",
)

#: Keys that keep applying after ``times`` has run out.
SHAPE_KEYS: tuple[str, ...] = (
    "chunks",
    "times",
    "key",
    "diverge",
    "per_model",
    "count",
    "tool_calls",
    "reasoning",
    "only",
    "no_prefill",
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


def _error_name(key: str, raw: str) -> str:
    if raw not in ERRORS:
        raise DirectiveError(f"{key}={raw!r}: expected one of {', '.join(sorted(ERRORS))}")
    return raw


def _count_mode(key: str, raw: str) -> str:
    if raw not in ("all", "args"):
        raise DirectiveError(f"{key}={raw!r}: expected all (every streamed unit) or args (tool-call arguments)")
    return raw


def _calls(key: str, raw: str) -> int:
    value = _count(key, raw)
    if not 1 <= value <= 16:
        raise DirectiveError(f"{key}={raw!r}: expected 1 to 16 tool calls")
    return value


# key -> (parser, target field). ``stall_first`` is documented as the same thing as first_delay.
_PARSERS: dict[str, tuple[Any, str]] = {
    "gap": (_seconds, "gap"),
    "first_delay": (_seconds, "first_delay"),
    "stall_first": (_seconds, "first_delay"),
    "headers_delay": (_seconds, "headers_delay"),
    "stall_after": (_count, "stall_after"),
    "stall": (_seconds, "stall"),
    "keepalive": (_seconds, "keepalive"),
    "usage_delay": (_seconds, "usage_delay"),
    "reset_after": (_count, "reset_after"),
    "close_after": (_count, "close_after"),
    "malformed_after": (_count, "malformed_after"),
    "error_after": (_count, "error_after"),
    "status": (_status, "status"),
    "error": (_error_name, "error"),
    "retry_after": (_seconds, "retry_after"),
    "retry_after_ms": (_count, "retry_after_ms"),
    "chunks": (_count, "chunks"),
    "times": (_count, "times"),
    "key": (_name, "key"),
    "diverge": (_flag, "diverge"),
    "refuse": (_flag, "refuse"),
    "content_filter_after": (_count, "content_filter_after"),
    "pings_only": (_flag, "pings_only"),
    "per_model": (_flag, "per_model"),
    "count": (_count_mode, "count"),
    "tool_calls": (_calls, "tool_calls"),
    "reasoning": (_count, "reasoning"),
    "only": (_name, "only"),
    "no_prefill": (_flag, "no_prefill"),
}
_FLAGS = {"diverge", "refuse", "pings_only", "per_model", "no_prefill"}


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


def parse_directives(
    message_text: str | None, header: str | None = None, base: Mapping[str, str] | None = None
) -> Faults:
    """Build :class:`Faults` from the last user message's raw text and the ``X-Sim`` header,
    over ``base`` (a rule's raw tokens, the lowest precedence).

    Raises :class:`DirectiveError` on unknown keys, bad values or contradictions.
    """
    raw = dict(base or {})
    raw.update(_message_tokens(message_text or ""))
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
        raise DirectiveError("stall=S needs stall_after=N (or use stall_first=S for a stall before the first chunk)")
    if ("retry_after" in values or "retry_after_ms" in values) and not ({"status", "error"} & set(values)):
        raise DirectiveError("retry_after / retry_after_ms need status=CODE (e.g. status=429)")
    if "status" in values and "error" in values:
        raise DirectiveError("status and error both choose the answer's status: give one of them")
    if values.get("keepalive") == 0:
        raise DirectiveError("keepalive=0: expected a positive interval in seconds")
    if values.get("pings_only"):
        values.setdefault("first_delay", _PINGS_ONLY_SILENCE)
        values.setdefault("keepalive", _PINGS_ONLY_INTERVAL)
    return Faults(**values)


_PINGS_ONLY_SILENCE = 3600.0
_PINGS_ONLY_INTERVAL = 0.2


@dataclass(slots=True)
class FaultRule:
    """Directives applied to every request for a model (a name or an ``fnmatch`` glob).

    ``times=N`` in a rule counts the rule's own uses: it applies to the next N matching
    requests, then stops (``hits`` says how many it served). Other keys behave as in a message.
    """

    model: str
    fault: str
    tokens: dict[str, str]
    times: int | None = None
    hits: int = 0

    @classmethod
    def parse(cls, model: str, fault: str) -> FaultRule:
        if not isinstance(model, str) or not model:
            raise DirectiveError("a fault rule needs a model name or glob ('*' for every model)")
        if not isinstance(fault, str):
            raise DirectiveError("a fault rule's fault must be a directive string, e.g. 'status=503'")
        tokens = parse_tokens(fault)
        times = _count("times", tokens.pop("times")) if "times" in tokens else None
        parse_directives(None, None, tokens)  # validate now: a bad rule is the caller's 400
        return cls(model=model, fault=fault, tokens=tokens, times=times)

    @property
    def live(self) -> bool:
        return self.times is None or self.hits < self.times

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "fault": self.fault, "times": self.times, "hits": self.hits}


class FaultRules:
    """The rules of one simulator instance: the start-up set plus changes made at runtime.

    :meth:`match` prefers a rule naming the model exactly, then the first glob that matches, in
    the order the rules were set. :meth:`reset` goes back to the start-up set.
    """

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self._initial = [FaultRule.parse(model, fault) for model, fault in (initial or {}).items()]
        self.rules: list[FaultRule] = []
        self.reset()

    def reset(self) -> None:
        self.rules = [FaultRule.parse(r.model, r.fault) for r in self._initial]

    def set(self, model: str, fault: str) -> FaultRule:
        rule = FaultRule.parse(model, fault)
        self.rules = [r for r in self.rules if r.model != model] + [rule]
        return rule

    def delete(self, model: str | None = None) -> int:
        """Remove the rule for ``model`` (every rule if ``None``); the number removed."""
        before = len(self.rules)
        self.rules = [] if model is None else [r for r in self.rules if r.model != model]
        return before - len(self.rules)

    def match(self, model: str) -> FaultRule | None:
        """The live rule for ``model`` (its ``hits`` are counted by the caller, once applied)."""
        exact = next((r for r in self.rules if r.model == model and r.live), None)
        if exact is not None:
            return exact
        return next((r for r in self.rules if r.live and fnmatch.fnmatchcase(model, r.model)), None)

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rules]


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
