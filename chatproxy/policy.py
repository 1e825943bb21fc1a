"""The timeout policy of one stream: an immutable value, and the one table that defines it.

:class:`Policy` is what the stream core sees: every knob resolved, all durations in seconds. Each
of its fields is described once, here, by a :class:`Knob` (the field's metadata): its key in
``CHATPROXY["TIMEOUTS"]``, its ``TimeoutProfile`` model field, its default, unit, label and help
text, and which values it accepts. Everything else is derived from that table:

* the ``TIMEOUTS`` defaults (:data:`TIMEOUTS_DEFAULTS`, read by :mod:`chatproxy.conf`),
* the ``TimeoutProfile`` fields (:mod:`chatproxy.models` builds them with :func:`knob_for_field`),
* the conversions :func:`from_timeouts` (settings), :func:`from_profile` (a model row) and
  :meth:`Policy.profile_values` (back to model fields),
* validation, :func:`problems`: one list of :class:`Problem` values that say what is wrong and
  what to change, phrased with the names of the place the values came from (``STALL`` for
  settings, "the stall timeout" in the admin). The system check ``chatproxy.E001`` and
  ``TimeoutProfile.clean()`` both report them.

This module imports nothing from Django or the rest of chatproxy: the stream core depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar, cast

ON_PARTIAL_CHOICES = ("restart", "continue", "fail")
MAX_ATTEMPTS_LIMIT = 10
#: ``Policy.profile`` when no admin profile applied.
SETTINGS_PROFILE = "settings"

#: What a knob accepts: ``duration`` a number of seconds > 0, ``delay`` seconds >= 0, ``attempts``
#: a whole number from 1 to :data:`MAX_ATTEMPTS_LIMIT`, ``choice`` one of ``choices``.
Kind = Literal["duration", "delay", "attempts", "choice"]
Value = TypeVar("Value", float, int, str)


def _(text: str) -> str:
    """Marks a label or help text for translation (``makemessages``); the model translates it."""
    return text


@dataclass(frozen=True, slots=True)
class Knob:
    """One field of :class:`Policy` as settings, the admin model and validation know it."""

    name: str  # the Policy attribute, e.g. "keepalive"
    setting: str  # the key in CHATPROXY["TIMEOUTS"], e.g. "KEEPALIVE"
    field: str  # the TimeoutProfile field, e.g. "keepalive_interval"
    kind: Kind
    default: float | int | str
    label: str  # e.g. "keepalive interval" (the model field's verbose name)
    help_text: str
    choices: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return "s" if self.kind in ("duration", "delay") else ""

    def coerce(self, value: Any) -> Any:
        """``value`` as this knob's type, as settings have always been read (``"10"`` -> 10.0); a
        value that does not convert is returned unchanged, for :func:`problems` to report."""
        try:
            if self.kind in ("duration", "delay"):
                return float(value)
            if self.kind == "attempts":
                return int(value)
        except (TypeError, ValueError, OverflowError):
            return value
        return value


def _knob(default: Value, setting: str, field_name: str, kind: Kind, label: str, help_text: str,
          choices: tuple[str, ...] = ()) -> Value:
    meta = {"setting": setting, "field": field_name, "kind": kind, "label": label, "help_text": help_text,
            "choices": choices}
    result: Value = field(default=default, metadata={"knob": meta})
    return result


@dataclass(frozen=True, slots=True)
class Policy:
    """Every knob of one stream, resolved. All durations are in seconds.

    A value, like ``httpx.Timeout``: immutable, comparable, cheap to pass around. ``profile``
    names the admin profile it came from (``"settings"`` when none applied).
    """

    connect: float = _knob(5.0, "CONNECT", "connect_timeout", "duration", _("connect timeout"),
                           _("Seconds, TCP/TLS connect."))
    first_token: float = _knob(
        30.0, "FIRST_TOKEN", "first_token_timeout", "duration", _("first-token timeout"),
        _("Seconds from sending a request to its first chunk. Reasoning models need a minute; chat models a few "
          "seconds."))
    stall: float = _knob(
        10.0, "STALL", "stall_timeout", "duration", _("stall timeout"),
        _("Longest allowed silence between two chunks, in seconds, before the attempt is retried."))
    deadline: float = _knob(300.0, "DEADLINE", "deadline", "duration", _("deadline"),
                            _("Seconds for the whole answer: every attempt and backoff included."))
    max_attempts: int = _knob(3, "MAX_ATTEMPTS", "max_attempts", "attempts", _("max attempts"),
                              _("1 to 10, the first try included."))
    backoff_initial: float = _knob(
        0.25, "BACKOFF_INITIAL", "backoff_initial", "delay", _("initial backoff"),
        _("Seconds before the first retry (doubled each retry, full jitter); 0 retries at once."))
    backoff_max: float = _knob(4.0, "BACKOFF_MAX", "backoff_max", "delay", _("maximum backoff"),
                               _("Seconds, the backoff cap."))
    retry_after_max: float = _knob(20.0, "RETRY_AFTER_MAX", "retry_after_max", "delay", _("longest Retry-After"),
                                   _("Seconds; an upstream asking to wait longer fails fast instead."))
    keepalive: float = _knob(
        10.0, "KEEPALIVE", "keepalive_interval", "duration", _("keepalive interval"),
        _("Seconds of silence towards the client before a keepalive frame; must be well below the gateway timeout."))
    gateway: float = _knob(
        60.0, "GATEWAY", "gateway_timeout", "duration", _("gateway timeout"),
        _("The front proxy's idle deadline in seconds (nginx proxy_read_timeout, load balancer idle timeout)."))
    on_partial: str = _knob("restart", "ON_PARTIAL", "on_partial", "choice", _("on partial output"),
                            _("After text was sent: restart the answer, continue it, or fail."), ON_PARTIAL_CHOICES)
    profile: str = SETTINGS_PROFILE
    #: The profile's fallback targets (``"model"`` / ``"upstream:model"``); empty: ``FALLBACKS`` decides.
    fallbacks: tuple[str, ...] = ()

    def with_options(self, **options: Any) -> Policy:
        """A copy with some fields replaced (per-request options); unknown names raise TypeError."""
        return replace(self, **options)

    def problems(self, naming: Naming | None = None) -> list[Problem]:
        """Why this policy cannot work (empty when it is sound); see :func:`problems`."""
        return problems({knob.name: getattr(self, knob.name) for knob in KNOBS}, naming)

    def profile_values(self) -> dict[str, Any]:
        """The ``TimeoutProfile`` field values that stand for this policy."""
        return {knob.field: getattr(self, knob.name) for knob in KNOBS}


#: The schema: one :class:`Knob` per tunable field of :class:`Policy`, in declaration order.
KNOBS: tuple[Knob, ...] = tuple(
    Knob(name=f.name, default=cast(float | int | str, f.default), **f.metadata["knob"])
    for f in fields(Policy) if "knob" in f.metadata
)
BY_NAME: Mapping[str, Knob] = {knob.name: knob for knob in KNOBS}
BY_FIELD: Mapping[str, Knob] = {knob.field: knob for knob in KNOBS}
#: ``CHATPROXY["TIMEOUTS"]`` as it is when not set.
TIMEOUTS_DEFAULTS: Mapping[str, float | int | str] = {knob.setting: knob.default for knob in KNOBS}
#: The ``TimeoutProfile`` fields that hold a policy.
PROFILE_FIELDS: tuple[str, ...] = tuple(knob.field for knob in KNOBS)
#: Every field name of :class:`Policy` (what per-request options may name).
POLICY_FIELDS = frozenset(f.name for f in fields(Policy))


def knob_for_field(field_name: str) -> Knob:
    """The knob behind the ``TimeoutProfile`` field ``field_name`` (KeyError if none)."""
    return BY_FIELD[field_name]


def from_timeouts(timeouts: Mapping[str, Any], profile: str = SETTINGS_PROFILE) -> Policy:
    """A policy from a ``TIMEOUTS``-style mapping; missing (or None) keys keep the defaults.

    Raises ValueError naming the key when a value cannot be converted (system check E001 says it
    first, with the fix).
    """
    values = timeout_values(timeouts)
    for knob in KNOBS:
        if knob.name in values and knob.kind != "choice" and not _is_number(values[knob.name]):
            raise ValueError(f"TIMEOUTS[{knob.setting!r}] is {values[knob.name]!r}, not a number")
    return Policy(profile=profile, **values)


def timeout_values(timeouts: Mapping[str, Any]) -> dict[str, Any]:
    """The values a ``TIMEOUTS``-style mapping gives, by Policy attribute, converted where possible."""
    return {knob.name: knob.coerce(timeouts[knob.setting]) for knob in KNOBS
            if timeouts.get(knob.setting) is not None}


def from_profile(row: Any) -> Policy:
    """The policy a ``TimeoutProfile`` (a model instance or a ``values()`` dict) stands for."""
    get: Callable[[str], Any] = row.get if isinstance(row, Mapping) else (lambda name: getattr(row, name))
    values = {knob.name: knob.coerce(get(knob.field)) for knob in KNOBS}
    fallbacks = get("fallbacks") if not isinstance(row, Mapping) or "fallbacks" in row else ""
    return Policy(profile=str(get("name")), fallbacks=fallback_lines(fallbacks), **values)


def fallback_lines(text: Any) -> tuple[str, ...]:
    """The targets of a profile's ``fallbacks`` text: one per line; blank lines and ``#`` comments are ignored."""
    if not isinstance(text, str):
        return ()
    found = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return tuple(line for line in found if line)


