"""The one place chatproxy reads its configuration.

``settings.CHATPROXY`` is merged over :data:`DEFAULTS` lazily (so the package imports before Django
settings are configured) and cached until Django's ``setting_changed`` signal says otherwise, so
``override_settings`` works in tests.

For each request, :func:`resolve_policy` folds the layers into one immutable :class:`Policy`:
per-request options (where allowed) -> matching admin ``TimeoutProfile`` -> ``CHATPROXY["TIMEOUTS"]``
-> built-in defaults. The stream core only ever sees the resulting value.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cache, lru_cache
from typing import Any

ON_PARTIAL_CHOICES = ("restart", "continue", "fail")
SDK_CHOICES = ("auto", "current", "legacy", "none")
HTTP_CLIENT_CHOICES = ("httpx", "aiohttp")

DEFAULTS: dict[str, Any] = {
    "UPSTREAM": {
        "BASE_URL": None,  # None: the SDK's default endpoint
        "API_KEY": None,  # None: os.environ["OPENAI_API_KEY"]
        "MODEL": "gpt-4o-mini",  # used when a request names no model
        "MODELS": None,  # allowed model names; None: any
        "SDK": "auto",  # "auto" | "current" | "legacy" | "none" (no SDK: the API over aiohttp)
        "HTTP_CLIENT": "httpx",  # "httpx" | "aiohttp": the current SDK's transport
        "EXTRA_BODY": {},  # merged into every upstream request body
    },
    "TIMEOUTS": {
        "CONNECT": 5.0,  # seconds, TCP/TLS connect
        "FIRST_TOKEN": 30.0,  # seconds, request sent -> first chunk of an attempt
        "STALL": 10.0,  # seconds, longest gap between two upstream chunks
        "DEADLINE": 300.0,  # seconds, the whole answer: all attempts and backoff
        "MAX_ATTEMPTS": 3,  # first try included
        "BACKOFF_INITIAL": 0.25,  # seconds, doubled each retry, full jitter
        "BACKOFF_MAX": 4.0,  # seconds
        "RETRY_AFTER_MAX": 20.0,  # seconds; a longer Retry-After fails fast
        "KEEPALIVE": 10.0,  # seconds of client-side silence before a keepalive frame
        "GATEWAY": 60.0,  # seconds, the front proxy's idle deadline (validation only)
        "ON_PARTIAL": "restart",  # "restart" | "continue" | "fail"
    },
    "PERMISSION": "chatproxy.permissions.authenticated",
    "LIMITS": {
        "MAX_MESSAGES": 200,
        "MAX_INPUT_CHARS": 200_000,  # characters of all messages; also sizes the body cap (x4 + 64 KiB)
        "MAX_STREAMS_PER_USER": 4,  # running at once, across workers (the RESUME.CACHE cache); None: no limit
        "REQUESTS_PER_MINUTE": None,  # streams started per user and minute; None: no limit
    },
    "RESUME": {"CACHE": "default", "TTL": 600, "GRACE": 30.0},
}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict) and key != "EXTRA_BODY":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@cache
def get_config() -> dict[str, Any]:
    """``DEFAULTS`` with ``settings.CHATPROXY`` merged over it (nested dicts merge key by key).

    Treat the result as read-only: it is shared.
    """
    from django.conf import settings

    user = getattr(settings, "CHATPROXY", None) or {}
    return _merge(DEFAULTS, user)


def clear_cache(**kwargs: Any) -> None:
    """Forget the merged settings; connected to ``setting_changed`` by the app config."""
    if kwargs.get("setting") in (None, "CHATPROXY"):
        get_config.cache_clear()
        _policy_from_settings.cache_clear()


def upstream_api_key() -> str | None:
    """The upstream API key: ``UPSTREAM.API_KEY`` or the ``OPENAI_API_KEY`` environment variable."""
    key = get_config()["UPSTREAM"]["API_KEY"]
    return key if key else os.environ.get("OPENAI_API_KEY")


@dataclass(frozen=True, slots=True)
class Policy:
    """Every knob of one stream, resolved. All durations are in seconds.

    A value, like ``httpx.Timeout``: immutable, comparable, cheap to pass around. ``profile``
    names the admin profile it came from (``"settings"`` when none applied).
    """

    connect: float = 5.0
    first_token: float = 30.0
    stall: float = 10.0
    deadline: float = 300.0
    max_attempts: int = 3
    backoff_initial: float = 0.25
    backoff_max: float = 4.0
    retry_after_max: float = 20.0
    keepalive: float = 10.0
    gateway: float = 60.0
    on_partial: str = "restart"
    profile: str = "settings"

    def with_options(self, **options: Any) -> Policy:
        """A copy with some fields replaced (per-request options); unknown names raise TypeError."""
        return replace(self, **options)

    def problems(self) -> list[str]:
        """Human-readable reasons this policy cannot work (empty when it is sound)."""
        out = []
        for name in ("connect", "first_token", "stall", "deadline", "keepalive", "gateway"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be a positive number of seconds")
        if self.backoff_initial < 0 or self.backoff_max < 0 or self.retry_after_max < 0:
            out.append("backoff and retry-after limits must not be negative")
        if self.backoff_initial > self.backoff_max:
            out.append("backoff_initial must not exceed backoff_max")
        if not 1 <= self.max_attempts <= 10:
            out.append("max_attempts must be between 1 and 10")
        if self.keepalive >= self.gateway:
            out.append("keepalive must be shorter than the gateway timeout, or the gateway cuts the stream")
        if self.stall >= self.deadline:
            out.append("stall must be shorter than the deadline")
        if self.first_token >= self.deadline:
            out.append("first_token must be shorter than the deadline")
        if self.on_partial not in ON_PARTIAL_CHOICES:
            out.append(f"on_partial must be one of {', '.join(ON_PARTIAL_CHOICES)}")
        return out


# settings.CHATPROXY["TIMEOUTS"] key -> Policy field
SETTINGS_TO_POLICY = {
    "CONNECT": "connect",
    "FIRST_TOKEN": "first_token",
    "STALL": "stall",
    "DEADLINE": "deadline",
    "MAX_ATTEMPTS": "max_attempts",
    "BACKOFF_INITIAL": "backoff_initial",
    "BACKOFF_MAX": "backoff_max",
    "RETRY_AFTER_MAX": "retry_after_max",
    "KEEPALIVE": "keepalive",
    "GATEWAY": "gateway",
    "ON_PARTIAL": "on_partial",
}
POLICY_FIELDS = frozenset(f.name for f in fields(Policy))


def policy_from_timeouts(timeouts: Mapping[str, Any], profile: str = "settings") -> Policy:
    """A :class:`Policy` from a ``TIMEOUTS``-style mapping (missing keys keep the defaults)."""
    values: dict[str, Any] = {}
    for key, attr in SETTINGS_TO_POLICY.items():
        if key in timeouts and timeouts[key] is not None:
            values[attr] = int(timeouts[key]) if attr == "max_attempts" else timeouts[key]
            if attr not in ("max_attempts", "on_partial"):
                values[attr] = float(values[attr])
    return Policy(profile=profile, **values)


@lru_cache(maxsize=1)
def _policy_from_settings() -> Policy:
    return policy_from_timeouts(get_config()["TIMEOUTS"])


def settings_policy() -> Policy:
    """The policy given by ``CHATPROXY["TIMEOUTS"]`` over the defaults (no admin profile)."""
    return _policy_from_settings()


def resolve_policy(model: str, options: Mapping[str, Any] | None = None) -> Policy:
    """The policy for one request to ``model``.

    Layers, strongest first: ``options`` (per-request, already validated by the caller), the
    most specific enabled admin ``TimeoutProfile`` for ``model`` (:mod:`chatproxy.profiles`; its
    name goes to ``Policy.profile``), ``CHATPROXY["TIMEOUTS"]``, built-in defaults. Settings and
    defaults only apply when no profile can be loaded: the ``default`` profile matches every model.
    """
    from chatproxy import profiles  # lazy: this module must import before Django is set up

    policy = profiles.policy_for(model) or settings_policy()
    if options:
        policy = policy.with_options(**options)
    return policy
