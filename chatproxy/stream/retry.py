"""What to do after a failed attempt: try again after a delay, move on to the next target, or give up.

The plan for one target: retryable failures are tried again, with backoff or after the upstream's
Retry-After, until the target's attempts are used up or the deadline would pass. While a fallback
target is left, a target is abandoned sooner:

* its attempts are used up, or it asks to wait (Retry-After) longer than ``retry_after_max``, or the
  backoff would not end before the deadline: the next target is tried at once;
* an attempt that sent nothing before its first-token deadline moves on at once: nothing is lost,
  and a provider that hangs once tends to hang again;
* a stall after partial output gets one more attempt on the same target (its restart stays seamless:
  the same model repeats what was sent), a second one moves on;
* a request the model refused as too long for it (a context-length error) moves on; any other
  request error is about the request itself and ends the stream on every target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from chatproxy.codes import UPSTREAM_REQUEST_CODES, ErrorCode
from chatproxy.conf import Policy
from chatproxy.errors import (
    FirstTokenTimeout,
    RateLimited,
    StallTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)

logger = logging.getLogger("chatproxy.core")


@dataclass(frozen=True, slots=True)
class Retry:
    """Make another attempt after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """End the stream with the ``error`` event code ``code``."""

    code: ErrorCode


@dataclass(frozen=True, slots=True)
class MoveOn:
    """Abandon this target for the next one. ``code`` ends the stream if no later target answers;
    ``unhealthy`` says whether the failure counts against the target's circuit (a request too long
    for the model says nothing about the provider's health)."""

    code: ErrorCode
    unhealthy: bool = True


Decision = Retry | MoveOn | GiveUp


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
    fallback_left: bool = False,
    stalls: int = 0,
) -> Decision:
    """The decision after attempt number ``attempt`` (from 1) on a target failed with ``exc``.

    ``partial``: text was already sent in this answer. ``deadline_expired``: the stream's deadline
    is what ended the attempt. The backoff is exponential with full jitter (``rng()`` in [0, 1)),
    unless the upstream said how long to wait (Retry-After, honoured up to ``retry_after_max``).
    ``fallback_left``: another target may be tried (:class:`MoveOn` is only returned then);
    ``stalls``: stall timeouts on this target so far, this one included.
    """
    if deadline_expired:
        return GiveUp(ErrorCode.DEADLINE_EXCEEDED)
    if not exc.retryable:
        if fallback_left and isinstance(exc, UpstreamStatusError) and exc.context_length:
            return MoveOn(final_code(exc), unhealthy=False)
        return GiveUp(final_code(exc))
    if partial and policy.on_partial == "fail":
        return GiveUp(final_code(exc))
    end = MoveOn(final_code(exc)) if fallback_left else GiveUp(final_code(exc))
    if attempt >= policy.max_attempts:
        return end
    if fallback_left and (isinstance(exc, FirstTokenTimeout) or (isinstance(exc, StallTimeout) and stalls >= 2)):
        return end
    if exc.retry_after is not None:
        if exc.retry_after > policy.retry_after_max:
            return end
        delay = exc.retry_after
    else:
        cap = min(policy.backoff_max, policy.backoff_initial * (2 ** (attempt - 1)))
        delay = cap * rng()
    if now + delay >= deadline_at:
        return end if fallback_left else GiveUp(ErrorCode.DEADLINE_EXCEEDED)
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
