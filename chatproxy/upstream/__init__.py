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

The helpers the adapter modules share are in :mod:`chatproxy.upstream.common`, which imports no
adapter: the adapters are imported here lazily, so nothing imports in a circle.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Mapping
from typing import Any

from chatproxy.errors import ConfigurationError
from chatproxy.upstream.base import Upstream
from chatproxy.upstream.common import (
    INSTALL_AIOHTTP,
    INSTALL_CURRENT,
    INSTALL_LEGACY,
    PLACEHOLDER_API_KEY,
)

__all__ = [
    "HTTP_CLIENT_CHOICES", "SDK_CHOICES", "build_named_upstream", "build_upstream", "detect_sdk", "preload",
    "resolve_sdk",
]

SDK_CHOICES = ("auto", "current", "legacy", "none", "anthropic")
HTTP_CLIENT_CHOICES = ("httpx", "aiohttp")

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
