"""System checks (``python manage.py check``). Ids are stable and never reused.

* ``chatproxy.E001`` a ``CHATPROXY["TIMEOUTS"]`` value is invalid or the values contradict each other
  (e.g. ``KEEPALIVE >= GATEWAY``, ``STALL >= DEADLINE``)
* ``chatproxy.E002`` ``UPSTREAM.SDK`` / ``UPSTREAM.HTTP_CLIENT`` is not a known choice
* ``chatproxy.E003`` the openai SDK generation asked for explicitly is not installed (or another one is),
  or ``SDK`` "none" (also what "auto" picks unless openai 0.27 is installed) or "anthropic" and aiohttp does not import
* ``chatproxy.E004`` ``PERMISSION`` cannot be imported
* ``chatproxy.E005`` ``CHATPROXY`` (or one of its sections) is not a dict
* ``chatproxy.E006`` a ``LIMITS`` value is not a positive whole number (the per-user limits may be None: off),
  or ``WHEN_CACHE_DOWN`` is not "allow" / "refuse"
* ``chatproxy.E007`` ``RESUME``: ``CACHE`` is not a configured cache alias, or ``TTL`` / ``GRACE`` /
  ``DRAIN`` is invalid
* ``chatproxy.E008`` ``UPSTREAM.MODEL`` / ``MODELS`` / ``EXTRA_BODY`` has the wrong shape, or ``MODEL`` is not
  among ``MODELS``
* ``chatproxy.E009`` no ``ASGI_APPLICATION``: streaming needs ASGI (under WSGI responses are buffered)
* ``chatproxy.E010`` chatproxy's WebSocket consumer is routed but Channels is not configured
* ``chatproxy.E011`` a ``RECORDS`` value is invalid
* ``chatproxy.E012`` ``PROFILES.REFRESH`` is not a positive number of seconds
* ``chatproxy.E013`` an ``UPSTREAMS`` entry cannot work (not a dict, no ``BASE_URL``, an unknown ``SDK`` /
  ``HTTP_CLIENT``, ``EXTRA_BODY`` not a dict, the reserved name ``default``)
* ``chatproxy.E014`` ``FALLBACKS`` is not a table of model globs to lists of targets
* ``chatproxy.E015`` a ``CIRCUIT`` value is invalid
* ``chatproxy.W006`` a fallback target ``"x:model"`` names no configured upstream ``x``: it is taken as a
  model name on the request's upstream
* ``chatproxy.W001`` no upstream API key is configured
* ``chatproxy.W002`` an unknown key in ``CHATPROXY`` (probably a typo: it is ignored)
* ``chatproxy.W003`` timeout-profile changes reach other worker processes only by the periodic
  ``PROFILES.REFRESH`` read, not at once (per-process cache)
* ``chatproxy.W004`` ``manage.py runserver`` would serve WSGI (``daphne`` is not in ``INSTALLED_APPS``)
* ``chatproxy.W005`` ``ASGI_APPLICATION`` uses ``DirectStreams`` and a ``MIDDLEWARE`` entry runs in a thread on
  every stream-opening request (its hooks are not known to be safe on the event loop)
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.utils.module_loading import import_string

from chatproxy import conf, fallbacks, policy, profiles
from chatproxy.limits import WHEN_CACHE_DOWN_CHOICES
from chatproxy.upstream import HTTP_CLIENT_CHOICES, SDK_CHOICES, detect_sdk, resolve_sdk
from chatproxy.upstream.common import INSTALL_AIOHTTP, INSTALL_CURRENT, INSTALL_LEGACY

SECTIONS = {key: conf.DEFAULTS[key] for key in conf.SECTIONS}
PER_PROCESS_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
CHAT_CONSUMER = "chatproxy.consumers.ChatConsumer"
# None switches these off
OPTIONAL_LIMITS = frozenset({"MAX_STREAMS_PER_USER", "REQUESTS_PER_MINUTE", "WS_FRAMES_PER_SECOND"})
NAMED_SECTIONS = frozenset({"UPSTREAMS", "FALLBACKS"})


@register("chatproxy")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    structure = _check_structure()
    if structure:
        return structure  # nothing else can be read
    problems: list[Any] = _check_unknown_keys()
    config = conf.get_config()
    problems += _check_timeouts()

    upstream = config["UPSTREAM"]
    if upstream["SDK"] not in SDK_CHOICES or upstream["HTTP_CLIENT"] not in HTTP_CLIENT_CHOICES:
        problems.append(Error(
            f"CHATPROXY['UPSTREAM']: SDK={upstream['SDK']!r}, HTTP_CLIENT={upstream['HTTP_CLIENT']!r}.",
            id="chatproxy.E002",
            hint=f"SDK is one of {SDK_CHOICES}; HTTP_CLIENT one of {HTTP_CLIENT_CHOICES}.",
        ))
    else:
        problems += _check_sdk(upstream["SDK"])
    try:
        import_string(config["PERMISSION"])
    except ImportError as exc:
        problems.append(Error(f"CHATPROXY['PERMISSION'] cannot be imported: {exc}", id="chatproxy.E004",
                              hint="Use a dotted path such as 'chatproxy.permissions.authenticated'."))
    if not conf.upstream_api_key():
        variable = "ANTHROPIC_API_KEY" if upstream["SDK"] == "anthropic" else "OPENAI_API_KEY"
        problems.append(Warning(f"No upstream API key: set {variable} or CHATPROXY['UPSTREAM']['API_KEY'].",
                                id="chatproxy.W001",
                                hint="The official API refuses every request without a key; a server of your own "
                                     "at UPSTREAM.BASE_URL may not need one."))
    problems += _check_limits(config["LIMITS"])
    problems += _check_resume(config["RESUME"])
    problems += _check_models(upstream)
    problems += _check_records(config["RECORDS"])
    problems += _check_profiles(config["PROFILES"])
    problems += _check_fallbacks(config)
    return problems


@register("chatproxy")
def check_deployment(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    problems: list[Any] = []
    if not getattr(settings, "ASGI_APPLICATION", None):
        problems.append(Error(
            "ASGI_APPLICATION is not set: chatproxy streams need an ASGI server.",
            id="chatproxy.E009",
            hint="Under WSGI a streaming response is buffered whole and keepalives never leave. Set "
                 "ASGI_APPLICATION = 'yourproject.asgi.application' and serve it with daphne or uvicorn.",
        ))
    elif _consumer_routed() and not _channels_configured():
        problems.append(Error(
            f"{CHAT_CONSUMER} is routed in {settings.ASGI_APPLICATION} but Channels is not configured.",
            id="chatproxy.E010",
            hint="Add 'channels' to INSTALLED_APPS and set CHANNEL_LAYERS (channels_redis for several workers, "
                 "InMemoryChannelLayer for one process).",
        ))
    if settings.DEBUG and "daphne" not in settings.INSTALLED_APPS:
        problems.append(Warning(
            "'daphne' is not in INSTALLED_APPS: `manage.py runserver` serves WSGI, which buffers chat streams.",
            id="chatproxy.W004",
            hint="Put 'daphne' first in INSTALLED_APPS, or run an ASGI server (daphne, uvicorn) in development.",
        ))
    if not settings.DEBUG:
        backend = settings.CACHES.get(profiles.CACHE_ALIAS, {}).get("BACKEND", "")
        if backend in PER_PROCESS_CACHES:
            problems.append(Warning(
                f"The {profiles.CACHE_ALIAS!r} cache is {backend.rsplit('.', 1)[-1]}, not shared by worker "
                "processes: a timeout-profile change made in the admin or the shell reaches the other workers "
                f"only by their periodic re-read, up to {conf.profiles_refresh():g} s later "
                "(CHATPROXY['PROFILES']['REFRESH']), not within "
                f"{profiles.CHECK_INTERVAL:g} s.",
                id="chatproxy.W003",
                hint=f"Use a cache shared by all workers for the {profiles.CACHE_ALIAS!r} alias (Redis, Memcached, "
                     "the database or file cache), or accept the delay (lower REFRESH to shorten it: one query "
                     "per interval and process). A single-process deployment can silence this check.",
            ))
    return problems


def _check_structure() -> list[Any]:
    user = getattr(settings, "CHATPROXY", None)
    if user is None:
        return []
    if not isinstance(user, Mapping):
        return [Error(f"settings.CHATPROXY must be a dict, not {type(user).__name__}.", id="chatproxy.E005",
                      hint="CHATPROXY = {'UPSTREAM': {...}, 'TIMEOUTS': {...}} (docs/reference.md, settings).")]
    return [
        Error(f"CHATPROXY[{name!r}] must be a dict, not {type(user[name]).__name__}.", id="chatproxy.E005",
              hint=f"Known keys of CHATPROXY[{name!r}]: {', '.join(SECTIONS[name])}.")
        for name in SECTIONS
        if user.get(name) is not None and not isinstance(user[name], Mapping)
    ]


def _check_unknown_keys() -> list[Any]:
    user = getattr(settings, "CHATPROXY", None) or {}
    known_top = set(conf.DEFAULTS) | set(SECTIONS)
    problems = []
    for key in sorted(set(user) - known_top, key=str):
        problems.append(Warning(f"Unknown key CHATPROXY[{key!r}] is ignored.", id="chatproxy.W002",
                                hint=f"Known keys: {', '.join(sorted(known_top))}."))
    for section, defaults in SECTIONS.items():
        if section in NAMED_SECTIONS:
            continue  # their keys are the user's names (upstreams, model globs): checked by _check_fallbacks
        for key in sorted(set(user.get(section) or {}) - set(defaults), key=str):
            problems.append(Warning(f"Unknown key CHATPROXY[{section!r}][{key!r}] is ignored.", id="chatproxy.W002",
                                    hint=f"Known keys: {', '.join(defaults)}."))
    return problems


def _check_timeouts() -> list[Any]:
    timeouts = conf.get_config()["TIMEOUTS"]
    return [
        Error(f"CHATPROXY['TIMEOUTS'][{problem.knob.setting!r}] is {problem.value!r}: it {problem.message}.",
              id="chatproxy.E001", hint=f"{problem.fix[:1].upper()}{problem.fix[1:]}.")
        for problem in policy.problems(policy.timeout_values(timeouts), policy.by_setting)
    ]


def _check_sdk(wanted: str) -> list[Any]:
    if resolve_sdk(wanted) in ("none", "anthropic"):  # the SDK-less adapters ("auto" unless openai 0.27)
        if importlib.util.find_spec("aiohttp") is not None:
            return []
        return [Error(f"CHATPROXY['UPSTREAM']['SDK'] is {wanted!r} (no SDK) but aiohttp is not installed.",
                      id="chatproxy.E003", hint=f"Install it: {INSTALL_AIOHTTP}, or change UPSTREAM.SDK.")]
    installed = detect_sdk()
    if wanted in ("auto", installed):
        return []
    if installed is None:
        found = "no usable openai package is installed"
    else:
        found = f"the installed openai package is the {installed} generation"
    need = INSTALL_LEGACY if wanted == "legacy" else INSTALL_CURRENT
    return [Error(f"CHATPROXY['UPSTREAM']['SDK'] is {wanted!r} but {found}.", id="chatproxy.E003",
                  hint=f"Install it: {need}, or change UPSTREAM.SDK.")]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_limits(limits: Mapping[str, Any]) -> list[Any]:
    problems = [
        Error(f"CHATPROXY['LIMITS'][{key!r}] is {limits[key]!r}.", id="chatproxy.E006",
              hint=f"Use a whole number of at least 1 (default {conf.DEFAULTS['LIMITS'][key]})"
                   + (", or None for no limit." if key in OPTIONAL_LIMITS else "."))
        for key in conf.DEFAULTS["LIMITS"]
        if key != "WHEN_CACHE_DOWN"
        and not (_whole(limits.get(key)) and limits[key] >= 1)
        and not (key in OPTIONAL_LIMITS and limits.get(key) is None)
    ]
    if limits.get("WHEN_CACHE_DOWN") not in WHEN_CACHE_DOWN_CHOICES:
        problems.append(Error(f"CHATPROXY['LIMITS']['WHEN_CACHE_DOWN'] is {limits.get('WHEN_CACHE_DOWN')!r}.",
                              id="chatproxy.E006", hint='Use "allow" (the default) or "refuse".'))
    return problems


def _check_resume(resume: Mapping[str, Any]) -> list[Any]:
    problems = []
    if resume.get("CACHE") not in settings.CACHES:
        problems.append(Error(f"CHATPROXY['RESUME']['CACHE'] is {resume.get('CACHE')!r}, not a cache alias.",
                              id="chatproxy.E007",
                              hint=f"Use one of the aliases in settings.CACHES: {', '.join(settings.CACHES)}."))
    if not (_whole(resume.get("TTL")) and resume["TTL"] >= 1):
        problems.append(Error(f"CHATPROXY['RESUME']['TTL'] is {resume.get('TTL')!r}.", id="chatproxy.E007",
                              hint="Use a whole number of seconds, at least 1 (default 600)."))
    if not (_number(resume.get("GRACE")) and resume["GRACE"] >= 0):
        problems.append(Error(f"CHATPROXY['RESUME']['GRACE'] is {resume.get('GRACE')!r}.", id="chatproxy.E007",
                              hint="Use a number of seconds, 0 or more (default 30)."))
    if not (_number(resume.get("DRAIN")) and resume["DRAIN"] >= 0):
        problems.append(Error(f"CHATPROXY['RESUME']['DRAIN'] is {resume.get('DRAIN')!r}.", id="chatproxy.E007",
                              hint="Use a number of seconds, 0 or more (default 30)."))
    return problems


def _check_models(upstream: Mapping[str, Any]) -> list[Any]:
    problems = []
    model, models = upstream.get("MODEL"), upstream.get("MODELS")
    if not isinstance(model, str) or not model.strip():
        problems.append(Error(f"CHATPROXY['UPSTREAM']['MODEL'] is {model!r}.", id="chatproxy.E008",
                              hint="Name the model used when a request names none, e.g. 'gpt-4o-mini'."))
    if models is not None:
        if isinstance(models, str) or not isinstance(models, (list, tuple)) or not all(
            isinstance(m, str) and m.strip() for m in models
        ):
            problems.append(Error(f"CHATPROXY['UPSTREAM']['MODELS'] is {models!r}.", id="chatproxy.E008",
                                  hint="Use a list of model names, or None to allow any model."))
        elif isinstance(model, str) and model not in models:
            problems.append(Error(f"CHATPROXY['UPSTREAM']['MODEL'] {model!r} is not among MODELS.",
                                  id="chatproxy.E008",
                                  hint="Add it to MODELS, or requests that name no model are refused."))
    if not isinstance(upstream.get("EXTRA_BODY"), Mapping):
        problems.append(Error(f"CHATPROXY['UPSTREAM']['EXTRA_BODY'] is {upstream.get('EXTRA_BODY')!r}.",
                              id="chatproxy.E008", hint="Use a dict (merged into every upstream request), or {}."))
    return problems


def _check_records(records: Mapping[str, Any]) -> list[Any]:
    problems = []
    if not isinstance(records.get("ENABLED"), bool):
        problems.append(Error(f"CHATPROXY['RECORDS']['ENABLED'] is {records.get('ENABLED')!r}.",
                              id="chatproxy.E011", hint="Use True or False."))
    days = records.get("RETENTION_DAYS")
    if not (_number(days) and days > 0):
        problems.append(Error(f"CHATPROXY['RECORDS']['RETENTION_DAYS'] is {days!r}.", id="chatproxy.E011",
                              hint="Use a positive number of days (default 30)."))
    return problems


def _check_profiles(section: Mapping[str, Any]) -> list[Any]:
    refresh = section.get("REFRESH")
    if policy.is_duration(refresh):
        return []
    return [Error(f"CHATPROXY['PROFILES']['REFRESH'] is {refresh!r}.", id="chatproxy.E012",
                  hint=f"Use a positive number of seconds (default {conf.DEFAULTS['PROFILES']['REFRESH']:g}): the "
                       "longest a worker serves a timeout profile after it changed in the database.")]


@register("chatproxy")
def check_direct_streams(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    if not getattr(settings, "ASGI_APPLICATION", None) or not _in_asgi_application(_is_direct_streams):
        return []
    from chatproxy.asgi import thread_hooks

    problems = []
    for path in settings.MIDDLEWARE:
        try:
            hooks = thread_hooks(import_string(path))
        except ImportError:
            continue  # Django's own checks and start-up report it
        if hooks:
            problems.append(Warning(
                f"MIDDLEWARE {path!r} runs in a thread on each request DirectStreams serves: {', '.join(hooks)}.",
                id="chatproxy.W005",
                hint="It runs, as under Django's handler, but each thread hop costs CPU per new stream. DirectStreams "
                     "runs only Django's own middleware it knows (chatproxy.asgi.LOOP_SAFE) on the event loop; make "
                     "this one async-capable (async hooks, or an async __call__), or silence chatproxy.W005.",
            ))
    return problems


def _consumer_routed() -> bool:
    """Whether ASGI_APPLICATION routes chatproxy's ChatConsumer (False if it cannot be imported)."""
    return _in_asgi_application(_is_chat_consumer)


