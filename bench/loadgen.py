"""The client load generator, in its own process: N paced streams at once, timed per chunk.

    python -m bench.loadgen '<config JSON>'      (prints one JSON result line)

Config keys: ``url`` and ``headers`` (the stream endpoint under test), ``kind`` (``sse``:
chatproxy's ``POST /chat/stream/``; ``floor``; ``direct``: the pacer itself), ``pacer`` (its base
URL, for the direct probe streams), ``users`` (concurrent streams), ``probes`` (extra streams read
straight from the pacer at the same time, the latency baseline), ``chunks``, ``gap``,
``first_delay``, ``t0`` (a ``time.monotonic()`` value: the run's start; one clock for all
processes), ``spread`` (start offsets are uniform in ``[0, spread)``), ``warmup`` and ``measure``
(the window ``[t0 + warmup, t0 + warmup + measure)``), ``stationary`` (each user's first stream has
a random length in ``1..chunks``, so stream ends and new starts are spread evenly from the outset
instead of arriving in waves), ``seed``.

Each user runs streams back to back for the whole run (closed loop: concurrency stays at
``users``; per-stream setup is part of the load at its real rate, one setup per ``chunks``
chunks). Reading is raw aiohttp (``iter_any``); each read is timestamped once and every
``~<send time>`` mark in it gives one latency sample (see :mod:`bench.pacer`). Only chunks that
arrive inside the window are counted and timed.

Quality of the load itself is reported too: this process's CPU time in the window and its event
loop lag (a 10 ms ticker), so a saturated load generator shows up instead of passing for a slow
server.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from array import array
from collections import Counter
from typing import Any

import aiohttp
import orjson

MARK = re.compile(rb"~(\d+\.\d+)")
END_MARKERS = {"sse": b"event: done", "direct": b"data: [DONE]", "floor": None}


class Recorder:
    def __init__(self, w0: float, w1: float) -> None:
        self.w0, self.w1 = w0, w1
        self.latency = {"through": array("d"), "direct": array("d")}
        self.chunks = Counter()  # chunks inside the window, by path
        self.streams = Counter()  # streams started / complete / incomplete, by path
        self.errors: Counter[str] = Counter()


async def one_stream(session: aiohttp.ClientSession, rec: Recorder, path: str, url: str, payload: bytes,
                     headers: dict[str, str], expected: int, end_marker: bytes | None) -> None:
    """One stream to its end. ``end_marker``: what a complete body contains (None: EOF is the end)."""
    rec.streams[f"{path} started"] += 1
    monotonic = time.monotonic
    w0, w1 = rec.w0, rec.w1
    samples = rec.latency[path]
    received = 0
    ended_ok = False
    async with session.post(url, data=payload, headers=headers) as response:
        if response.status != 200:
            rec.errors[f"{path}: HTTP {response.status}"] += 1
            await response.read()
            await asyncio.sleep(0.1)
            return
        pending = b""
        async for data in response.content.iter_any():
            now = monotonic()
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            block, pending = pending[:cut], pending[cut + 2:]
            marks = MARK.findall(block)
            if marks:
                received += len(marks)
                if w0 <= now < w1:
                    rec.chunks[path] += len(marks)
                    for mark in marks:
                        samples.append(now - float(mark))
            if b"event: error" in block:
                rec.errors[f"{path}: error event"] += 1
            if end_marker is not None and end_marker in block:
                ended_ok = True
    if end_marker is None:
        ended_ok = True  # the floor ends its body without an end event
    rec.streams[f"{path} complete" if ended_ok and received >= expected else f"{path} incomplete"] += 1


async def user(index: int, session: aiohttp.ClientSession, rec: Recorder, cfg: dict[str, Any], *, probe: bool) -> None:
    rng = random.Random(cfg["seed"] * 100_003 + index + (50_000 if probe else 0))
    start = cfg["t0"] + rng.uniform(0, cfg["spread"])
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    chunks, gap = cfg["chunks"], cfg["gap"]
    kind = "direct" if probe else cfg["kind"]
    path = "direct" if probe else "through"
    url = cfg["pacer"] + "/chat/completions" if probe or kind == "direct" else cfg["url"]
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"} if kind == "direct" \
        else cfg["headers"]
    number = 0
    while True:
        n = rng.randint(1, chunks) if number == 0 and cfg["stationary"] else chunks
        directive = f"[[pace chunks={n} gap={gap} first_delay={cfg['first_delay']}]]"
        prompt = f"{'probe' if probe else 'user'} {index} stream {number} {directive}"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        if kind == "direct":
            body.update(model="gpt-4o-mini", stream=True, stream_options={"include_usage": True})
        try:
            await one_stream(session, rec, path, url, orjson.dumps(body), headers, n, END_MARKERS[kind])
        except (aiohttp.ClientError, OSError) as exc:
            rec.errors[f"{path}: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)
        number += 1


async def ticker(lags: array, w0: float, w1: float) -> None:
    loop = asyncio.get_running_loop()
    interval = 0.01
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        now = loop.time()
        if w0 <= now < w1:
            lags.append(now - before - interval)


def percentile(values: list[float] | array, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: array) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        **{f"p{int(q * 1000) / 10:g}": percentile(ordered, q) for q in (0.5, 0.9, 0.99, 0.999)},
        "max": ordered[-1] if ordered else None,
        "mean": sum(ordered) / len(ordered) if ordered else None,
    }


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    w0 = cfg["t0"] + cfg["warmup"]
    w1 = w0 + cfg["measure"]
    rec = Recorder(w0, w1)
    if cfg["t0"] < time.monotonic():
        rec.errors["load generator started late"] += 1
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    lags: array = array("d")
    cpu: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    loop.call_at(w0 - time.monotonic() + loop.time(), lambda: cpu.__setitem__("w0", time.process_time()))
    loop.call_at(w1 - time.monotonic() + loop.time(), lambda: cpu.__setitem__("w1", time.process_time()))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        tasks = [asyncio.ensure_future(user(i, session, rec, cfg, probe=False)) for i in range(cfg["users"])]
        tasks += [asyncio.ensure_future(user(i, session, rec, cfg, probe=True)) for i in range(cfg["probes"])]
        tasks.append(asyncio.ensure_future(ticker(lags, w0, w1)))
        await asyncio.sleep(max(0.0, w1 + 0.05 - time.monotonic()))
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                rec.errors[f"task: {type(result).__name__}"] += 1
    return {
        "window": [w0, w1],
        "chunks": dict(rec.chunks),
        "streams": dict(rec.streams),
        "errors": dict(rec.errors),
        "latency": {path: summary(values) for path, values in rec.latency.items()},
        "client_cpu": cpu.get("w1", 0.0) - cpu.get("w0", 0.0),
        "client_loop_lag": summary(lags),
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(run(cfg))), flush=True)


if __name__ == "__main__":
    main()
