"""CPU per chunk of the text-only path, in one process, without sockets: a precise before/after.

    python -m bench.chunkpath [--chunks N] [--repeats R] [--tree PATH]

The paced benchmarks (``python -m bench``) measure whole processes under load, where a change of
a few hundred nanoseconds per chunk drowns in the machine's noise. This one feeds ``--chunks``
realistic ``chat.completion.chunk`` lines (one word of content each) from memory through

* ``parse``: :class:`chatproxy.upstream.sse.SSEStream` alone (line splitting, orjson, the
  choice-0 text check every adapter shares), and
* ``core``: the same stream under :class:`chatproxy.core.ChatStream` (the pump, the watchdog, the
  answer and its ``delta`` events, one subscription),

and prints the best of ``--repeats`` runs as process CPU microseconds per chunk. ``--tree`` puts
another checkout's ``chatproxy`` first on the import path, to compare two versions with the same
interpreter: ``python -m bench.chunkpath --tree /path/to/other/checkout``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chunkpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tree", help="a checkout whose chatproxy package is measured instead of this one")
    args = parser.parse_args(argv)
    if args.tree:
        sys.path.insert(0, args.tree)
    for name, run in paths(args.chunks).items():
        best = min(_cpu(run) for _ in range(args.repeats))
        print(f"{name}: {best / args.chunks * 1e6:.2f} us/chunk (best of {args.repeats}, {args.chunks} chunks)")


def paths(chunks: int) -> dict[str, Callable[[], Coroutine[Any, Any, int]]]:
    """The measured paths: name -> a coroutine function returning how many items it consumed."""
    import orjson

    from chatproxy.conf import Policy
    from chatproxy.core import ChatRequest, ChatStream
    from chatproxy.upstream.sse import SSEStream

    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_bench"}
    content = {**head, "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None,
                                    "finish_reason": None}]}
    finish = {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    body = [b"data: " + orjson.dumps(content) + b"\n\n"] * chunks
    body.append(b"data: " + orjson.dumps(finish) + b"\n\ndata: [DONE]\n\n")

    class MemoryStream(SSEStream):
        __slots__ = ()

        def __init__(self) -> None:
            super().__init__((OSError,))

        async def _feed(self) -> AsyncIterator[bytes]:
            for piece in body:
                yield piece

        def _body_chunks(self) -> AsyncIterator[bytes]:
            return self._feed()

        def _body_error(self, exc: BaseException) -> Any:
            raise exc

        async def _close_response(self) -> None:
            pass

    class MemoryUpstream:
        name = "memory"

        async def open(self, request: Any) -> MemoryStream:
            return MemoryStream()

        async def aclose(self) -> None:
            pass

    policy = Policy(connect=1, first_token=30, stall=30, deadline=600, max_attempts=1, backoff_initial=0.1,
                    backoff_max=0.1, retry_after_max=1, keepalive=60, gateway=120)
    request = ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "bench"}])

    async def parse() -> int:
        return sum([1 async for _ in MemoryStream()])

    async def core() -> int:
        stream = ChatStream(MemoryUpstream(), request, policy).start()
        return sum([event.name == "delta" async for event in stream])

    return {"parse": parse, "core": core}


def _cpu(run: Callable[[], Coroutine[Any, Any, int]]) -> float:
    started = time.process_time()
    asyncio.run(run())
    return time.process_time() - started


if __name__ == "__main__":
    main()