def _is_chat_consumer(node: Any) -> bool:
    consumer = getattr(node, "consumer_class", None)
    return consumer is not None and f"{consumer.__module__}.{consumer.__qualname__}" == CHAT_CONSUMER


def _is_direct_streams(node: Any) -> bool:
    from chatproxy.asgi import DirectStreams

    return isinstance(node, DirectStreams)


def _in_asgi_application(test: Callable[[Any], bool]) -> bool:
    """Whether ``test`` holds for ASGI_APPLICATION or an app it wraps or routes to (False if it
    cannot be imported)."""
    try:
        app = import_string(settings.ASGI_APPLICATION)
    except Exception:
        return False
    return _app_tree_has(app, test, depth=0, seen=set())


def _app_tree_has(node: Any, test: Callable[[Any], bool], depth: int, seen: set[int]) -> bool:
    if node is None or depth > 12 or id(node) in seen:
        return False
    seen.add(id(node))
    if test(node):
        return True
    children: list[Any] = []
    mapping = getattr(node, "application_mapping", None)
    if isinstance(mapping, Mapping):
        children += mapping.values()
    for attr in ("application", "inner", "app"):
        children.append(getattr(node, attr, None))
    for route in getattr(node, "routes", None) or ():
        children.append(getattr(route, "callback", None))
    return any(_app_tree_has(child, test, depth + 1, seen) for child in children)


