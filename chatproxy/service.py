"""Glue between Django settings and the stream core: the shared upstream and new streams.

Adapters hold connection pools bound to one event loop, so one adapter is kept per running loop
(Daphne and uvicorn run one loop per process; tests may run several in turn). The cache is
dropped when ``CHATPROXY`` changes.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from chatproxy.conf import get_config, resolve_policy, upstream_api_key
from chatproxy.core import ChatRequest, ChatStream
from chatproxy.upstream import build_upstream
from chatproxy.upstream.base import Upstream

_upstreams: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Upstream] = weakref.WeakKeyDictionary()


def get_upstream() -> Upstream:
    """The upstream adapter for the running loop, built from ``CHATPROXY["UPSTREAM"]``."""
    loop = asyncio.get_running_loop()
    upstream = _upstreams.get(loop)
    if upstream is None:
        conf = get_config()["UPSTREAM"]
        upstream = build_upstream(
            sdk=conf["SDK"],
            http_client=conf["HTTP_CLIENT"],
            base_url=conf["BASE_URL"],
            api_key=upstream_api_key(),
        )
        _upstreams[loop] = upstream
    return upstream


def forget_upstreams(**kwargs: Any) -> None:
    """Drop cached adapters (``setting_changed`` receiver). Their pools close with their loop."""
    if kwargs.get("setting") in (None, "CHATPROXY"):
        _upstreams.clear()


def open_stream(request: ChatRequest, *, allow_reset: bool = True, options: dict[str, Any] | None = None) -> ChatStream:
    """A started :class:`ChatStream` for ``request`` under the policy resolved for its model."""
    policy = resolve_policy(request.model, options)
    return ChatStream(get_upstream(), request, policy, allow_reset=allow_reset).start()