# --------------------------------------------------------------------------- validation

#: How a message names a knob: by its settings key (``STALL``) or its label (``the stall timeout``).
Naming = Callable[[Knob], str]


def by_setting(knob: Knob) -> str:
    return knob.setting


def by_label(knob: Knob) -> str:
    return f"the {knob.label}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a policy cannot work, attached to the knob that should change.

    ``message`` says what is wrong (``"must be shorter than GATEWAY (60 s), or ..."``, the knob
    itself being the subject); ``fix`` says what to change. Both name knobs as the validation's
    ``naming`` asked.
    """

    knob: Knob
    value: Any
    message: str
    fix: str

    def sentence(self) -> str:
        """Message and fix as one sentence, for a form field's error list."""
        return f"{self.message[:1].upper()}{self.message[1:]}: {self.fix}."

    def __str__(self) -> str:
        return f"{self.knob.name} {self.message}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_duration(value: Any) -> bool:
    """Whether ``value`` is a positive, finite number of seconds (a bool is not a number here)."""
    return _is_number(value) and value > 0


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _check_one(knob: Knob, value: Any, name: str) -> Problem | None:
    default = knob.default
    if knob.kind == "duration":
        if not is_duration(value):
            return Problem(knob, value, "must be a positive number of seconds (greater than 0)",
                           f"enter e.g. {default:g}, the default")
    elif knob.kind == "delay":
        if not (_is_number(value) and value >= 0):
            return Problem(knob, value, "must be a number of seconds, 0 or more",
                           f"enter e.g. {default:g}, the default")
    elif knob.kind == "attempts":
        if not (_is_number(value) and value == int(value) and 1 <= value <= MAX_ATTEMPTS_LIMIT):
            return Problem(knob, value, f"must be a whole number from 1 to {MAX_ATTEMPTS_LIMIT}",
                           f"enter e.g. {default}, the default (the first try counts as one)")
    elif value not in knob.choices:
        return Problem(knob, value, f"must be one of {', '.join(knob.choices)}",
                       f"set {name} to one of them (default {default})")
    return None


