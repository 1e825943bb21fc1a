"""Part 5, what an idle stream holds: tracemalloc on a chatproxy server with N idle streams.

The server runs with ``BENCH_DIAG=1 BENCH_TRACEMALLOC=1`` (see :mod:`bench.asgi`); the heap is
snapshotted before and after ``users`` streams are opened whose upstream sent headers and then
nothing. The growth is attributed to a component by the innermost frame of the allocation's
traceback that belongs to a known library (the layers of bench/profile.py: stdlib frames such as
asyncio are charged to the library that called them), and listed by allocation site (with the
chatproxy frame that led there). RSS growth minus Python heap growth is native memory: thread stacks
(Django runs each request in a ``ThreadSensitiveContext`` whose executor thread lives as long as
the streaming response), malloc arenas, socket buffers are not counted (kernel memory).
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import psutil

from bench import procs, relay
from bench.profile import _frame_layer


def _diag(server: procs.Server) -> dict[str, Any]:
    status, _, body = procs.http("GET", server.url + "/_bench/diag", timeout=60)
    if status != 200:
        raise RuntimeError(f"/_bench/diag answered {status}")
    return json.loads(body)


def _short(path: str) -> str:
    for marker in ("site-packages/", f"{procs.ROOT}/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _component(frames: list[tuple[str, int]]) -> str:
    """The library that asked for the memory: the innermost frame in a known layer (bench/profile.py)."""
    for filename, _ in reversed(frames):
        layer = _frame_layer(filename)
        if layer is not None:
            return layer
    return "stdlib: " + (_short(frames[-1][0]) if frames else "?")


def run(name: str, users: int, pacer: procs.Pacer, databases: procs.Databases, opts: Any) -> dict[str, Any]:
    # Requests are far slower under tracemalloc (bench/README.md, "Memory"): keep ``users`` small
    # (50 is plenty per stream).
    server = relay.start_server(name, pacer, databases, extra_env={
        "BENCH_DIAG": "1", "BENCH_TRACEMALLOC": "1", "BENCH_TRACEMALLOC_FRAMES": "8"})
    try:
        _diag(server)  # baseline snapshot
        threads0 = psutil.Process(server.pid).num_threads()
        rss0 = procs.rss_bytes(server.pid)
        t0 = time.monotonic() + 1.0
        hold = 8.0 + users * 0.2
        cfg = {"url": server.stream_url, "headers": server.stream_headers(), "kind": "sse", "pacer": pacer.base_url,
               "users": users, "probes": 0, "chunks": 1, "gap": 0.05, "first_delay": 600.0, "t0": t0,
               "spread": 1.0, "warmup": 0.0, "measure": hold, "stationary": False, "seed": opts.seed}
        before = pacer.stats()["active"]
        loadgen = relay._loadgen(cfg)
        procs.sleep_until(t0 + 1.0)
        held = pacer.wait_active(before + users, timeout=hold - 3.0) - before
        time.sleep(1.0)
        rss1 = procs.rss_bytes(server.pid)
        threads1 = psutil.Process(server.pid).num_threads()
        after = _diag(server)
        loadgen.communicate(timeout=120)
    finally:
        server.stop()
    stats = after["tracemalloc"] or []
    n = max(1, held)
    heap = sum(s["size_diff"] for s in stats)
    components: collections.Counter[str] = collections.Counter()
    sites: collections.Counter[str] = collections.Counter()
    for s in stats:
        frames = [tuple(f) for f in s["frames"]]
        components[_component(frames)] += s["size_diff"]
        inner = frames[-1]
        context = next((f"{_short(f)}:{line}" for f, line in reversed(frames) if "chatproxy/" in f), None)
        site = f"{_short(inner[0])}:{inner[1]}" + (f" ← {context}" if context and "chatproxy/" not in inner[0] else "")
        sites[site] += s["size_diff"]
    kib = 1024 * n
    return {
        "config": name,
        "users": users,
        "held": held,
        "rss_kib_per_stream": (rss1 - rss0) / kib,
        "heap_kib_per_stream": heap / kib,
        "native_kib_per_stream": (rss1 - rss0 - heap) / kib,
        "threads_per_stream": (threads1 - threads0) / n,
        "components": [(k, v / kib) for k, v in components.most_common(14)],
        "sites": [(k, v / kib) for k, v in sites.most_common(20)],
        "note": "RSS under tracemalloc includes tracemalloc's own bookkeeping; compare with the idle test.",
    }
