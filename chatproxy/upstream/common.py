"""Helpers the upstream adapters share (:mod:`chatproxy.upstream` imports the adapters lazily).

They keep what reaches an exception message to class names, status codes and short error codes,
never keys or bodies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from chatproxy.errors import ConfigurationError

INSTALL_CURRENT = 'pip install -U openai (or "openai[aiohttp]" for HTTP_CLIENT "aiohttp")'
INSTALL_CURRENT_AIOHTTP = 'pip install -U "openai[aiohttp]"'
INSTALL_LEGACY = 'pip install "chatproxy[legacy]"'
INSTALL_AIOHTTP = "pip install aiohttp"

# Sent when no key is configured but BASE_URL points at a server of one's own (a local model
# server, the simulator): the SDKs refuse to run without *some* key, and such servers ignore it.
PLACEHOLDER_API_KEY = "chatproxy-no-key"


# An upstream error "code"/"type" is an identifier such as "invalid_api_key" or
# "context_length_exceeded": useful in a log line, and safe once it is known to look like one.
_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def error_code(body: object) -> str | None:
    """The ``code`` (else ``type``) of an OpenAI error object, if it is a plain identifier."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            body = inner
        for key in ("code", "type"):
            value = body.get(key)
            if isinstance(value, (str, int)) and _CODE_RE.fullmatch(str(value)):
                return str(value)
    return None


def describe(exc: BaseException, status: int | None = None, code: str | None = None) -> str:
    """A log-safe detail: exception class, HTTP status and error code only."""
    detail = type(exc).__name__
    if status:
        detail += f": HTTP {status}"
    if code:
        detail += f" ({code})"
    return detail


def describe_chain(exc: BaseException) -> str:
    """``"ReadError from httpcore2.ReadError"``: the class and, if any, its cause's qualified class."""
    cause = exc.__cause__
    if cause is None:
        return type(exc).__name__
    cls = type(cause)
    return f"{type(exc).__name__} from {cls.__module__.split('.')[0]}.{cls.__name__}"


def request_body(params: Mapping[str, Any], extra_body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The extra request fields and whether to ask for usage (``stream_options.include_usage``).

    ``EXTRA_BODY`` wins over ``params``. ``EXTRA_BODY = {"stream_options": None}`` switches the usage
    request off for servers that reject ``stream_options`` (older Azure API versions do).
    """
    body = {**params, **extra_body}
    want_usage = True
    if "stream_options" in body:
        if body["stream_options"] is None:
            del body["stream_options"]
        want_usage = False  # the caller's own stream_options are sent as given
    return body, want_usage


def resolve_api_key(api_key: str | None, base_url: str | None, env_default: str | None) -> str:
    """The key to send: the configured one, the SDK's environment default, or a placeholder.

    The placeholder is only used with a ``base_url`` of one's own; the official API without a
    key is a configuration error, reported now rather than as a 401 on every request.
    """
    key = api_key or env_default or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    # The SDKs read their default base URL from these (current: OPENAI_BASE_URL, 0.27: OPENAI_API_BASE).
    if base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE"):
        return PLACEHOLDER_API_KEY
    raise ConfigurationError(
        "no upstream API key: set CHATPROXY['UPSTREAM']['API_KEY'] or OPENAI_API_KEY "
        "(or set UPSTREAM.BASE_URL to a server that needs none)"
    )