def problems(values: Mapping[str, Any], naming: Naming | None = None) -> list[Problem]:
    """Why the policy given by ``values`` (by Policy attribute; missing ones are defaults) cannot work.

    Each value is checked on its own first (type, range, choice); the relations between knobs are
    only checked between values that passed, so every message is about a real conflict.
    """
    name = naming or by_setting
    given = {knob.name: values.get(knob.name, knob.default) for knob in KNOBS}
    found: list[Problem] = []
    for knob in KNOBS:
        problem = _check_one(knob, given[knob.name], name(knob))
        if problem is not None:
            found.append(problem)
    bad = {problem.knob.name for problem in found}

    def related(*attrs: str) -> bool:  # only relations between values that are sound on their own
        return not bad.intersection(attrs)

    def called(attr: str) -> str:
        return name(BY_NAME[attr])

    def conflict(attr: str, message: str, fix: str) -> None:
        found.append(Problem(BY_NAME[attr], given[attr], message, fix))

    gateway, deadline, cap = given["gateway"], given["deadline"], given["backoff_max"]
    if related("keepalive", "gateway") and given["keepalive"] >= gateway:
        conflict("keepalive",
                 f"must be shorter than {called('gateway')} ({_seconds(gateway)}), or the gateway cuts a silent "
                 "stream before a keepalive goes out",
                 f"lower {called('keepalive')} (e.g. to {_seconds(gateway / 4)}) or raise {called('gateway')} to "
                 "the front proxy's real idle timeout")
    for attr in ("stall", "first_token"):
        if related(attr, "deadline") and given[attr] >= deadline:
            conflict(attr, f"must be below {called('deadline')} ({_seconds(deadline)}), or no retry can ever happen",
                     f"lower {called(attr)} or raise {called('deadline')}")
    if related("backoff_initial", "backoff_max") and given["backoff_initial"] > cap:
        conflict("backoff_initial", f"must not exceed {called('backoff_max')} ({_seconds(cap)})",
                 f"lower {called('backoff_initial')} or raise {called('backoff_max')}")
    return found
