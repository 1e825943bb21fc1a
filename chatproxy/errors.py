"""chatproxy's exception tree.

Upstream adapters translate their SDK's exceptions into these; the stream core decides from them
whether to retry, and the transports never see anything else.

    ChatProxyError
    ├── ConfigurationError           settings name something that cannot work (missing SDK, ...)
    └── UpstreamError                one attempt failed; ``reason`` is the ``retry`` event's reason
        ├── UpstreamConnectError     "connect": TCP/TLS connect failed or timed out
        ├── UpstreamTimeout          chatproxy's own watchdogs
        │   ├── FirstTokenTimeout    "first_token": no chunk within FIRST_TOKEN
        │   └── StallTimeout         "stall": gap between chunks longer than STALL
        ├── UpstreamDisconnected     "disconnected": reset / protocol error / malformed body
        └── UpstreamStatusError      an HTTP error status (or an in-stream error object)
            └── RateLimited          "rate_limited": 429, carries Retry-After

``retryable`` says whether another attempt may help (docs/reference.md). Messages of these
exceptions are for logs only: they never carry API keys (adapters build them from status codes and
exception class names) and never reach a client; clients get the friendly text from :mod:`chatproxy.messages`.
"""

from __future__ import annotations

from chatproxy.codes import UPSTREAM_REQUEST_CODES, ErrorCode

# Statuses worth another attempt: timeouts, conflicts, rate limits, server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class ChatProxyError(Exception):
    """Base class of everything chatproxy raises on purpose."""


class ConfigurationError(ChatProxyError):
    """The configuration asks for something that cannot work here."""


class UpstreamError(ChatProxyError):
    """One upstream attempt failed.

    ``reason`` is the value of the ``retry`` event's ``reason`` field; ``retryable`` says whether
    another attempt may help; ``retry_after`` is the server's requested delay in seconds, if any.
    """

    reason = "upstream_error"
    retryable = True

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail or self.reason)
        self.retry_after = retry_after


class UpstreamConnectError(UpstreamError):
    reason = "connect"


class UpstreamTimeout(UpstreamError):
    """Raised by chatproxy's watchdog, never by an SDK."""


class FirstTokenTimeout(UpstreamTimeout):
    reason = "first_token"


class StallTimeout(UpstreamTimeout):
    reason = "stall"


class UpstreamDisconnected(UpstreamError):
    reason = "disconnected"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status (``status`` 0: an in-stream error object).

    ``code`` is the error body's ``code`` (else ``type``) when it is a plain identifier such as
    ``context_length_exceeded``: safe to act on, never the body's text."""

    def __init__(
        self, status: int, detail: str = "", *, retry_after: float | None = None, code: str | None = None
    ) -> None:
        super().__init__(detail or f"HTTP {status}", retry_after=retry_after)
        self.status = status
        self.code = code
        self.retryable = status == 0 or status in RETRYABLE_STATUSES

    @property
    def context_length(self) -> bool:
        """Whether the request was refused for being too long for this model (a fallback may take it)."""
        return self.code is not None and UPSTREAM_REQUEST_CODES.get(self.code) is ErrorCode.CONTEXT_LENGTH_EXCEEDED


class RateLimited(UpstreamStatusError):
    reason = "rate_limited"

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(429, detail, retry_after=retry_after)


def status_error(
    status: int, detail: str = "", *, retry_after: float | None = None, code: str | None = None
) -> UpstreamStatusError:
    """The most specific :class:`UpstreamStatusError` for an HTTP ``status`` (``code``: the body's)."""
    if status == 429:
        error: UpstreamStatusError = RateLimited(detail, retry_after=retry_after)
        error.code = code
        return error
    return UpstreamStatusError(status, detail, retry_after=retry_after, code=code)


def parse_retry_after(headers: object) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds form) in a header mapping.

    The HTTP-date form of Retry-After is not used by LLM APIs and is ignored.
    """
    get = getattr(headers, "get", None)
    if get is None:
        return None
    raw_ms = get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except (TypeError, ValueError):
            pass
    raw = get("retry-after")
    if raw is not None:
        try:
            return max(0.0, float(raw))
        except (TypeError, ValueError):
            return None
    return None
