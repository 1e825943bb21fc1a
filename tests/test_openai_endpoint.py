"""The OpenAI-compatible endpoint, driven by the official (current) openai client, unmodified."""

from __future__ import annotations

import itertools

import pytest

openai = pytest.importorskip("openai")
if not hasattr(openai, "AsyncOpenAI"):  # the legacy virtualenv has openai 0.27.x
    pytest.skip("needs the current openai client", allow_module_level=True)

_unique = itertools.count()


@pytest.fixture(scope="module")
def api_key(daphne):
    daphne.manage("createsuperuser", "--noinput", "--username", "alice", "--email", "alice@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "alice-pass-123"})
    return daphne.manage("chatproxy_key", "create", "alice", "--name", "tests").strip()


@pytest.fixture
async def oai(daphne, api_key):
    client = openai.AsyncOpenAI(base_url=f"{daphne.url}/chat/v1", api_key=api_key, max_retries=0, timeout=15)
    yield client
    await client.close()


def ask(directive: str = "", chunks: int = 12) -> tuple[list[dict], list[dict]]:
    """(messages with the fault, the same messages without it) for a unique question."""
    base = f"Describe a harbour #{next(_unique)}"
    clean = f"{base} [[sim chunks={chunks}]]"
    faulty = f"{base} [[sim chunks={chunks} {directive}]]" if directive else clean
    return [{"role": "user", "content": faulty}], [{"role": "user", "content": clean}]


async def streamed_text(oai, messages) -> tuple[str, list]:
    chunks = [c async for c in await oai.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_streaming_matches_non_streaming(oai, sim):
    messages, _ = ask()
    text, chunks = await streamed_text(oai, messages)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == text and text.strip()


async def test_mid_stream_stall_is_invisible_to_the_client(oai, sim):
    faulty, clean = ask("stall_after=4 stall=30 times=1")
    text, _ = await streamed_text(oai, faulty)
    assert text == (await streamed_text(oai, clean))[0]
    requests = sim.stats()["requests"]
    attempts = [r["attempt"] for r in requests if r["fingerprint"] == requests[0]["fingerprint"]]
    assert attempts == [1, 2]


async def test_include_usage(oai, sim):
    messages, _ = ask()
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_slow_non_streaming_answer_is_kept_warm(oai, daphne, api_key, sim):
    """An answer longer than the commit point (just under GATEWAY): a 200 committed before GATEWAY,
    whitespace every KEEPALIVE, then the chat.completion, which the official client parses."""
    import time

    import aiohttp
    import orjson

    from tests.fixtures_servers import LIVE_TIMEOUTS

    gateway, keepalive = LIVE_TIMEOUTS["GATEWAY"], LIVE_TIMEOUTS["KEEPALIVE"]
    faulty, clean = ask("gap=0.2", chunks=12)  # about 2.4 s: past the commit point and GATEWAY
    body = {"model": "gpt-4o-mini", "messages": faulty}
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{daphne.url}/chat/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {api_key}"}) as reply:
            committed = time.monotonic() - started
            assert reply.status == 200
            pieces, last, longest = [], time.monotonic(), committed
            async for piece in reply.content.iter_any():
                now = time.monotonic()
                longest, last = max(longest, now - last), now
                pieces.append(piece)
    raw = b"".join(pieces)
    assert committed > keepalive * 3  # not at the first keepalive any more
    assert committed < gateway and longest < gateway  # the gateway never saw GATEWAY seconds of silence
    assert raw.startswith(b" ") and raw.strip().startswith(b"{")
    completion = orjson.loads(raw)
    assert completion["object"] == "chat.completion"
    expected = await oai.chat.completions.create(model="gpt-4o-mini", messages=clean)
    assert completion["choices"][0]["message"]["content"] == expected.choices[0].message.content
    official = await oai.chat.completions.create(model="gpt-4o-mini", messages=ask("gap=0.2", chunks=12)[0])
    assert official.object == "chat.completion" and official.choices[0].message.content


async def test_non_streaming_failure_after_keepalive_keeps_its_status(oai, sim):
    """Three attempts each answered 503 after a delay: the failure comes after several KEEPALIVE
    periods but before the commit point, so it is a real 503 in OpenAI's error shape."""
    messages, _ = ask("status=503 headers_delay=0.25")
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "upstream_unavailable" and caught.value.body["type"] == "api_error"
    attempts = [r for r in sim.stats()["requests"] if r.get("status") == 503]
    assert len(attempts) == 3


async def test_final_failure_is_an_in_band_error(oai, sim):
    messages, _ = ask("stall_after=3 stall=30")  # every attempt stalls
    with pytest.raises(openai.APIError) as caught:
        await streamed_text(oai, messages)
    assert "took too long" in caught.value.message
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


async def test_diverging_restart_is_an_in_band_error(oai, sim):
    messages, _ = ask("stall_after=4 stall=30 times=1 diverge")
    with pytest.raises(openai.APIError):
        await streamed_text(oai, messages)


async def test_non_streaming_failure_has_openai_error_shape(oai, sim):
    messages, _ = ask("status=503")
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "upstream_unavailable"


async def test_errors_before_streaming(oai, daphne, sim):
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
    assert "messages" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=ask()[0], n=0)
    bad = openai.AsyncOpenAI(base_url=f"{daphne.url}/chat/v1", api_key="cpk_000000000000_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="gpt-4o-mini", messages=ask()[0])
    await bad.close()
    assert sim.stats()["total_requests"] == 0


async def test_models(oai):
    page = await oai.models.list()
    assert [m.id for m in page.data] == ["gpt-4o-mini"]
