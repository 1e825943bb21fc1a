"""What fallbacks cost per chunk: the stream core alone, in this process, with and without them.

Each case runs ``streams`` concurrent :class:`~chatproxy.core.ChatStream` s from an in-memory
upstream that yields at once (no network, no pacing: the core's own CPU is all there is to
measure), read by one consumer each, once with short and once with long answers; the two points
split the process CPU into a marginal cost per chunk and a fixed cost per stream:

* ``one target``: no fallback configured (the default);
* ``fallbacks configured``: two fallback targets and a circuit breaker (a ``LocMemCache``): the
  circuit is read once per stream, the answer comes from the request's own target;
* ``answered by a fallback``: the request's target refuses at once (503, one attempt), the
  stream moves on and the first fallback answers every chunk.

Cases are interleaved ``repeats`` times and the median is reported, so drift on a shared machine
hits them alike. Run: ``python -m bench --parts fallback`` (or ``python -m bench.fallback``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CASES = ("one target", "fallbacks configured", "answered by a fallback")


class _Body:
    """A stream of ``chunks`` short texts, as fast as the consumer takes them."""

    __slots__ = ("chunks", "finish_reason", "usage")

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.finish_reason: str | None = "stop"
        self.usage: dict[str, Any] | None = None

    async def _gen(self) -> AsyncIterator[str]:
        for _ in range(self.chunks):
            yield " word"
            await asyncio.sleep(0)  # one loop turn per chunk, as a socket read would take

    def __aiter__(self) -> AsyncIterator[str]:
        return self._gen()

    async def aclose(self) -> None:
        return None


class _Upstream:
    def __init__(self, chunks: int, *, down: bool = False) -> None:
        self.name = "bench"
        self.chunks = chunks
        self.down = down

    async def open(self, request: Any) -> _Body:
        if self.down:
            from chatproxy.errors import status_error

            raise status_error(503)
        return _Body(self.chunks)

    async def aclose(self) -> None:
        return None


async def _run_case(case: str, streams: int, chunks: int) -> float:
    from django.core.cache.backends.locmem import LocMemCache

    from chatproxy.circuit import CacheBreaker
    from chatproxy.conf import Policy
    from chatproxy.core import ChatRequest, ChatStream, Target

    policy = Policy(max_attempts=1 if case == "answered by a fallback" else 3)
    request = ChatRequest(model="bench", messages=[{"role": "user", "content": "hi"}])
    breaker = CacheBreaker(LocMemCache("bench-fallback", {}), failures=10**9, cooldown=30.0, probe_lease=60.0)

    def make() -> ChatStream:
        if case == "one target":
            return ChatStream(_Upstream(chunks), request, policy)
        fallbacks = [Target(_Upstream(chunks), ChatRequest(model=f"fb{i}", messages=request.messages), policy,
                            "default", f"fb{i}") for i in range(2)]
        primary = _Upstream(chunks, down=case == "answered by a fallback")
        return ChatStream(primary, request, policy, fallbacks=fallbacks, breaker=breaker)

    async def consume(stream: ChatStream) -> int:
        count = 0
        async for event in stream:
            count += event.name == "delta"
        return count

    gc.collect()
    started = time.process_time()
    counts = await asyncio.gather(*(consume(make().start()) for _ in range(streams)))
    used = time.process_time() - started
    assert all(count == chunks for count in counts), counts
    return used / (streams * chunks) * 1e6


def measure(streams: int = 100, short: int = 20, long: int = 1000, repeats: int = 7) -> dict[str, Any]:
    """Per case: the marginal CPU microseconds per chunk and the fixed cost per stream, from the
    medians of ``repeats`` interleaved runs of ``short`` and of ``long`` streams (two points)."""
    runs: dict[str, dict[int, list[float]]] = {case: {short: [], long: []} for case in CASES}
    asyncio.run(_run_case("one target", 20, 20))  # warm-up: imports, first allocations
    for _ in range(repeats):
        for chunks in (short, long):
            for case in CASES:
                runs[case][chunks].append(asyncio.run(_run_case(case, streams, chunks)))
    cases = {}
    for case in CASES:
        # CPU per stream = fixed + chunks x marginal, at both lengths.
        per_stream = {n: statistics.median(values) * n for n, values in runs[case].items()}
        marginal = (per_stream[long] - per_stream[short]) / (long - short)
        cases[case] = {"us_per_chunk": marginal, "us_per_stream": per_stream[short] - short * marginal,
                       "runs_us_per_chunk": runs[case]}
    return {"streams": streams, "short": short, "long": long, "repeats": repeats, "cases": cases}


def table(result: dict[str, Any]) -> list[str]:
    cases = result["cases"]
    base = cases["one target"]
    lines = [
        f"Stream core alone, in process: {result['streams']} concurrent streams of {result['short']} and of "
        f"{result['long']} chunks, median of {result['repeats']} interleaved runs each; CPU per stream = fixed "
        "+ chunks × marginal.",
        "",
        "| case | marginal CPU µs per chunk | × one target | fixed CPU µs per stream | added per stream |",
        "|---|--:|--:|--:|--:|",
    ]
    for case in CASES:
        c = cases[case]
        lines.append(f"| {case} | **{c['us_per_chunk']:.2f}** | {c['us_per_chunk'] / base['us_per_chunk']:.2f} | "
                     f"{c['us_per_stream']:.0f} | {c['us_per_stream'] - base['us_per_stream']:+.0f} |")
    return lines


def run_child(python: str = sys.executable, **options: int) -> dict[str, Any]:
    """:func:`measure` in a child process (Django configured there, not in the harness); its result."""
    args = [python, "-m", "bench.fallback", "--json", *(f"--{k}={v}" for k, v in options.items())]
    done = subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    for name, default in (("streams", 100), ("short", 20), ("long", 1000), ("repeats", 7)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    import django
    from django.conf import settings

    settings.configure()
    django.setup()
    result = measure(streams=args.streams, short=args.short, long=args.long, repeats=args.repeats)
    print(json.dumps(result) if args.json else "\n".join(table(result)))


if __name__ == "__main__":
    main()