def _channels_configured() -> bool:
    layers = getattr(settings, "CHANNEL_LAYERS", None)
    return "channels" in settings.INSTALLED_APPS and isinstance(layers, Mapping) and "default" in layers


def _check_fallbacks(config: Mapping[str, Any]) -> list[Any]:
    """``UPSTREAMS`` (E013), ``FALLBACKS`` (E014, W006) and ``CIRCUIT`` (E015)."""
    problems: list[Any] = []
    names = {"default"}
    for name, entry in (config["UPSTREAMS"] or {}).items():
        where = f"CHATPROXY['UPSTREAMS'][{name!r}]"
        if name == "default" or not isinstance(name, str) or not name or ":" in name:
            problems.append(Error(f"{where}: {name!r} cannot name an upstream.", id="chatproxy.E013",
                                  hint="'default' is UPSTREAM itself; use another name, without ':'."))
            continue
        if not isinstance(entry, Mapping):
            problems.append(Error(f"{where} is {entry!r}, not a dict.", id="chatproxy.E013",
                                  hint="{'BASE_URL': 'https://...', 'API_KEY': '...', 'SDK': 'auto'}."))
            continue
        names.add(name)
        unknown = sorted(set(entry) - set(conf.NAMED_UPSTREAM_DEFAULTS), key=str)
        if unknown:
            problems.append(Error(f"{where} has unknown keys {', '.join(map(repr, unknown))}.", id="chatproxy.E013",
                                  hint=f"Known keys: {', '.join(conf.NAMED_UPSTREAM_DEFAULTS)}."))
        if not isinstance(entry.get("BASE_URL"), str) or not entry["BASE_URL"].strip():
            problems.append(Error(f"{where} has no BASE_URL.", id="chatproxy.E013",
                                  hint="Name the provider's OpenAI-compatible endpoint, e.g. "
                                       "'https://api.groq.com/openai/v1'. OPENAI_API_KEY is never sent to it: give "
                                       "it its own API_KEY."))
        if entry.get("SDK", "auto") not in SDK_CHOICES or entry.get("HTTP_CLIENT", "httpx") not in HTTP_CLIENT_CHOICES:
            problems.append(Error(f"{where}: SDK={entry.get('SDK')!r}, HTTP_CLIENT={entry.get('HTTP_CLIENT')!r}.",
                                  id="chatproxy.E013",
                                  hint=f"SDK is one of {SDK_CHOICES}; HTTP_CLIENT one of {HTTP_CLIENT_CHOICES}."))
        elif entry.get("SDK", "auto") != "auto":
            problems += [Error(f"{where}: {error.msg}", id="chatproxy.E013", hint=error.hint)
                         for error in _check_sdk(entry["SDK"])]
        if not isinstance(entry.get("EXTRA_BODY", {}), Mapping):
            problems.append(Error(f"{where}['EXTRA_BODY'] is {entry.get('EXTRA_BODY')!r}.", id="chatproxy.E013",
                                  hint="Use a dict (merged into every request to this upstream), or {}."))
    for glob, targets in (config["FALLBACKS"] or {}).items():
        where = f"CHATPROXY['FALLBACKS'][{glob!r}]"
        if not isinstance(glob, str) or not glob.strip():
            problems.append(Error(f"CHATPROXY['FALLBACKS'] has the key {glob!r}.", id="chatproxy.E014",
                                  hint="Keys are model globs such as 'gpt-4o*'."))
            continue
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not all(
            isinstance(t, str) and t.strip() and len(t.split()) == 1 for t in targets
        ):
            problems.append(Error(f"{where} is {targets!r}.", id="chatproxy.E014",
                                  hint="Use a list of targets in the order to try them: 'model' (same upstream) or "
                                       "'upstream:model', e.g. ['gpt-4o-mini', 'backup:gpt-4.1-mini']."))
            continue
        if len(targets) > fallbacks.MAX_TARGETS:
            problems.append(Error(f"{where} lists {len(targets)} targets.", id="chatproxy.E014",
                                  hint=f"List at most {fallbacks.MAX_TARGETS}; each one costs the user time when the "
                                       "ones before it fail."))
        for target in targets:
            prefix, sep, _model = target.partition(":")
            if sep and prefix not in names and prefix.isidentifier():
                problems.append(Warning(
                    f"{where}: {target!r} names no upstream {prefix!r}: it is taken as a model called {target!r} on "
                    "the request's own upstream.", id="chatproxy.W006",
                    hint=f"Add {prefix!r} to CHATPROXY['UPSTREAMS'] (configured: {', '.join(sorted(names))}), or "
                         "silence chatproxy.W006 if the model's name has a colon."))
    circuit = config["CIRCUIT"]
    failures = circuit.get("FAILURES")
    if not (_whole(failures) and failures >= 1):
        problems.append(Error(f"CHATPROXY['CIRCUIT']['FAILURES'] is {failures!r}.", id="chatproxy.E015",
                              hint="Use a whole number of failed answers in a row, at least 1 (default 3)."))
    if not policy.is_duration(circuit.get("COOLDOWN")):
        problems.append(Error(f"CHATPROXY['CIRCUIT']['COOLDOWN'] is {circuit.get('COOLDOWN')!r}.", id="chatproxy.E015",
                              hint="Use a positive number of seconds a failing target is skipped (default 30)."))
    return problems
