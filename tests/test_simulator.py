"""The simulator, driven by the real current openai SDK (``AsyncOpenAI``, httpx2 transport).

Each fault must look to the SDK exactly like the real failure it stands for; the assertions pin
what openai 3.57 actually raises, so a change in the SDK shows up here first:

=====================================  =======================================================
fault                                  openai 3.57 raises
=====================================  =======================================================
``headers_delay`` (stall pre-headers)  ``APITimeoutError`` from ``await create(...)``
``stall_first`` / ``stall_after``      ``APITimeoutError`` while iterating (cause ReadTimeout)
``reset_after`` (RST)                  ``APIConnectionError`` while iterating (cause httpx2.ReadError)
``close_after`` (FIN mid-body)         ``APIConnectionError`` (cause httpx2.RemoteProtocolError)
``malformed_after``                    bare ``json.JSONDecodeError`` (the SDK does not wrap it)
``error_after``                        ``APIError`` (not an ``APIStatusError``)
``status=429`` / 503 / 500 / 400 / 404 ``RateLimitError`` / ``InternalServerError`` x2 /
                                       ``BadRequestError`` / ``NotFoundError``
no ``Authorization``                   ``AuthenticationError``
=====================================  =======================================================

Runs with ``-o asyncio_mode=auto``; tiny gaps and stalls keep the file well under 20 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatproxy.simulator.faults import DirectiveError, Faults, fingerprint, parse_directives, strip_directives
from chatproxy.simulator.process import SimulatorProcess
from chatproxy.simulator.text import answer_tokens, continuation_tokens

# Drives the simulator with the current openai SDK: not part of the legacy-SDK run.
httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")

MODEL = "gpt-4o-mini"


@pytest.fixture
def sim(isolated_sim: SimulatorProcess) -> SimulatorProcess:
    return isolated_sim  # connection counts here must see this module's clients only


def make_client(sim: SimulatorProcess, read: float = 5.0) -> openai.AsyncOpenAI:
    # max_retries=0: these tests look at one attempt; chatproxy owns retries in production.
    return openai.AsyncOpenAI(
        base_url=sim.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=openai.Timeout(read, connect=2.0, read=read, write=5.0, pool=5.0),
    )


@pytest_asyncio.fixture
async def oai(sim: SimulatorProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    client = make_client(sim)
    yield client
    await client.close()


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def collect(stream: Any, into: list[str] | None = None) -> tuple[list[str], list[Any]]:
    """Content pieces and raw chunks of an SDK stream. ``into`` sees pieces as they arrive."""
    pieces: list[str] = [] if into is None else into
    chunks: list[Any] = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, chunks


def last_request(stats: dict[str, Any]) -> dict[str, Any]:
    return stats["requests"][-1]


# ---------------------------------------------------------------------------------------------
# Pure parts: directives and text
# ---------------------------------------------------------------------------------------------


def test_directives_merge_and_header_wins() -> None:
    text = "Tell me [[sim gap=0.1 stall_after=3]] more [[sim stall=2 diverge]]"
    faults = parse_directives(text, "gap=0.2 times=1")
    assert faults == Faults(gap=0.2, stall_after=3, stall=2.0, diverge=True, times=1)
    assert faults.given() == {"gap": 0.2, "stall_after": 3, "stall": 2.0, "times": 1, "diverge": True}
    assert strip_directives(text) == "Tell me more"
    # stall_first is the documented alias of first_delay; clean() keeps only the shape keys.
    assert parse_directives("[[sim stall_first=1.5 chunks=4 key=k]]").clean() == Faults(chunks=4, key="k")
    assert parse_directives("[[sim status=429 retry_after=1.2]]").retry_after_header == "2"


@pytest.mark.parametrize(
    "bad",
    [
        "[[sim bogus=1]]",
        "[[sim gap=fast]]",
        "[[sim gap=-1]]",
        "[[sim status=200]]",
        "[[sim stall=3]]",
        "[[sim retry_after=1]]",
        "[[sim chunks]]",
        "[[sim diverge=maybe]]",
    ],
)
def test_directive_errors(bad: str) -> None:
    with pytest.raises(DirectiveError):
        parse_directives(bad)


def test_fingerprint() -> None:
    assert fingerprint("hi [[sim times=1]]", "m") == fingerprint("hi [[sim times=1]]", "m")
    assert fingerprint("hi [[sim times=1]]", "m") != fingerprint("hi", "m")  # raw text, directives included
    assert fingerprint("hi", "m") != fingerprint("hi", "other-model")
    assert fingerprint("anything", "m", Faults(key="k1")) == "k1"


def test_text_is_deterministic_and_truncation_is_a_prefix() -> None:
    msgs = user("Hello there")
    full = answer_tokens(msgs, seed=7, n=30)
    assert full == answer_tokens(user("Hello  [[sim gap=1]] there"), seed=7, n=30)
    assert full != answer_tokens(msgs, seed=8, n=30)
    assert full != answer_tokens(msgs, seed=7, salt=2, n=30)
    assert len(full) == 30 and not full[0].startswith(" ") and all(t.startswith(" ") for t in full[1:])
    assert full[0][0].isupper() and full[-1][-1] in ".!?"
    assert answer_tokens(msgs, seed=7, n=10)[:9] == full[:9]


def test_continuation_tokens_overlap_one_word() -> None:
    full = answer_tokens(user("q"), n=12)
    partial = "".join(full[:5])
    rest = continuation_tokens(full, partial)
    assert rest == full[4:]
    assert continuation_tokens(full, partial + " ") == full[4:]  # trailing space: same last word
    assert continuation_tokens(full, "Something else") is None
    assert continuation_tokens(full, "") is None


# ---------------------------------------------------------------------------------------------
# The happy path through the SDK
# ---------------------------------------------------------------------------------------------


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in oai.models.list()]
    assert {"gpt-4o-mini", "sim-fast", "o1-sim"} <= set(models)


async def test_stream_matches_non_stream(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, *user("Describe the sea.")]
    plain = await oai.chat.completions.create(model=MODEL, messages=msgs, seed=42)
    stream = await oai.chat.completions.create(
        model="any-model-name", messages=msgs, seed=42, stream=True, stream_options={"include_usage": True}
    )
    pieces, chunks = await collect(stream)

    assert plain.object == "chat.completion" and plain.choices[0].finish_reason == "stop"
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) == 20  # default chunks=20, one word each, leading space as real tokens
    assert not pieces[0].startswith(" ") and all(p.startswith(" ") and " " not in p[1:] for p in pieces[1:])
    first, final, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.object == "chat.completion.chunk" and first.model == "any-model-name"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.system_fingerprint and first.id.startswith("chatcmpl-")
    assert len({c.id for c in chunks}) == 1
    assert final.choices[0].finish_reason == "stop" and final.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 20
    assert plain.usage.completion_tokens == 20

    other_seed = await oai.chat.completions.create(model=MODEL, messages=msgs, seed=43)
    assert other_seed.choices[0].message.content != plain.choices[0].message.content
    stats = sim.stats()
    assert stats["total_requests"] == 3 and stats["active_requests"] == 0
    assert [r["outcome"] for r in stats["requests"]] == ["complete"] * 3


async def test_max_tokens_and_chunks(oai: openai.AsyncOpenAI) -> None:
    full = await oai.chat.completions.create(model=MODEL, messages=user("Count [[sim chunks=12]]"))
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("Count [[sim chunks=12]]"), max_tokens=5, stream=True
    )
    pieces, chunks = await collect(stream)
    assert len(full.choices[0].message.content.split()) == 12
    assert len(pieces) == 5 and full.choices[0].message.content.startswith("".join(pieces))
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_raw_wire_format(sim: SimulatorProcess) -> None:
    body = {"model": MODEL, "messages": user("Hi [[sim chunks=3]]"), "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sim.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer k"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    datas = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert len(datas) == 1 + 3 + 1  # role chunk, 3 words, finish chunk
    assert set(datas[1]) >= {"id", "object", "created", "model", "system_fingerprint", "choices"}
    assert set(datas[1]["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}


# ---------------------------------------------------------------------------------------------
# Faults, as the SDK sees them
# ---------------------------------------------------------------------------------------------


async def test_headers_delay_is_a_timeout_before_the_stream(sim: SimulatorProcess) -> None:
    client = make_client(sim, read=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model=MODEL, messages=user("q [[sim headers_delay=5]]"), stream=True
            )
    finally:
        await client.close()
    assert time.monotonic() - started < 2
    stats = await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1)
    assert last_request(stats)["outcome"] == "client_disconnected"
    assert last_request(stats)["headers_sent"] is None


async def test_stall_first_times_out_after_headers(sim: SimulatorProcess) -> None:
    client = make_client(sim, read=0.3)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user("q [[sim stall_first=5]]"), stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APITimeoutError):
            await collect(stream, pieces)
        assert pieces == []
    finally:
        await client.close()
    stats = await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1)
    assert last_request(stats)["first_chunk"] is None and last_request(stats)["headers_sent"] is not None


async def test_stall_after_is_a_read_timeout_mid_stream(sim: SimulatorProcess) -> None:
    client = make_client(sim, read=0.3)
    pieces: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user("q [[sim stall_after=4 stall=5]]"), stream=True
        )
        with pytest.raises(openai.APITimeoutError) as info:
            await collect(stream, pieces)
    finally:
        await client.close()
    assert isinstance(info.value.__cause__, httpx2.ReadTimeout)
    assert len(pieces) == 4


async def test_stall_then_continue(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim stall_after=2 stall=0.3 chunks=5]]"), stream=True
    )
    started = time.monotonic()
    pieces, _ = await collect(stream)
    assert len(pieces) == 5 and time.monotonic() - started >= 0.3
    assert last_request(sim.stats())["outcome"] == "complete"


async def test_reset_after_is_a_connection_error(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim reset_after=3]]"), stream=True
    )
    pieces: list[str] = []
    with pytest.raises(openai.APIConnectionError) as info:
        await collect(stream, pieces)
    # An RST mid-body: httpx2 raises ReadError ("Connection reset by peer"), the SDK wraps it.
    assert type(info.value) is openai.APIConnectionError
    assert isinstance(info.value.__cause__, httpx2.ReadError)
    assert len(pieces) == 3
    stats = await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1)
    assert last_request(stats)["outcome"] == "reset" and last_request(stats)["chunks"] == 3


async def test_close_after_is_a_protocol_error(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim close_after=2]]"), stream=True
    )
    pieces: list[str] = []
    with pytest.raises(openai.APIConnectionError) as info:
        await collect(stream, pieces)
    # A FIN without the chunked terminator: "incomplete chunked read".
    assert isinstance(info.value.__cause__, httpx2.RemoteProtocolError)
    assert len(pieces) == 2


async def test_malformed_chunk_is_a_json_error(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim malformed_after=2]]"), stream=True
    )
    pieces: list[str] = []
    with pytest.raises(json.JSONDecodeError):  # the SDK lets the decoder's error through unwrapped
        await collect(stream, pieces)
    assert len(pieces) == 2


async def test_error_event_mid_stream(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim error_after=2]]"), stream=True
    )
    pieces: list[str] = []
    with pytest.raises(openai.APIError) as info:
        await collect(stream, pieces)
    assert not isinstance(info.value, openai.APIStatusError)
    assert info.value.body["type"] == "server_error"
    assert len(pieces) == 2
    assert last_request(sim.stats())["outcome"] == "error_event"


async def test_rate_limit_with_retry_after(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(
            model=MODEL,
            messages=user("q [[sim status=429 retry_after=1.5 retry_after_ms=1500]]"),
            stream=True,
        )
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "2"  # whole seconds, rounded up
    assert err.response.headers["retry-after-ms"] == "1500"
    assert err.code == "rate_limit_exceeded"
    assert last_request(sim.stats())["outcome"] == "status"


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (404, openai.NotFoundError),
    ],
)
async def test_status_faults(oai: openai.AsyncOpenAI, status: int, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        await oai.chat.completions.create(
            model=MODEL, messages=user(f"q [[sim status={status}]]"), stream=True
        )
    assert info.value.status_code == status
    assert set(info.value.body) == {"message", "type", "param", "code"}


async def test_missing_key_is_401(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        await oai.chat.completions.create(
            model=MODEL, messages=user("q"), extra_headers={"Authorization": openai.Omit()}
        )


async def test_bad_directive_is_400(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stall_aftr"):
        await oai.chat.completions.create(model=MODEL, messages=user("q [[sim stall_aftr=3]]"))


async def test_header_directives_win(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(
            model=MODEL, messages=user("q [[sim status=500]]"), extra_headers={"X-Sim": "status=429"}
        )
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(
            model=MODEL, messages=user("q"), extra_headers={"X-Sim": "status=503"}
        )


async def test_times_makes_only_the_first_attempts_fail(
    oai: openai.AsyncOpenAI, sim: SimulatorProcess
) -> None:
    msgs = user("Tell a story [[sim status=503 times=2]]")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(model=MODEL, messages=msgs, stream=True)
    stream = await oai.chat.completions.create(model=MODEL, messages=msgs, stream=True)
    pieces, _ = await collect(stream)
    clean = await oai.chat.completions.create(model=MODEL, messages=user("Tell a story"))
    assert "".join(pieces) == clean.choices[0].message.content  # same text as without directives
    log = sim.stats()["requests"]
    assert [(r["attempt"], r["faults_applied"], r["outcome"]) for r in log[:3]] == [
        (1, True, "status"),
        (2, True, "status"),
        (3, False, "complete"),
    ]


async def test_only_limits_the_faults_to_one_model(oai: openai.AsyncOpenAI, sim: SimulatorProcess) -> None:
    msgs = user("Tell a story [[sim status=503 only=gpt-4o-m*]]")
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(model=MODEL, messages=msgs, stream=True)
    pieces, _ = await collect(await oai.chat.completions.create(model="gpt-4o", messages=msgs, stream=True))
    clean = await oai.chat.completions.create(model="gpt-4o", messages=user("Tell a story"))
    assert "".join(pieces) == clean.choices[0].message.content
    log = sim.stats()["requests"]
    assert [(r["model"], r["faults_applied"], r["outcome"]) for r in log[:2]] == [
        (MODEL, True, "status"), ("gpt-4o", False, "complete")]


async def test_times_with_mid_stream_reset_then_identical_retry(oai: openai.AsyncOpenAI) -> None:
    msgs = user("Explain tides [[sim reset_after=5 times=1]]")
    first: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        await collect(await oai.chat.completions.create(model=MODEL, messages=msgs, stream=True), first)
    second, _ = await collect(await oai.chat.completions.create(model=MODEL, messages=msgs, stream=True))
    assert len(first) == 5 and second[:5] == first and len(second) == 20


async def test_diverge_changes_text_per_attempt(oai: openai.AsyncOpenAI) -> None:
    async def text(msg: str) -> str:
        return (await oai.chat.completions.create(model=MODEL, messages=user(msg))).choices[0].message.content

    a1, a2 = await text("q [[sim diverge]]"), await text("q [[sim diverge]]")
    b1, b2 = await text("q [[sim key=same]]"), await text("q [[sim key=same]]")
    assert a1 != a2
    assert b1 == b2


async def test_continuation_returns_remainder_with_one_overlapping_word(
    oai: openai.AsyncOpenAI, sim: SimulatorProcess
) -> None:
    msgs = user("Write about lanterns")
    full = (await oai.chat.completions.create(model=MODEL, messages=msgs, seed=5)).choices[0].message.content
    words = full.split(" ")
    partial = " ".join(words[:8])
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=[*msgs, {"role": "assistant", "content": partial, "prefix": True}],  # type: ignore[list-item]
        seed=5,
        stream=True,
    )
    pieces, _ = await collect(stream)
    assert pieces[0].strip() == words[7]  # the partial's last word, repeated
    assert len(pieces) == 20 - 7
    assert partial + "".join(pieces[1:]) == full
    assert last_request(sim.stats())["continuation"] is True

    # Not a prefix of the answer: the whole answer comes back.
    other = await oai.chat.completions.create(
        model=MODEL, messages=[*msgs, {"role": "assistant", "content": "Unrelated start"}], seed=5
    )
    assert other.choices[0].message.content == full


async def test_keepalive_comments_during_stall(sim: SimulatorProcess) -> None:
    body = {
        "model": MODEL,
        "messages": user("q [[sim chunks=3 stall_after=1 stall=0.5 keepalive=0.1]]"),
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sim.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer k"}
        ) as resp:
            raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    comments = [i for i, e in enumerate(events) if e == ": keepalive"]
    assert 3 <= len(comments) <= 5
    # All comments sit between content chunk 1 and content chunk 2 (the stall).
    assert comments == list(range(comments[0], comments[-1] + 1)) and comments[0] == 2
    assert events[-2] == "data: [DONE]"
    assert last_request(sim.stats())["keepalives"] == len(comments)


# ---------------------------------------------------------------------------------------------
# Accounting: the simulator must see every disconnect, at once
# ---------------------------------------------------------------------------------------------


async def test_client_abort_mid_stall_is_seen_at_once(sim: SimulatorProcess) -> None:
    client = make_client(sim)
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("q [[sim stall_after=2 stall=30]]"), stream=True
    )
    pieces: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == 2:
                break
    stats = await sim.await_until(
        lambda s: s["active_requests"] == 1 and s["open_connections"] == 1, timeout=1
    )
    await stream.close()  # the SDK keeps the connection until the stream is closed
    closed_at = time.monotonic()
    stats = await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1)
    assert time.monotonic() - closed_at < 1
    assert last_request(stats)["outcome"] == "client_disconnected"
    assert last_request(stats)["closed"] is not None
    await client.close()
    await sim.await_until(lambda s: s["open_connections"] == 0, timeout=1)


async def test_idle_keepalive_connection_is_counted_until_pool_closes(sim: SimulatorProcess) -> None:
    client = make_client(sim)
    await client.chat.completions.create(model=MODEL, messages=user("q"))
    await collect(await client.chat.completions.create(model=MODEL, messages=user("q"), stream=True))
    stats = sim.stats()
    # Both requests reused one pooled connection, which stays open while idle.
    assert stats["open_connections"] == 1 and stats["active_requests"] == 0
    await client.close()
    stats = await sim.await_until(lambda s: s["open_connections"] == 0, timeout=1)
    assert stats["total_requests"] == 2


async def test_concurrent_streams_are_counted(sim: SimulatorProcess) -> None:
    client = make_client(sim)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(f"q{i} [[sim chunks=4 stall_after=1 stall=0.4]]"), stream=True
        )
        pieces, _ = await collect(stream)
        return len(pieces)

    tasks = [asyncio.create_task(one(i)) for i in range(5)]
    stats = await sim.await_until(lambda s: s["active_requests"] == 5, timeout=2)
    assert stats["open_connections"] == 5
    assert await asyncio.gather(*tasks) == [4] * 5
    await client.close()
    stats = await sim.await_until(
        lambda s: s["open_connections"] == 0 and s["active_requests"] == 0, timeout=1
    )
    assert all(r["outcome"] == "complete" for r in stats["requests"])


def test_reset_clears_log_and_attempts(simulator: SimulatorProcess) -> None:
    simulator.reset()
    stats = simulator.stats()
    assert stats["total_requests"] == 0 and stats["requests"] == [] and stats["attempts"] == {}
    assert isinstance(stats["now"], float)
    with pytest.raises(AssertionError, match="last stats"):
        simulator.wait_until(lambda s: s["total_requests"] > 0, timeout=0.05)
