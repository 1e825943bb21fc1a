"""CPU per chunk of each way to consume an upstream stream, alone in a process.

    python -m bench.adapters '<config JSON>'     (prints one JSON result line)

The process opens ``users`` paced streams at once against :mod:`bench.pacer` (closed loop, random
start offsets, as the relay benchmark) and only consumes them; its own CPU time (all threads) over
the window divided by the text chunks it got in the window is the cost of that path. Paths:

* ``current-httpx`` / ``current-aiohttp``: chatproxy's adapter for the current SDK
  (``CurrentUpstream``: the SDK sends the request, the body is parsed raw with orjson) over the
  SDK's default httpx2 transport / ``DefaultAioHttpClient``;
* ``legacy``: chatproxy's adapter for openai 0.27 (``ChatCompletion.acreate``); run it with the
  legacy virtualenv's python;
* ``none``: chatproxy's adapter without an SDK (``UPSTREAM.SDK = "none"``: the request and the
  body over aiohttp, the body parsed as the current SDK's adapter does);
* ``sdk-httpx`` / ``sdk-aiohttp``: for reference, the current SDK's own parsed stream
  (``chat.completions.create(stream=True)``, chunk objects), which chatproxy's adapter avoids;
* ``raw-aiohttp``: for reference, aiohttp lines + orjson (the floor relay's read path), what a
  raw-parsing adapter could cost.

Requests carry no socket-read timeout, as ``ChatStream`` sends them (its watchdog is the deadline).

``core: true`` consumes through :class:`chatproxy.core.ChatStream` (the pump, the watchdog timer,
the event log and one subscription) on top of the adapter: the difference is the core's cost.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

MODEL = "gpt-4o-mini"


def _messages(index: int, number: int, n: int, gap: float) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"adapter {index} stream {number} [[pace chunks={n} gap={gap}]]"}]


Texts = Callable[[list[dict[str, str]]], AsyncIterator[str]]

# path -> (UPSTREAM.SDK, UPSTREAM.HTTP_CLIENT) of chatproxy's adapters.
CHATPROXY_PATHS = {"current-httpx": ("current", "httpx"), "current-aiohttp": ("current", "aiohttp"),
                   "legacy": ("legacy", "aiohttp"), "none": ("none", "aiohttp")}


def chatproxy_upstream(name: str, base_url: str) -> Any:
    from chatproxy.upstream import build_upstream

    sdk, client = CHATPROXY_PATHS[name]
    return build_upstream(sdk=sdk, http_client=client, base_url=base_url, api_key="sk-bench")


def make_path(name: str, base_url: str) -> tuple[Texts, Callable[[], Any]]:
    """(stream texts for these messages, async close) for path ``name``."""
    if name in CHATPROXY_PATHS:
        from chatproxy.upstream.base import UpstreamRequest

        upstream = chatproxy_upstream(name, base_url)

        async def texts(messages: list[dict[str, str]]) -> AsyncIterator[str]:
            request = UpstreamRequest(model=MODEL, messages=messages, connect_timeout=5.0, read_timeout=None,
                                      total_timeout=300.0)
            stream = await upstream.open(request)
            try:
                async for text in stream:
                    yield text
            finally:
                await stream.aclose()

        return texts, upstream.aclose

    if name in ("sdk-httpx", "sdk-aiohttp"):
        import openai

        kwargs: dict[str, Any] = {}
        if name == "sdk-aiohttp":
            kwargs["http_client"] = openai.DefaultAioHttpClient()
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0, **kwargs)

        async def texts(messages: list[dict[str, str]]) -> AsyncIterator[str]:
            stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                          stream_options={"include_usage": True})
            async with stream:
                async for chunk in stream:
                    if chunk.choices:
                        text = chunk.choices[0].delta.content
                        if text:
                            yield text

        return texts, client.close

    if name == "raw-aiohttp":
        import aiohttp
        import orjson

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = base_url + "/chat/completions"

        async def texts(messages: list[dict[str, str]]) -> AsyncIterator[str]:
            body = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(url, data=orjson.dumps(body), headers={
                "Authorization": "Bearer sk-bench", "Content-Type": "application/json"}) as response:
                async for line in response.content:
                    if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                        choices = orjson.loads(line[6:]).get("choices")
                        if choices:
                            text = choices[0]["delta"].get("content")
                            if text:
                                yield text

        return texts, session.close

    raise SystemExit(f"unknown path {name!r}")


def through_core(base_url: str, name: str) -> tuple[Texts, Callable[[], Any]]:
    """The same path, consumed through ChatStream (adapter + core)."""
    from chatproxy.conf import Policy
    from chatproxy.core import ChatRequest, ChatStream

    upstream = chatproxy_upstream(name, base_url)
    policy = Policy()

    async def core_texts(messages: list[dict[str, str]]) -> AsyncIterator[str]:
        stream = ChatStream(upstream, ChatRequest(model=MODEL, messages=messages), policy).start()
        try:
            async for event in stream:
                if event.name == "delta":
                    yield event.data["text"]
                elif event.name == "error":
                    raise RuntimeError(f"stream error {event.data}")
        finally:
            await stream.aclose()

    return core_texts, upstream.aclose


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    name, base_url = cfg["path"], cfg["pacer"]
    if cfg.get("core"):
        texts, close = through_core(base_url, name)
    else:
        texts, close = make_path(name, base_url)
    w0 = cfg["t0"] + cfg["warmup"]
    w1 = w0 + cfg["measure"]
    counts = {"chunks": 0, "streams": 0, "errors": 0}
    errors: dict[str, int] = {}
    cpu: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    loop.call_at(w0 - time.monotonic() + loop.time(), lambda: cpu.__setitem__("w0", time.process_time()))
    loop.call_at(w1 - time.monotonic() + loop.time(), lambda: cpu.__setitem__("w1", time.process_time()))

    async def user(index: int) -> None:
        rng = random.Random(cfg["seed"] * 7919 + index)
        await asyncio.sleep(max(0.0, cfg["t0"] + rng.uniform(0, cfg["spread"]) - time.monotonic()))
        number = 0
        while True:
            n = rng.randint(1, cfg["chunks"]) if number == 0 else cfg["chunks"]
            try:
                async for _ in texts(_messages(index, number, n, cfg["gap"])):
                    if w0 <= time.monotonic() < w1:
                        counts["chunks"] += 1
                counts["streams"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.1)
            number += 1

    tasks = [asyncio.ensure_future(user(i)) for i in range(cfg["users"])]
    await asyncio.sleep(max(0.0, w1 + 0.05 - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await close()
    seconds = cpu.get("w1", 0.0) - cpu.get("w0", 0.0)
    chunks = counts["chunks"]
    return {
        "path": name,
        "core": bool(cfg.get("core")),
        "chunks": chunks,
        "offered": cfg["users"] * cfg["measure"] / cfg["gap"],
        "cpu_seconds": seconds,
        "us_per_chunk": seconds / chunks * 1e6 if chunks else None,
        "streams": counts["streams"],
        "errors": errors,
        "python": sys.version.split()[0],
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(run(cfg))), flush=True)


if __name__ == "__main__":
    main()
