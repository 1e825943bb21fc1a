"""Settings of the chatproxy sample project, read from the environment.

Environment variables (all optional):

================================  ===================================================================
``DJANGO_DEBUG``                  "1" (default, the demo) or "0"
``DJANGO_SECRET_KEY``             required when DEBUG is off; an insecure dev key is used otherwise
``DJANGO_ALLOWED_HOSTS``          comma-separated, default "localhost,127.0.0.1"
``DJANGO_CSRF_TRUSTED_ORIGINS``   comma-separated origins, e.g. "http://127.0.0.1:8080" behind a proxy
``DJANGO_LOG_LEVEL``              level of the console log, default "INFO"
``DJANGO_DB_PATH``                the SQLite file, default db.sqlite3 in the repository root
``DJANGO_DB_TIMEOUT``             seconds a query waits for a locked SQLite file, default 5 (sqlite3's)
``REDIS_URL``                     e.g. "redis://127.0.0.1:6379/0": Redis channel layer and cache
                                  (several workers, resumable streams); in-memory otherwise
``DJANGO_CACHE_DIR``              without REDIS_URL: a directory for a file-based cache shared by the
                                  processes of one machine (e.g. two test servers); in-memory otherwise
``OPENAI_API_KEY``                set: stream from the real API; unset: from the simulator
``OPENAI_BASE_URL``               an OpenAI-compatible server instead of the SDK's default
``CHATPROXY_MODEL``               model used with the real API, default "gpt-4o-mini"
``CHATPROXY_SIMULATOR_URL``       the simulator's base URL, default "http://127.0.0.1:8001/v1"
``CHATPROXY_SDK``                 UPSTREAM.SDK: unset, the default "auto" (no SDK, the API over aiohttp;
                                  the legacy SDK when openai 0.27 is installed), "none", "current" or
                                  "legacy" (an openai SDK), "anthropic" (the Messages API, which the
                                  simulator speaks too)
``CHATPROXY_HTTP_CLIENT``         the current SDK's transport, "aiohttp" (default here) or "httpx"
``CHATPROXY_RESUME``              a JSON object merged into CHATPROXY["RESUME"], e.g. '{"GRACE": 0.5}'
``CHATPROXY_TIMEOUTS``            a JSON object merged into CHATPROXY["TIMEOUTS"], e.g.
                                  '{"STALL": 0.5, "KEEPALIVE": 0.2}' (tests use tiny values)
``CHATPROXY_LIMITS``              a JSON object merged into CHATPROXY["LIMITS"], e.g.
                                  '{"MAX_STREAMS_PER_USER": 2, "REQUESTS_PER_MINUTE": 30}'
``CHATPROXY_PROFILES``            a JSON object merged into CHATPROXY["PROFILES"], e.g. '{"REFRESH": 1}'
``CHATPROXY_UPSTREAMS``           a JSON object: CHATPROXY["UPSTREAMS"] (named fallback providers)
``CHATPROXY_FALLBACKS``           a JSON object: CHATPROXY["FALLBACKS"]; with the simulator the demo
                                  falls back from gpt-4o-mini to gpt-4o unless this is set (even to {})
``CHATPROXY_CIRCUIT``             a JSON object merged into CHATPROXY["CIRCUIT"], e.g. '{"FAILURES": 2}'
================================  ===================================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _env_json_object(name: str) -> dict[str, Any]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, not {type(value).__name__}")
    return value


DEBUG = _env_flag("DJANGO_DEBUG", "1")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set DJANGO_SECRET_KEY when DJANGO_DEBUG is off.")
    # INSECURE: development only, never used with DEBUG off (see above).
    SECRET_KEY = "django-insecure-chatproxy-demo-key-do-not-use-in-production"

ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",  # first: its runserver serves ASGI (HTTP + WebSocket)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chatproxy",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "project.asgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH") or BASE_DIR / "db.sqlite3",
        "OPTIONS": {"timeout": float(os.environ.get("DJANGO_DB_TIMEOUT", "").strip() or 5.0)},
    }
}

REDIS_URL = os.environ.get("REDIS_URL", "").strip()
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py >= 8 reads with a 5 s socket timeout by default, the same 5 s that
            # channels_redis blocks in BZPOPMIN waiting for a message: the read then times out and
            # kills every consumer idle for 5 s (WebSocket closed with 1011). Read longer than that.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
    CACHES: dict[str, dict[str, Any]] = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # redis-py waits forever by default: a Redis that hangs (rather than refuses) would
            # hold chatproxy's cache calls, and the streams opening behind them (docs/deploy.md).
            "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 2.0},
        }
    }
else:
    # One process only: fine for the demo, not for several workers: a resume on another worker
    # gets its live events through a shared layer (channels_redis).
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # The resume journal writes a key per stream about every 0.1 s: LocMemCache's default of 300
    # entries would evict live streams' events (and profile/limit keys) with a few hundred streams.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "OPTIONS": {"MAX_ENTRIES": 1_000_000, "CULL_FREQUENCY": 10},
        }
    }
    if os.environ.get("DJANGO_CACHE_DIR", "").strip():
        CACHES = {
            "default": {
                "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                "LOCATION": os.environ["DJANGO_CACHE_DIR"].strip(),
            }
        }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/admin/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOG_LEVEL = os.environ.get("DJANGO_LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "console": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "console"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "chatproxy": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "project": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}

# --- chatproxy -----------------------------------------------------------------------------------

OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "").strip()

# True when the demo streams from the built-in simulator rather than a real API; the page then
# offers the fault selector.
CHATPROXY_USES_SIMULATOR = not OPENAI_API_KEY

if CHATPROXY_USES_SIMULATOR:
    _upstream: dict[str, Any] = {
        "BASE_URL": os.environ.get("CHATPROXY_SIMULATOR_URL", "").strip() or "http://127.0.0.1:8001/v1",
        "API_KEY": "sk-simulator",
        "MODEL": "gpt-4o-mini",
    }
else:
    _upstream = {
        "BASE_URL": os.environ.get("OPENAI_BASE_URL", "").strip() or None,
        "API_KEY": OPENAI_API_KEY,
        "MODEL": os.environ.get("CHATPROXY_MODEL", "").strip() or "gpt-4o-mini",
    }

# UPSTREAM.SDK "auto" (the default) is the upstream path with the least CPU per chunk (bench/README.md):
# no SDK, the API over aiohttp. With CHATPROXY_SDK=current, the current openai SDK over aiohttp, which
# costs about half the CPU per chunk of its default httpx2 transport.
if os.environ.get("CHATPROXY_SDK", "").strip():
    _upstream["SDK"] = os.environ["CHATPROXY_SDK"].strip()
_upstream["HTTP_CLIENT"] = os.environ.get("CHATPROXY_HTTP_CLIENT", "").strip() or "aiohttp"

CHATPROXY: dict[str, Any] = {
    "UPSTREAM": _upstream,
    # allow_any only for the local demo; anything else needs a logged-in user.
    "PERMISSION": ("chatproxy.permissions.allow_any" if DEBUG else "chatproxy.permissions.authenticated"),
}
_timeouts = _env_json_object("CHATPROXY_TIMEOUTS")
if _timeouts:
    CHATPROXY["TIMEOUTS"] = _timeouts
_resume = _env_json_object("CHATPROXY_RESUME")
if _resume:
    CHATPROXY["RESUME"] = _resume
_limits = _env_json_object("CHATPROXY_LIMITS")
if _limits:
    CHATPROXY["LIMITS"] = _limits
_profiles = _env_json_object("CHATPROXY_PROFILES")
if _profiles:
    CHATPROXY["PROFILES"] = _profiles
_upstreams = _env_json_object("CHATPROXY_UPSTREAMS")
if _upstreams:
    CHATPROXY["UPSTREAMS"] = _upstreams
if "CHATPROXY_FALLBACKS" in os.environ:
    CHATPROXY["FALLBACKS"] = _env_json_object("CHATPROXY_FALLBACKS")
elif CHATPROXY_USES_SIMULATOR:
    # The demo page's "primary down" fault makes gpt-4o-mini fail: watch gpt-4o answer instead.
    CHATPROXY["FALLBACKS"] = {"gpt-4o-mini": ["gpt-4o"]}
_circuit = _env_json_object("CHATPROXY_CIRCUIT")
if _circuit:
    CHATPROXY["CIRCUIT"] = _circuit
