"""The paced upstream for the relay benchmark: an OpenAI-compatible streaming server, own process.

Why not the simulator? Added latency is measured per chunk, so every chunk must say when it left
the upstream. The simulator paces with ``sleep(gap)`` after each write (its schedule drifts under
load, so send times cannot be computed) and its text is plain words. The pacer:

* sends chunk ``k`` of a stream at ``t0 + first_delay + k * gap`` on an absolute schedule (a model
  that emits 20 tokens/s does not slow down because a proxy is busy), and
* writes the same chunk JSON as the simulator (``chat.completion.chunk`` with ``id``, ``object``,
  ``created``, ``model``, ``service_tier``, ``system_fingerprint``, ``choices[0]`` with ``index``,
  ``delta``, ``logprobs``, ``finish_reason``, and ``usage: null``; a role chunk first, a
  ``finish_reason`` chunk, a usage chunk, ``data: [DONE]``), except that each content token
  carries its send time: ``" harbour~81234.567890"``: the word, ``~``, then ``time.monotonic()``
  taken just before the write. CLOCK_MONOTONIC is one clock for every process of the machine, so
  the client computes ``arrival - send`` without any clock sync. (Chunks are ~270 bytes instead of
  ~259.)

The stream's shape comes from a ``[[pace chunks=200 gap=0.05 first_delay=0]]`` block in the last
user message (chatproxy forwards the prompt unchanged). ``GET /stats`` reports the streams open
now and the chunks sent. Run: ``python -m bench.pacer --port 0`` (prints ``pacer listening on
http://127.0.0.1:PORT/v1``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from chatproxy.simulator.text import answer_tokens

READY = "pacer listening on "
_PACE_RE = re.compile(r"\[\[pace([^\]]*)\]\]")
_DEFAULTS = {"chunks": 200, "gap": 0.05, "first_delay": 0.0}


class Stats:
    def __init__(self) -> None:
        self.active = 0
        self.streams = 0
        self.chunks = 0


STATS = web.AppKey("stats", Stats)


def _shape(messages: list[dict[str, Any]]) -> dict[str, float]:
    shape = dict(_DEFAULTS)
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    text = last.get("content") if last else ""
    for block in _PACE_RE.findall(text if isinstance(text, str) else ""):
        for item in block.split():
            key, _, value = item.partition("=")
            if key in shape:
                shape[key] = float(value)
    return shape


async def completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    body = orjson.loads(await request.read())
    messages = body.get("messages") or []
    shape = _shape(messages)
    n, gap, first_delay = int(shape["chunks"]), shape["gap"], shape["first_delay"]
    words = answer_tokens(messages, None, 0, n)
    model = body.get("model", "gpt-4o-mini")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunk_id = f"chatcmpl-sim{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    head = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_sim0001",
    }
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **tail,
        }
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                 "x-request-id": f"req_{chunk_id[-12:]}"},
    )
    stats.active += 1
    stats.streams += 1
    try:
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + first_delay
        await resp.write(chunk({"role": "assistant", "content": "", "refusal": None}))
        monotonic = time.monotonic
        for k, word in enumerate(words, 1):
            delay = t0 + k * gap - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await resp.write(chunk({"content": f"{word}~{monotonic():.6f}"}))
            stats.chunks += 1
        await resp.write(chunk({}, "stop"))
        if include_usage:
            usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
            await resp.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionError):
        pass  # the client went away (handler_cancellation)
    finally:
        stats.active -= 1
    return resp


async def stats_handler(request: web.Request) -> web.Response:
    s = request.app[STATS]
    return web.json_response({"active": s.active, "streams": s.streams, "chunks": s.chunks})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})


def make_app() -> web.Application:
    app = web.Application()
    app[STATS] = Stats()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats_handler)
    return app


async def serve(host: str, port: int) -> None:
    app = make_app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"{READY}http://{host}:{bound}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
