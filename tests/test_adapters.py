"""The upstream adapters against the simulator, through the openai SDK installed in this venv.

Parametrised by :func:`chatproxy.upstream.detect_sdk`: with the current SDK every test runs once
over httpx and once over aiohttp; in the legacy venv (openai 0.27) it runs the legacy adapter. In
both it also runs the SDK-less adapter (``SDK = "none"``, plain aiohttp).

What is proven here: a clean stream's text, ``finish_reason`` and ``usage``; the chatproxy error
class (and ``retryable`` / ``retry_after``) for every simulator fault; that ``aclose()`` closes the
upstream socket at once however the stream was abandoned (the simulator sees the disconnect within
a fraction of a second, measured on the shared monotonic clock); and that the API key never shows
up in an exception or a log record.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatproxy import errors
from chatproxy.simulator.text import answer_tokens
from chatproxy.upstream import build_upstream, detect_sdk
from chatproxy.upstream.base import Upstream, UpstreamRequest, UpstreamStream

pytestmark = pytest.mark.upstream

SDK = detect_sdk()
HTTP_CLIENTS = ["httpx", "aiohttp"] if SDK == "current" else ["aiohttp"]
# (UPSTREAM.SDK, UPSTREAM.HTTP_CLIENT) of every adapter under test.
ADAPTERS = [(SDK, client) for client in HTTP_CLIENTS] + [("none", "aiohttp")]
API_KEY = "sk-test-SECRET-4f1c9e2ab7d3"
# How soon after aclose() the simulator must have seen the connection go (it polls nothing: its
# handler is cancelled by the socket close itself).
CLOSE_WITHIN = 0.5
_unique = itertools.count()

if SDK is None:  # pragma: no cover - only where no usable openai is installed
    pytest.skip("no usable openai SDK installed", allow_module_level=True)


@pytest.fixture
def sim(isolated_sim: Any) -> Any:
    return isolated_sim  # connection counts here must see this module's clients only


@pytest.fixture(params=ADAPTERS, ids=["-".join(adapter) for adapter in ADAPTERS])
async def upstream(request: pytest.FixtureRequest, sim: Any) -> AsyncIterator[Upstream]:
    sdk, http_client = request.param
    adapter = build_upstream(sdk=sdk, http_client=http_client, base_url=sim.base_url, api_key=API_KEY)
    yield adapter
    await adapter.aclose()


def make_request(
    directive: str = "",
    *,
    read_timeout: float | None = 5.0,
    total_timeout: float = 10.0,
    params: dict[str, Any] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> UpstreamRequest:
    """A request with a unique conversation (so ``times=N`` counters never collide)."""
    text = f"Tell me about rivers #{next(_unique)}"
    if directive:
        text += f" [[sim {directive}]]"
    return UpstreamRequest(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        params=params or {},
        extra_body=extra_body or {},
        connect_timeout=2.0,
        read_timeout=read_timeout,
        total_timeout=total_timeout,
    )


def expected_text(request: UpstreamRequest, seed: Any = None, chunks: int = 20) -> str:
    return "".join(answer_tokens(request.messages, seed, 0, chunks))


async def consume(stream: UpstreamStream, texts: list[str] | None = None) -> list[str]:
    texts = [] if texts is None else texts
    async for text in stream:
        texts.append(text)
    return texts


async def run(
    upstream: Upstream, request: UpstreamRequest
) -> tuple[list[str], UpstreamStream | None, BaseException | None]:
    """Open and read to the end; return (texts, stream, error). Always closes the stream."""
    texts: list[str] = []
    stream = None
    try:
        stream = await upstream.open(request)
        await consume(stream, texts)
    except errors.UpstreamError as exc:
        return texts, stream, exc
    finally:
        if stream is not None:
            await stream.aclose()
    return texts, stream, None


def only_request(stats: dict[str, Any]) -> dict[str, Any]:
    completions = [r for r in stats["requests"] if r["model"] is not None or r["status"] is not None]
    assert len(completions) == 1, stats["requests"]
    record: dict[str, Any] = completions[0]
    return record


async def assert_closed_at_once(sim: Any, closed_at: float) -> None:
    """The one request of this test ended by a client disconnect within CLOSE_WITHIN of closed_at."""

    def settled(stats: dict[str, Any]) -> bool:
        record = only_request(stats)
        return record["closed"] is not None and stats["open_connections"] == 0

    stats = await sim.await_until(settled, timeout=2.0)
    record = only_request(stats)
    assert record["outcome"] == "client_disconnected", record
    # Both processes read CLOCK_MONOTONIC, so the simulator's timestamps compare with ours.
    assert record["closed"] - closed_at < CLOSE_WITHIN, (record["closed"] - closed_at, record)
    assert stats["active_requests"] == 0


# --- a clean stream ---------------------------------------------------------------------------


async def test_clean_stream_text_finish_reason_and_usage(upstream: Upstream, sim: Any) -> None:
    request = make_request()
    texts, stream, error = await run(upstream, request)
    assert error is None
    assert stream is not None
    assert "".join(texts) == expected_text(request)
    # 20 content chunks; the role chunk's empty content is skipped.
    assert len(texts) == 20 and all(isinstance(t, str) and t for t in texts)
    assert stream.finish_reason == "stop"
    usage = stream.usage
    assert usage is not None and usage["completion_tokens"] == 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + 20 and usage["prompt_tokens"] > 0
    record = only_request(sim.stats())
    assert record["outcome"] == "complete" and record["stream"] is True


async def test_params_and_extra_body_reach_the_upstream(upstream: Upstream) -> None:
    request = make_request(params={"max_tokens": 5}, extra_body={"seed": 7})
    texts, stream, error = await run(upstream, request)
    assert error is None and stream is not None
    assert "".join(texts) == expected_text(request, seed=7)[: len("".join(texts))]
    assert len(texts) == 5
    assert stream.finish_reason == "length"
    assert stream.usage is not None and stream.usage["completion_tokens"] == 5


async def test_usage_request_can_be_switched_off(upstream: Upstream) -> None:
    texts, stream, error = await run(upstream, make_request(extra_body={"stream_options": None}))
    assert error is None and stream is not None
    assert len(texts) == 20 and stream.finish_reason == "stop" and stream.usage is None


async def test_sse_comments_are_ignored(upstream: Upstream) -> None:
    request = make_request("stall_after=2 stall=0.25 keepalive=0.05")
    texts, stream, error = await run(upstream, request)
    assert error is None and stream is not None
    assert "".join(texts) == expected_text(request)


async def test_connection_is_pooled_across_streams(upstream: Upstream, sim: Any) -> None:
    for _ in range(3):
        texts, _stream, error = await run(upstream, make_request())
        assert error is None and len(texts) == 20
    stats = sim.stats()
    assert stats["open_connections"] == 1, stats  # one keep-alive connection served all three


# --- faults -> chatproxy errors -----------------------------------------------------------------

# directive -> (error class, retryable, retry_after, texts received before the error)
MID_STREAM_FAULTS = {
    "reset_after=3": (errors.UpstreamDisconnected, 3),
    "close_after=3": (errors.UpstreamDisconnected, 3),
    "malformed_after=2": (errors.UpstreamDisconnected, 2),
}


@pytest.mark.parametrize("directive", list(MID_STREAM_FAULTS))
async def test_broken_body_is_disconnected(upstream: Upstream, directive: str) -> None:
    cls, before = MID_STREAM_FAULTS[directive]
    texts, _stream, error = await run(upstream, make_request(directive))
    assert type(error) is cls, repr(error)
    assert error.retryable and error.reason == "disconnected"
    assert len(texts) == before


async def test_in_stream_error_object_is_retryable_status_0(upstream: Upstream) -> None:
    texts, _stream, error = await run(upstream, make_request("error_after=2"))
    assert type(error) is errors.UpstreamStatusError, repr(error)
    assert error.status == 0 and error.retryable and error.reason == "upstream_error"
    assert len(texts) == 2


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (403, False), (404, False), (408, True), (409, True),
     (500, True), (502, True), (503, True), (504, True), (529, True)],
)  # fmt: skip
async def test_http_status(upstream: Upstream, sim: Any, status: int, retryable: bool) -> None:
    texts, stream, error = await run(upstream, make_request(f"status={status}"))
    assert stream is None and texts == []  # raised by open()
    assert type(error) is errors.UpstreamStatusError, repr(error)
    assert error.status == status and error.retryable is retryable and error.retry_after is None
    assert len(sim.requests()) == 1  # the SDK did not retry: chatproxy owns retries


@pytest.mark.parametrize(
    ("directive", "retry_after"),
    [("status=429 retry_after=2", 2.0), ("status=429 retry_after_ms=1500", 1.5), ("status=429", None)],
)
async def test_rate_limited_carries_retry_after(
    upstream: Upstream, directive: str, retry_after: float | None
) -> None:
    _texts, stream, error = await run(upstream, make_request(directive))
    assert stream is None
    assert type(error) is errors.RateLimited, repr(error)
    assert error.status == 429 and error.retryable and error.reason == "rate_limited"
    assert error.retry_after == retry_after


async def test_retry_after_on_503(upstream: Upstream) -> None:
    _texts, _stream, error = await run(upstream, make_request("status=503 retry_after_ms=250"))
    assert type(error) is errors.UpstreamStatusError and error.status == 503 and error.retry_after == 0.25


async def test_sdk_timeout_mid_body_is_a_stall(upstream: Upstream) -> None:
    # The current SDK's read timeout, or the legacy SDK's total timeout: either way a mid-body
    # timeout is a stall (chatproxy's own watchdog is normally tighter than both).
    request = make_request("stall_after=2 stall=5", read_timeout=0.3, total_timeout=0.6)
    started = time.monotonic()
    texts, _stream, error = await run(upstream, request)
    assert type(error) is errors.StallTimeout, repr(error)
    assert error.retryable and error.reason == "stall"
    assert len(texts) == 2
    assert time.monotonic() - started < 2.0


async def test_sdk_timeout_before_headers_is_a_connect_error(upstream: Upstream) -> None:
    request = make_request("headers_delay=5", read_timeout=0.3, total_timeout=0.3)
    _texts, stream, error = await run(upstream, request)
    assert stream is None
    assert type(error) is errors.UpstreamConnectError, repr(error)
    assert error.retryable and error.reason == "connect"


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for client in HTTP_CLIENTS:
        adapter = build_upstream(http_client=client, base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)
        try:
            _texts, stream, error = await run(adapter, make_request())
        finally:
            await adapter.aclose()
        assert stream is None
        assert type(error) is errors.UpstreamConnectError, repr(error)
        assert error.retryable


# --- closing: no leaked sockets -----------------------------------------------------------------


async def test_aclose_of_stream_abandoned_mid_stall_closes_socket_at_once(
    upstream: Upstream, sim: Any
) -> None:
    stream = await upstream.open(make_request("stall_after=2 stall=30"))
    iterator = aiter(stream)
    assert [await anext(iterator), await anext(iterator)]
    await asyncio.sleep(0.2)  # the upstream is stalling; nobody reads any more
    assert only_request(sim.stats())["closed"] is None
    closed_at = time.monotonic()
    await stream.aclose()
    await assert_closed_at_once(sim, closed_at)
    await stream.aclose()  # idempotent


async def test_cancelled_consumer_then_aclose_closes_socket_at_once(upstream: Upstream, sim: Any) -> None:
    # Cancelling a pending read may already drop the connection (httpcore does); aclose() must
    # finish the job in any case, and the upstream must see the disconnect at once.
    stream = await upstream.open(make_request("stall_after=1 stall=30"))
    texts: list[str] = []
    task = asyncio.create_task(consume(stream, texts))
    await sim.await_until(lambda s: only_request(s)["chunks"] == 1, timeout=2.0)
    await asyncio.sleep(0.05)
    cancelled_at = time.monotonic()
    task.cancel()  # while it awaits the next chunk
    with pytest.raises(asyncio.CancelledError):
        await task
    assert texts == [texts[0]]
    await stream.aclose()
    await assert_closed_at_once(sim, cancelled_at)


async def test_cancelled_consumer_closing_in_its_finally(upstream: Upstream, sim: Any) -> None:
    # What the core does: the watchdog cancels the attempt and its `finally` closes the stream.
    stream = await upstream.open(make_request("stall_after=1 stall=30"))
    closed_at: list[float] = []

    async def attempt() -> None:
        try:
            await consume(stream)
        finally:
            closed_at.append(time.monotonic())
            await stream.aclose()

    task = asyncio.create_task(attempt())
    await sim.await_until(lambda s: only_request(s)["chunks"] == 1, timeout=2.0)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_closed_at_once(sim, closed_at[0])


async def test_aclose_from_another_task_while_a_read_is_pending(upstream: Upstream, sim: Any) -> None:
    stream = await upstream.open(make_request("stall_after=1 stall=30"))
    task = asyncio.create_task(consume(stream))
    await sim.await_until(lambda s: only_request(s)["chunks"] == 1, timeout=2.0)
    await asyncio.sleep(0.05)
    closed_at = time.monotonic()
    await stream.aclose()
    with pytest.raises(errors.UpstreamDisconnected):  # never a clean end: the answer is incomplete
        await asyncio.wait_for(task, 2.0)
    await assert_closed_at_once(sim, closed_at)


async def test_break_out_of_healthy_stream_then_aclose(upstream: Upstream, sim: Any) -> None:
    stream = await upstream.open(make_request("gap=0.2"))
    async for _text in stream:
        break
    closed_at = time.monotonic()
    await stream.aclose()
    await assert_closed_at_once(sim, closed_at)


async def test_cancelled_while_waiting_for_headers(upstream: Upstream, sim: Any) -> None:
    task = asyncio.create_task(upstream.open(make_request("headers_delay=30")))
    await sim.await_until(lambda s: len(s["requests"]) == 1, timeout=2.0)
    await asyncio.sleep(0.05)
    closed_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_closed_at_once(sim, closed_at)


# --- secrets ------------------------------------------------------------------------------------


async def test_api_key_never_in_errors_or_logs(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    raised: list[BaseException] = []
    for directive in ("status=401", "status=429 retry_after=1", "status=500", "error_after=1",
                      "malformed_after=1", "reset_after=1", "headers_delay=5"):  # fmt: skip
        _texts, _stream, error = await run(
            upstream, make_request(directive, read_timeout=0.3, total_timeout=0.3)
        )
        assert error is not None, directive
        raised.append(error)
    for error in raised:
        for text in (str(error), repr(error), "".join(traceback.format_exception(error))):
            assert API_KEY not in text
    assert API_KEY not in repr(upstream)
    if not upstream.name.startswith("raw"):  # the SDK-less adapter has no SDK logging to check
        assert caplog.records, "expected the SDK's debug records to be captured"
    for record in caplog.records:
        assert API_KEY not in record.getMessage()
        assert API_KEY not in caplog.text


# --- configuration ------------------------------------------------------------------------------


def test_detect_sdk_matches_installed_openai() -> None:
    import importlib.metadata

    version = importlib.metadata.version("openai")
    expected = "legacy" if version.startswith("0.") else "current"
    assert expected == SDK


def test_auto_drives_the_sdk_less_adapter_unless_openai_027_is_installed() -> None:
    """"auto" takes the SDK-less wire with the current SDK installed (it sends the same request for
    less CPU per chunk); with openai 0.27 the legacy adapter, which honours the module's own settings."""
    built = build_upstream(sdk="auto", http_client="httpx", base_url="http://127.0.0.1:9/v1", api_key="k")
    assert built.name == ("openai-legacy/aiohttp" if SDK == "legacy" else "raw/aiohttp")
    forced = build_upstream(sdk=SDK, http_client="aiohttp", base_url="http://127.0.0.1:9/v1", api_key="k")
    assert forced.name != "raw/aiohttp"


def test_missing_sdk_generation_names_the_pip_extra() -> None:
    other = "current" if SDK == "legacy" else "legacy"
    with pytest.raises(errors.ConfigurationError) as info:
        build_upstream(sdk=other, base_url="http://127.0.0.1:9/v1", api_key=API_KEY)
    message = str(info.value)
    if other == "legacy":
        assert 'pip install "chatproxy[legacy]"' in message
    else:
        assert "pip install" in message and "openai" in message


def test_bad_choices_are_configuration_errors() -> None:
    with pytest.raises(errors.ConfigurationError):
        build_upstream(sdk="newest", base_url=None, api_key=API_KEY)
    with pytest.raises(errors.ConfigurationError):
        build_upstream(http_client="requests", base_url=None, api_key=API_KEY)


def test_official_api_without_key_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    if SDK == "legacy":
        import openai

        monkeypatch.setattr(openai, "api_key", None)
    with pytest.raises(errors.ConfigurationError, match="API_KEY"):
        build_upstream(base_url=None, api_key=None)
    # A server of one's own may need no key: a placeholder is sent.
    build_upstream(base_url="http://127.0.0.1:9/v1", api_key=None)
