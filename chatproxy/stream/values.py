"""The plain values a stream is made of: what was asked, where it may be answered, what happened."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatproxy.conf import Policy
from chatproxy.upstream.base import Upstream


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the user asked for, validated."""

    model: str
    messages: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)


#: The name of the upstream ``UPSTREAM`` configures (the one a request's own model goes to).
DEFAULT_UPSTREAM = "default"


@dataclass(frozen=True, slots=True)
class Target:
    """One place an answer can come from: an upstream adapter, the request for it, and the policy
    its attempts follow (first-token and stall limits, attempts, backoff, partial output).

    ``upstream_name`` names the adapter (``"default"`` or a key of ``UPSTREAMS``); ``name`` is how
    the ``retry`` event's ``fallback`` field names the target (``"model"`` on the first target's
    upstream, else ``"upstream:model"``; empty: the request's model).
    """

    upstream: Upstream
    request: ChatRequest
    policy: Policy
    upstream_name: str = DEFAULT_UPSTREAM
    name: str = ""

    @property
    def key(self) -> str:
        """``"upstream:model"``, always qualified: what circuits and records count by."""
        return f"{self.upstream_name}:{self.request.model}"

    @property
    def label(self) -> str:
        return self.name or self.request.model


@dataclass(slots=True)
class StreamStats:
    """What happened, for records and signals. Times are seconds."""

    attempts: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    time_to_first_token: float | None = None
    longest_gap: float = 0.0
    chars_sent: int = 0
    outcome: str = "running"  # "done" or an error code
    duration: float = 0.0
    model: str = ""  # the model that answered (or was tried last)
    target: str = ""  # its Target.key: "upstream:model"
    abandoned: list[str] = field(default_factory=list)  # Target.key of each target given up for the next
    circuits_opened: list[str] = field(default_factory=list)  # Target.key of each circuit this stream opened
    #: The ``finish_reason`` of each choice other than 0 (``n`` > 1), as the answering attempt
    #: reported it; choice 0's is the ``done`` event's.
    finish_reasons: dict[int, str] = field(default_factory=dict)
