"""Upstream adapters: one per openai SDK generation, behind :mod:`chatproxy.upstream.base`.

Public API:

* :func:`detect_sdk` -- which openai generation is installed: ``"current"`` (openai >= 1),
  ``"legacy"`` (openai 0.27 / 0.28) or ``None`` (not installed, or too old). It reads package
  metadata only; nothing is imported.
* :func:`resolve_sdk` -- the adapter ``UPSTREAM.SDK`` stands for. ``"auto"`` is ``"none"`` (no SDK: the
  API over plain aiohttp, a hard dependency) unless the legacy generation is installed, then
  ``"legacy"``: the SDK-less adapter sends the request the current SDK sends and reads the same
  environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``, the
  proxy variables), so the current SDK would only add CPU per chunk; openai 0.27 projects configure
  the module itself in code (``openai.api_key``, ``api_base``, ``organization``, ``proxy``), which
  only the legacy adapter honours. ``"current"`` drives the current SDK.
* :func:`build_upstream` -- the :class:`~chatproxy.upstream.base.Upstream` for the settings
  ``UPSTREAM.SDK`` / ``HTTP_CLIENT`` / ``BASE_URL`` / ``API_KEY``. A choice that cannot work here
  (SDK not installed, wrong generation installed, aiohttp extra missing, no API key for the
  official API) raises :class:`~chatproxy.errors.ConfigurationError` naming the pip command that
  fixes it. The SDK is imported here, lazily, so importing chatproxy never needs openai.
* :func:`build_named_upstream` -- the same for one of ``CHATPROXY["UPSTREAMS"]`` (fallback providers).

The helpers below the public API are shared by the adapter modules; they keep what reaches an
exception message to class names, status codes and short error codes, never keys or bodies.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Mapping
from typing import Any

from chatproxy.errors import ConfigurationError
from chatproxy.upstream.base import Upstream

__all__ = [
    "HTTP_CLIENT_CHOICES", "SDK_CHOICES", "build_named_upstream", "build_upstream", "detect_sdk", "preload",
    "resolve_sdk",
]

SDK_CHOICES = ("auto", "current", "legacy", "none", "anthropic")
HTTP_CLIENT_CHOICES = ("httpx", "aiohttp")

INSTALL_CURRENT = 'pip install -U openai (or "openai[aiohttp]" for HTTP_CLIENT "aiohttp")'
INSTALL_CURRENT_AIOHTTP = 'pip install -U "openai[aiohttp]"'
INSTALL_LEGACY = 'pip install "chatproxy[legacy]"'
INSTALL_AIOHTTP = "pip install aiohttp"

# Sent when no key is configured but BASE_URL points at a server of one's own (a local model
# server, the simulator): the SDKs refuse to run without *some* key, and such servers ignore it.
PLACEHOLDER_API_KEY = "chatproxy-no-key"


def _openai_version() -> str | None:
    try:
        return importlib.metadata.version("openai")
    except importlib.metadata.PackageNotFoundError:
        return None


def _generation(version: str) -> str | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    if major >= 1:
        return "current"
    # 0.27 introduced ChatCompletion.acreate(stream=True) as used here; 0.28 kept the same API.
    if major == 0 and minor in (27, 28):
        return "legacy"
    return None


def detect_sdk() -> str | None:
    """``"current"`` / ``"legacy"`` for the installed openai package, ``None`` if unusable."""
    version = _openai_version()
    return _generation(version) if version else None


def _auto(installed: str | None) -> str:
    return "legacy" if installed == "legacy" else "none"


def resolve_sdk(sdk: str) -> str:
    """``sdk`` with ``"auto"`` replaced by what it picks: ``"legacy"`` with openai 0.27 / 0.28
    installed, else ``"none"`` (the module docstring says why)."""
    return _auto(detect_sdk()) if sdk == "auto" else sdk


def build_upstream(
    *,
    sdk: str = "auto",
    http_client: str = "httpx",
    base_url: str | None,
    api_key: str | None,
) -> Upstream:
    """The adapter for ``sdk`` (``"none"``: no SDK, the API over aiohttp directly, see
    :mod:`chatproxy.upstream.raw`; ``"anthropic"``: Anthropic's Messages API over aiohttp, see
    :mod:`chatproxy.upstream.anthropic`; ``"auto"``: ``"legacy"`` with openai 0.27 / 0.28 installed, else
    ``"none"``, see :func:`resolve_sdk`).

    ``http_client`` picks the current SDK's transport (``"httpx"``: the SDK default,
    ``"aiohttp"``: ``openai.DefaultAioHttpClient``); the legacy SDK and ``"none"`` always use aiohttp.
    ``base_url=None`` and ``api_key=None`` mean the SDK's defaults (``OPENAI_BASE_URL`` /
    ``OPENAI_API_KEY`` and friends). Raises :class:`ConfigurationError`.
    """
    if sdk not in SDK_CHOICES:
        raise ConfigurationError(f"UPSTREAM.SDK must be one of {', '.join(SDK_CHOICES)}, not {sdk!r}")
    if http_client not in HTTP_CLIENT_CHOICES:
        raise ConfigurationError(
            f"UPSTREAM.HTTP_CLIENT must be one of {', '.join(HTTP_CLIENT_CHOICES)}, not {http_client!r}"
        )
    version = _openai_version()
    installed = _generation(version) if version else None
    if sdk == "auto":
        sdk = _auto(installed)
    if sdk == "anthropic":  # Anthropic's Messages API over aiohttp (no SDK)
        try:
            from chatproxy.upstream.anthropic import AnthropicUpstream
        except ImportError as exc:
            raise ConfigurationError(f'UPSTREAM.SDK "anthropic" needs aiohttp ({type(exc).__name__}): '
                                     f"{INSTALL_AIOHTTP}") from exc
        return AnthropicUpstream(base_url=base_url, api_key=api_key)
    if sdk == "none":
        try:
            from chatproxy.upstream.raw import RawUpstream
        except ImportError as exc:
            fix = INSTALL_AIOHTTP
            raise ConfigurationError(f'UPSTREAM.SDK "none" needs aiohttp ({type(exc).__name__}): {fix}') from exc
        return RawUpstream(base_url=base_url, api_key=api_key)
    if installed != sdk:
        found = f"openai {version} is installed" if version else "openai is not installed"
        fix = INSTALL_LEGACY if sdk == "legacy" else INSTALL_CURRENT
        raise ConfigurationError(f'UPSTREAM.SDK is "{sdk}" but {found}: {fix}')

    try:
        if sdk == "legacy":
            from chatproxy.upstream.legacy import LegacyUpstream

            return LegacyUpstream(base_url=base_url, api_key=api_key)
        from chatproxy.upstream.current import CurrentUpstream
    except ImportError as exc:  # metadata says installed, but the package does not import
        fix = INSTALL_LEGACY if sdk == "legacy" else INSTALL_CURRENT
        raise ConfigurationError(f"openai {version} does not import ({type(exc).__name__}): {fix}") from exc
    return CurrentUpstream(http_client=http_client, base_url=base_url, api_key=api_key)


def build_named_upstream(name: str, conf: Mapping[str, Any]) -> Upstream:
    """The adapter for the upstream ``name`` of ``CHATPROXY["UPSTREAMS"]``, whose settings are ``conf``
    (``BASE_URL``, ``API_KEY``, ``SDK``, ``HTTP_CLIENT``; the defaults of ``UPSTREAM`` where missing).

    A named upstream is another provider: it never gets ``OPENAI_API_KEY`` (nor the SDK's key
    defaults), only its own ``API_KEY``, and it needs a ``BASE_URL``. Without a key the server is
    one of one's own and gets the placeholder. Raises :class:`ConfigurationError`.
    """
    base_url = conf.get("BASE_URL")
    if not base_url:
        raise ConfigurationError(f"UPSTREAMS[{name!r}] has no BASE_URL: name the provider's endpoint")
    return build_upstream(
        sdk=conf.get("SDK") or "auto",
        http_client=conf.get("HTTP_CLIENT") or "httpx",
        base_url=base_url,
        api_key=conf.get("API_KEY") or PLACEHOLDER_API_KEY,
    )


def preload() -> None:
    """Import the adapter of the configured SDK now: call it from the ASGI module, at server start.

    Importing openai takes a second or two. Left to the first stream, it happens on the worker's
    event loop: every connection of that worker stalls meanwhile, and behind a gateway with a short
    idle deadline the first stream's response can time out. Errors are left to the first request
    (and the system checks) to report.
    """
    from chatproxy.conf import get_config

    sdk = resolve_sdk(get_config()["UPSTREAM"]["SDK"])
    module = {"current": "current", "legacy": "legacy", "none": "raw", "anthropic": "anthropic"}.get(sdk)
    if module is not None:
        try:
            importlib.import_module(f"chatproxy.upstream.{module}")
        except ImportError:
            pass


# --- helpers shared by the adapters -------------------------------------------------------------

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
