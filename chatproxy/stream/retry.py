"""What to do after a failed attempt: try again after a delay, or give up with an error code."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from chatproxy.codes import UPSTREAM_REQUEST_CODES, ErrorCode
from chatproxy.conf import Policy
from chatproxy.errors import RateLimited, UpstreamConnectError, UpstreamError, UpstreamStatusError, UpstreamTimeout

logger = logging.getLogger("chatproxy.core")


@dataclass(frozen=True, slots=True)
class Retry:
    """Make another attempt after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """End the stream with the ``error`` event code ``code``."""

    code: ErrorCode


Decision = Retry | GiveUp


def plan_retry(
    exc: UpstreamError,
    attempt: int,
    policy: Policy,
    *,
    partial: bool,
    deadline_expired: bool,
    now: float,
    deadline_at: float,
    rng: Callable[[], float],
) -> Decision:
    """The decision after attempt number ``attempt`` (from 1) failed with ``exc``.

    ``partial``: text was already sent in this answer. ``deadline_expired``: the stream's deadline
    is what ended the attempt. The backoff is exponential with full jitter (``rng()`` in [0, 1)),
    unless the upstream said how long to wait (Retry-After, honoured up to ``retry_after_max``).
    """
    if deadline_expired:
        return GiveUp(ErrorCode.DEADLINE_EXCEEDED)
    if not exc.retryable or (partial and policy.on_partial == "fail") or attempt >= policy.max_attempts:
        return GiveUp(final_code(exc))
    if exc.retry_after is not None:
        if exc.retry_after > policy.retry_after_max:
            return GiveUp(final_code(exc))
        delay = exc.retry_after
    else:
        cap = min(policy.backoff_max, policy.backoff_initial * (2 ** (attempt - 1)))
        delay = cap * rng()
    if now + delay >= deadline_at:
        return GiveUp(ErrorCode.DEADLINE_EXCEEDED)
    return Retry(delay)


def final_code(exc: UpstreamError) -> ErrorCode:
    """The ``error`` event code for a failure that ends the stream."""
    if isinstance(exc, RateLimited):
        return ErrorCode.RATE_LIMITED
    if isinstance(exc, UpstreamTimeout):
        return ErrorCode.UPSTREAM_TIMEOUT
    if isinstance(exc, UpstreamConnectError):
        return ErrorCode.UPSTREAM_UNAVAILABLE
    if isinstance(exc, UpstreamStatusError) and not exc.retryable:
        # 401/403 are chatproxy's own credentials: the user cannot fix that.
        if exc.status in (401, 403):
            logger.error("upstream refused chatproxy's credentials (HTTP %s): check UPSTREAM.API_KEY", exc.status)
            return ErrorCode.UPSTREAM_UNAVAILABLE
        # What the user can act on (the model, the length, the content) is named as such.
        return UPSTREAM_REQUEST_CODES.get(exc.code or "", ErrorCode.BAD_REQUEST)
    return ErrorCode.UPSTREAM_UNAVAILABLE
