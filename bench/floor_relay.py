"""The floor: the least a relay can do per chunk, for comparison with chatproxy in the same run.

A bare aiohttp server. ``POST /relay`` with chatproxy's request JSON: open the upstream stream with
one shared aiohttp session, read it line by line, ``orjson``-parse each ``data:`` line, take
``choices[0].delta.content`` and write ``data: {"text": ...}`` SSE to the client. No retries, no
watchdog, no framework, no journal: read-parse-write only.

    python -m bench.floor_relay --fd N --upstream http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import aiohttp
import orjson
from aiohttp import web

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def relay(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    upstream_body = {
        "model": body.get("model") or "gpt-4o-mini",
        "messages": body["messages"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    session: aiohttp.ClientSession = request.app["session"]
    async with session.post(
        request.app["url"], data=orjson.dumps(upstream_body),
        headers={"Authorization": "Bearer sk-floor", "Content-Type": "application/json"},
    ) as upstream:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        loads, dumps = orjson.loads, orjson.dumps
        try:
            async for line in upstream.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                choices = loads(line[6:]).get("choices")
                if choices:
                    text = choices[0]["delta"].get("content")
                    if text:
                        await response.write(b"data: " + dumps({"text": text}) + b"\n\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        return response


async def serve(fd: int, upstream: str) -> None:
    app = web.Application()
    app["url"] = upstream.rstrip("/") + "/chat/completions"
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout())
    app.router.add_post("/relay", relay)
    app.router.add_get("/", lambda request: web.Response(text="floor relay"))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.SockSite(runner, socket.socket(fileno=fd)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app["session"].close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fd", type=int, required=True, help="a listening socket inherited from the parent")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.fd, args.upstream))
    else:
        asyncio.run(serve(args.fd, args.upstream))


if __name__ == "__main__":
    main()
