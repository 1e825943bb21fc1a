"""The one place chatproxy reads its configuration.

``settings.CHATPROXY`` is merged over :data:`DEFAULTS` lazily (so the package imports before Django
settings are configured) and cached until Django's ``setting_changed`` signal says otherwise, so
``override_settings`` works in tests. The ``TIMEOUTS`` defaults come from the policy's schema
(:mod:`chatproxy.policy`); :func:`settings_policy` is the policy those settings give.
Which admin profile applies to a request is :mod:`chatproxy.profiles`' business
(:func:`chatproxy.profiles.resolve_policy`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from functools import cache
from typing import Any

from chatproxy.errors import ConfigurationError
from chatproxy.policy import TIMEOUTS_DEFAULTS, from_timeouts, is_duration
from chatproxy.policy import Policy as Policy  # re-exported: the stream core and records import it from here

DEFAULTS: dict[str, Any] = {
    "UPSTREAM": {
        "BASE_URL": None,  # None: the SDK's default endpoint
        "API_KEY": None,  # None: os.environ["OPENAI_API_KEY"]
        "MODEL": "gpt-4o-mini",  # used when a request names no model
        "MODELS": None,  # allowed model names; None: any
        "SDK": "auto",  # "auto" ("none", or "legacy" with openai 0.27) | "current" | "legacy" | "none" | "anthropic"
        "HTTP_CLIENT": "httpx",  # "httpx" | "aiohttp": the current SDK's transport
        "EXTRA_BODY": {},  # merged into every upstream request body
    },
    # More providers by name, each like UPSTREAM (BASE_URL, API_KEY, SDK, HTTP_CLIENT, EXTRA_BODY);
    # "default" is UPSTREAM itself. A named upstream never gets OPENAI_API_KEY: only its own API_KEY.
    "UPSTREAMS": {},
    # model glob -> ordered fallback targets: "model" (same upstream) or "upstream:model"
    "FALLBACKS": {},
    # per target: after FAILURES failed answers in a row skip it for COOLDOWN seconds, then probe it once
    "CIRCUIT": {"FAILURES": 3, "COOLDOWN": 30.0},
    "TIMEOUTS": dict(TIMEOUTS_DEFAULTS),  # units and meaning: chatproxy.policy.Policy
    "PERMISSION": "chatproxy.permissions.authenticated",
    "LIMITS": {
        "MAX_MESSAGES": 200,
        "MAX_INPUT_CHARS": 200_000,  # characters of all messages; also sizes the body cap (x4 + 64 KiB)
        "MAX_STREAMS_PER_USER": 4,  # running at once, across workers (the RESUME.CACHE cache); None: no limit
        "REQUESTS_PER_MINUTE": None,  # streams started per user and minute; None: no limit
        # "allow" | "refuse": a new stream while RESUME.CACHE (where the limits count) is unreachable
        "WHEN_CACHE_DOWN": "allow",
        "WS_FRAMES_PER_SECOND": 20,  # frames one WebSocket may send per second, else closed (4008); None: no cap
    },
    # DRAIN: seconds a stopping worker keeps generating its resumable streams (their clients
    # resume on another worker), before it closes its upstream sessions
    "RESUME": {"CACHE": "default", "TTL": 600, "GRACE": 30.0, "DRAIN": 30.0},
    "RECORDS": {
        "ENABLED": True,  # False: write no stream records
        "RETENTION_DAYS": 30,  # days `manage.py chatproxy_prune` keeps by default
    },
    "PROFILES": {
        # seconds: the longest a worker keeps using a timeout profile after it changed in the database,
        # whatever the cache (a shared cache brings the change sooner)
        "REFRESH": 5.0,
    },
}
#: Top-level keys whose value is a section (a dict merged key by key).
SECTIONS = tuple(key for key, value in DEFAULTS.items() if isinstance(value, dict))
#: Keys whose dict replaces the default one whole (a glob table, a request body), not key by key.
WHOLE = frozenset({"EXTRA_BODY", "FALLBACKS"})
#: The keys a named upstream (``UPSTREAMS``) may set, with their defaults.
NAMED_UPSTREAM_DEFAULTS: dict[str, Any] = {
    "BASE_URL": None, "API_KEY": None, "SDK": "auto", "HTTP_CLIENT": "httpx", "EXTRA_BODY": {},
}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict) and key not in WHOLE:
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
    # A section set to None means "the defaults" (as the system checks read it).
    given = {key: value for key, value in user.items() if value is not None or key not in SECTIONS}
    return _merge(DEFAULTS, given)


def clear_cache(**kwargs: Any) -> None:
    """Forget the merged settings; connected to ``setting_changed`` by the app config."""
    if kwargs.get("setting") in (None, "CHATPROXY"):
        get_config.cache_clear()
        settings_policy.cache_clear()


def upstream_api_key() -> str | None:
    """The upstream API key: ``UPSTREAM.API_KEY`` or the environment's key for that API
    (``ANTHROPIC_API_KEY`` with ``SDK`` "anthropic", else ``OPENAI_API_KEY``: an OpenAI key is
    never sent to another provider)."""
    upstream = get_config()["UPSTREAM"]
    if upstream["API_KEY"]:
        return str(upstream["API_KEY"])
    return os.environ.get("ANTHROPIC_API_KEY" if upstream["SDK"] == "anthropic" else "OPENAI_API_KEY")


@cache
def settings_policy() -> Policy:
    """The policy given by ``CHATPROXY["TIMEOUTS"]`` over the defaults (no admin profile).

    Raises ValueError when a value is not a number (system check ``chatproxy.E001`` reports it).
    """
    return from_timeouts(get_config()["TIMEOUTS"])


def profiles_refresh() -> float:
    """``PROFILES.REFRESH`` in seconds; the default while it is invalid (``chatproxy.E012`` reports it)."""
    value = get_config()["PROFILES"].get("REFRESH")
    if is_duration(value):
        return float(value)
    return float(DEFAULTS["PROFILES"]["REFRESH"])


def upstream_settings(name: str) -> dict[str, Any]:
    """The settings of the upstream called ``name``: ``UPSTREAM`` for ``"default"``, else its
    ``UPSTREAMS`` entry over :data:`NAMED_UPSTREAM_DEFAULTS` (KeyError if there is none).

    ``API_KEY`` is resolved: the default upstream falls back to ``OPENAI_API_KEY``; a named one
    never does (that key is for another provider). Raises ConfigurationError for an entry that is
    not a dict (``chatproxy.E013``).
    """
    if name == "default":
        return {**get_config()["UPSTREAM"], "API_KEY": upstream_api_key()}
    entry = get_config()["UPSTREAMS"][name]
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"UPSTREAMS[{name!r}] is not a dict")
    return {**NAMED_UPSTREAM_DEFAULTS, **entry}


def circuit_settings() -> tuple[int, float]:
    """``CIRCUIT`` ``(FAILURES, COOLDOWN)``; the defaults where invalid (``chatproxy.E015`` reports it)."""
    given, defaults = get_config()["CIRCUIT"], DEFAULTS["CIRCUIT"]
    failures = given.get("FAILURES")
    if not (isinstance(failures, int) and not isinstance(failures, bool) and failures >= 1):
        failures = defaults["FAILURES"]
    cooldown = given.get("COOLDOWN")
    return failures, float(cooldown) if is_duration(cooldown) else float(defaults["COOLDOWN"])
