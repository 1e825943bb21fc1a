"""Broken or hostile upstream servers, beyond timing faults: each answer ends exactly or with one friendly error.

The simulator plays the server (``docs/simulator.md``, "Hostile servers"); the relay is the real
stream core over each adapter installed here (no SDK; the current SDK's transports; under the
legacy virtualenv openai 0.27). With ``times=1`` only the first attempt meets the fault, so the
answer must end ``done`` with exactly the clean text; without it every attempt does, and the
stream must end with one ``error`` whose message is the friendly one. A huge or endless line
must not make the relay hold it: the Python memory allocated while relaying stays under
:data:`MEMORY_BOUND`, far below the 50 MB line.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatproxy.codes import ErrorCode
from chatproxy.conf import Policy
from chatproxy.core import ChatRequest
from chatproxy.simulator.text import answer_tokens
from chatproxy.upstream import build_upstream, detect_sdk
from chatproxy.upstream.base import Upstream
from chatproxy.upstream.sse import _MAX_EVENT_BYTES as MAX_EVENT_BYTES  # the documented line cap
from tests.streamrun import Run, play

pytestmark = pytest.mark.upstream

SDK = detect_sdk()
ADAPTERS = [("none", "aiohttp")]
if SDK == "current":
    ADAPTERS += [("current", "httpx"), ("current", "aiohttp")]
elif SDK == "legacy":
    ADAPTERS += [("legacy", "aiohttp")]
CHUNKS = 8
#: What relaying a 50 MB line may allocate at its peak: a few times the line cap, never the line.
MEMORY_BOUND = 6 * MAX_EVENT_BYTES
_unique = itertools.count()

POLICY = Policy(connect=1.0, first_token=2.0, stall=1.0, deadline=30.0, max_attempts=3, backoff_initial=0.05,
                backoff_max=0.2, retry_after_max=3.0, keepalive=5.0, gateway=10.0)


@pytest.fixture(params=ADAPTERS, ids=["-".join(adapter) for adapter in ADAPTERS])
async def upstream(request: pytest.FixtureRequest, isolated_sim: Any) -> AsyncIterator[Upstream]:
    sdk, http_client = request.param
    adapter = build_upstream(sdk=sdk, http_client=http_client, base_url=isolated_sim.base_url, api_key="sk-hostile")
    yield adapter
    await adapter.aclose()


def ask(directive: str) -> tuple[ChatRequest, str]:
    """A request meeting ``directive`` and the exact clean answer to it."""
    content = f"Tell me about ferries #{next(_unique)} [[sim chunks={CHUNKS} {directive}]]"
    messages = [{"role": "user", "content": content}]
    return ChatRequest(model="gpt-4o-mini", messages=messages), "".join(answer_tokens(messages, n=CHUNKS))


async def relay(upstream: Upstream, request: ChatRequest) -> Run:
    return await play(upstream, request, POLICY, within=25)


RECOVERED = [
    # (directive, the retry reasons the first attempt may end with: () = it must not fail at all)
    ("huge_after=3 times=1", ("disconnected",)),
    ("endless_after=3 times=1", ("disconnected",)),
    ("encoding=gzip", ()),
    ("encoding=deflate", ()),
    ("close_delimited", ()),
    ("redirect times=1", ("disconnected", "upstream_error")),  # an SDK may follow it: then no retry
    ("html times=1", ("disconnected", "upstream_error")),
    ("invalid_utf8_after=3 times=1", ("disconnected",)),
    ("sse_error_after=3 times=1", ("upstream_error",)),
]


@pytest.mark.parametrize(("directive", "reasons"), RECOVERED, ids=[d.split()[0] for d, _ in RECOVERED])
async def test_broken_server_then_the_exact_answer(upstream: Upstream, isolated_sim: Any, directive: str,
                                                   reasons: tuple[str, ...]) -> None:
    request, expected = ask(directive)
    run = await relay(upstream, request)
    assert run.last.name == "done", run.events[-3:]
    assert run.text == expected
    seen = {event.data["reason"] for event in run.named("retry") if event.data is not None}
    assert seen <= set(reasons), seen
    if not reasons:
        assert not seen
    stats = await isolated_sim.await_until(lambda s: s["active_requests"] == 0)
    assert stats["active_requests"] == 0


@pytest.mark.parametrize("directive", ["huge_after=2", "endless_after=2", "html", "invalid_utf8_after=2"])
async def test_always_broken_server_is_one_friendly_error(upstream: Upstream, directive: str) -> None:
    request, _ = ask(directive)
    run = await relay(upstream, request)
    assert run.last.name == "error"
    assert run.last.data is not None
    assert run.last.data["code"] == ErrorCode.UPSTREAM_UNAVAILABLE
    assert len(run.named("retry")) == POLICY.max_attempts - 1


@pytest.mark.parametrize("directive", ["huge_after=2 times=1", "endless_after=2 times=1"])
async def test_a_huge_line_is_never_held_in_memory(upstream: Upstream, directive: str) -> None:
    request, expected = ask(directive)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run = await relay(upstream, request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.last.name == "done" and run.text == expected
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB while relaying a line of 50 MB"
