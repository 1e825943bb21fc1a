"""Part 1, relay cost and latency: chatproxy (Daphne, uvicorn; journal on / off) and the floor.

One run = one fresh server process, one load generator process, the shared pacer:

1. the server starts (``--fd`` socket, backlog 4096) and serves three short warm-up streams;
2. its RSS is taken as the base and its RSS high-water mark is reset;
3. the load generator runs ``users`` concurrent closed-loop streams of ``chunks`` chunks at
   1/``gap`` chunks/s (random start offsets, stationary first streams) plus ``probes`` streams read
   straight from the pacer (the latency baseline);
4. over the window ``[t0 + warmup, t0 + warmup + measure)`` the driver reads the server's CPU
   seconds (all threads, user + system), the pacer's and other processes' CPU; the load
   generator counts and times the chunks that arrive in the window;
5. the server is stopped.

Results: CPU us per relayed chunk (server CPU / chunks relayed in the window; per-stream setup is
included at its real rate, one request per ``chunks`` chunks), added latency (p50 and p99 of
arrival - send through the server, minus the same percentiles of the direct probes, measured in the
same seconds by the same client), peak RSS above the base per concurrent stream, delivered /
offered chunks, errors.

``idle_memory`` opens ``users`` streams whose upstream sends headers and the role chunk, then
nothing for 600 s, and reports (RSS - base) / streams and the OS threads added per stream once the
pacer holds them all.

``open_cost`` runs ``users`` closed-loop streams of one chunk each: the server's CPU per stream
opened, nearly all of it the request (HTTP, Django, authorization, admission, the upstream request).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench import procs

# name -> (server kind, environment). The sample project as shipped: ``DirectStreams`` serves the
# streams, ``gc.freeze()`` after start-up, ``UPSTREAM.SDK`` left at ``"auto"`` (the API over aiohttp), the
# journal on, ``DEBUG`` off. uvicorn runs with httptools (what ``pip install uvicorn[standard]`` adds;
# ``--http httptools``) and the asyncio loop unless the name says otherwise.
UVICORN = {"BENCH_HTTP": "httptools"}
CURRENT_SDK = {"BENCH_SDK": "current"}
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "floor": ("floor", {}),
    "daphne": ("daphne", {}),
    "uvicorn": ("uvicorn", UVICORN),
    # uvloop, uvicorn[standard]'s default loop; the floor on uvloop too, for a like-for-like ratio.
    "floor, uvloop": ("floor", {"BENCH_LOOP": "uvloop"}),
    "uvicorn, uvloop": ("uvicorn", {**UVICORN, "BENCH_LOOP": "uvloop"}),
    # Variants of one setting (secondary: one level unless asked for with --configs).
    "uvicorn, no journal": ("uvicorn", {**UVICORN, "BENCH_NO_JOURNAL": "1"}),
    # Every model has a fallback target: its chain and circuit are looked at once per stream, never per chunk.
    "uvicorn, fallbacks": ("uvicorn", {**UVICORN, "BENCH_FALLBACKS": "1"}),
    "uvicorn, current SDK over aiohttp": ("uvicorn", {**UVICORN, **CURRENT_SDK, "BENCH_HTTP_CLIENT": "aiohttp"}),
    # The current SDK with its default transport (HTTP_CLIENT "httpx").
    "uvicorn, current SDK over httpx2": ("uvicorn", {**UVICORN, **CURRENT_SDK, "BENCH_HTTP_CLIENT": "httpx"}),
    # What SDK "auto" drove before it took the SDK-less wire: the default path of openai users until then.
    "daphne, current SDK over httpx2": ("daphne", {**CURRENT_SDK, "BENCH_HTTP_CLIENT": "httpx"}),
    # The stream requests through Django's handler and middleware (RequestSizeGuard alone).
    "uvicorn, Django path": ("uvicorn", {**UVICORN, "BENCH_DJANGO_PATH": "1"}),
    "daphne, Django path": ("daphne", {"BENCH_DJANGO_PATH": "1"}),
    # Only with --configs.
    "uvicorn, h11": ("uvicorn", {"BENCH_HTTP": "h11"}),
    "uvicorn, gc not frozen": ("uvicorn", {**UVICORN, "BENCH_GC_UNFREEZE": "1"}),
    "daphne, no journal": ("daphne", {"BENCH_NO_JOURNAL": "1"}),
    # Raised GC thresholds instead of Python's (10000, 50, 100 against 700, 10, 10): less CPU, more
    # memory (docs/deploy.md). The sample project set them until the soaks showed what they cost.
    "daphne, gc 10000/50/100": ("daphne", {"BENCH_GC_THRESHOLD": "10000,50,100"}),
    "uvicorn, gc 10000/50/100": ("uvicorn", {**UVICORN, "BENCH_GC_THRESHOLD": "10000,50,100"}),
}
DEFAULT_CONFIGS = [
    "floor", "daphne", "uvicorn", "floor, uvloop", "uvicorn, uvloop",
    "uvicorn, no journal", "uvicorn, fallbacks", "uvicorn, current SDK over aiohttp",
    "uvicorn, current SDK over httpx2", "daphne, current SDK over httpx2", "uvicorn, Django path",
    "daphne, Django path", "daphne, gc 10000/50/100", "daphne, no journal",
]
SECONDARY_CONFIGS = frozenset(DEFAULT_CONFIGS[5:])


def start_server(name: str, pacer: procs.Pacer, databases: procs.Databases, python: str = sys.executable,
                 extra_env: dict[str, str] | None = None) -> procs.Server:
    kind, env = CONFIGS[name]
    server = procs.Server(kind, upstream=pacer.base_url, python=python, env={**env, **(extra_env or {})},
                          databases=databases)
    try:
        server.warm_up()
    except BaseException:
        server.stop()
        raise
    return server


def _loadgen(cfg: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(cfg)], cwd=procs.ROOT,
                            env=procs._child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.pin(proc.pid, procs.LOAD_CPUS)
    return proc


def relay_run(name: str, users: int, pacer: procs.Pacer, databases: procs.Databases, opts: Any,
              probe: Any = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measured run. ``probe(server, "start" | "end")``, if given, is called at the window's
    start and end (it must return quickly); what it returns at the end is the row's ``probe``."""
    server = start_server(name, pacer, databases, extra_env=extra_env)
    try:
        memory = procs.MemoryWatch(server.pid)
        t0 = time.monotonic() + 1.0
        w0, w1 = t0 + opts.warmup, t0 + opts.warmup + opts.measure
        cfg = {"url": server.stream_url, "headers": server.stream_headers(),
               "kind": "floor" if server.kind == "floor" else "sse", "pacer": pacer.base_url,
               "users": users, "probes": opts.probes, "chunks": opts.chunks, "gap": opts.gap, "first_delay": 0.0,
               "t0": t0, "spread": opts.spread, "warmup": opts.warmup, "measure": opts.measure,
               "stationary": True, "seed": opts.seed}
        loadgen = _loadgen(cfg)
        foreign = procs.ForeignLoad([server.pid, pacer.pid, loadgen.pid])
        procs.sleep_until(w0)
        cpu0, pacer0 = procs.cpu_seconds(server.pid), procs.cpu_seconds(pacer.pid)
        foreign.start()
        if probe is not None:
            probe(server, "start")
        procs.sleep_until(w1)
        cpu1, pacer1 = procs.cpu_seconds(server.pid), procs.cpu_seconds(pacer.pid)
        other = foreign.stop()
        probed = probe(server, "end") if probe is not None else None
        stdout, stderr = loadgen.communicate(timeout=60)
        peak = memory.peak()
    finally:
        server.stop()
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{stderr[-3000:]}")
    result = json.loads(stdout)
    chunks = result["chunks"].get("through", 0)
    through, direct = result["latency"]["through"], result["latency"]["direct"]

    def added(q: str) -> float | None:
        if through.get(q) is None or direct.get(q) is None:
            return None
        return (through[q] - direct[q]) * 1e3

    offered = users * opts.measure / opts.gap
    return {
        "config": name,
        "server": server.kind,
        "upstream": server.upstream_path,
        "journal": server.kind != "floor" and "no journal" not in name,
        "users": users,
        "chunks_per_stream": opts.chunks,
        "chunks": chunks,
        "offered": offered,
        "delivered": chunks / offered if offered else None,
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_share": (cpu1 - cpu0) / opts.measure,
        "us_per_chunk": (cpu1 - cpu0) / chunks * 1e6 if chunks else None,
        "latency_ms": {path: {q: (v * 1e3 if isinstance(v, float) and q != "n" else v) for q, v in s.items()}
                       for path, s in result["latency"].items()},
        "added_p50_ms": added("p50"),
        "added_p99_ms": added("p99"),
        "rss_base_mib": memory.base / 2**20,
        "peak_kib_per_stream": (peak - memory.base) / users / 1024,
        "pacer_cpu_share": (pacer1 - pacer0) / opts.measure,
        "client_cpu_share": result["client_cpu"] / opts.measure,
        "client_loop_lag_p99_ms": (result["client_loop_lag"].get("p99") or 0.0) * 1e3,
        "other_load_cores": other,
        "streams": result["streams"],
        "errors": result["errors"],
        "probe": probed,
    }


def idle_memory(name: str, users: int, pacer: procs.Pacer, databases: procs.Databases, opts: Any) -> dict[str, Any]:
    server = start_server(name, pacer, databases)
    try:
        base = procs.rss_bytes(server.pid)
        threads0 = procs.num_threads(server.pid)
        t0 = time.monotonic() + 1.0
        hold = 4.0 + users / 100
        cfg = {"url": server.stream_url, "headers": server.stream_headers(),
               "kind": "floor" if server.kind == "floor" else "sse", "pacer": pacer.base_url,
               "users": users, "probes": 0, "chunks": 1, "gap": 0.05, "first_delay": 600.0,
               "t0": t0, "spread": 1.0, "warmup": 0.0, "measure": hold, "stationary": False, "seed": opts.seed}
        before = pacer.stats()["active"]
        loadgen = _loadgen(cfg)
        procs.sleep_until(t0 + 1.0)
        held = pacer.wait_active(before + users, timeout=hold - 2.5) - before
        time.sleep(1.0)  # let the last ones settle (first events written, timers armed)
        rss = procs.rss_bytes(server.pid)
        threads = procs.num_threads(server.pid)
        loadgen.communicate(timeout=60)
    finally:
        server.stop()
    return {
        "config": name,
        "upstream": server.upstream_path,
        "users": users,
        "held": held,
        "rss_base_mib": base / 2**20,
        "rss_mib": rss / 2**20,
        "kib_per_idle_stream": (rss - base) / max(1, held) / 1024,
        "threads_per_idle_stream": (threads - threads0) / max(1, held),
    }


def open_cost(name: str, users: int, pacer: procs.Pacer, databases: procs.Databases, opts: Any) -> dict[str, Any]:
    """CPU per new stream: :func:`relay_run` with one-chunk streams (each stream relays one chunk,
    so CPU per chunk is CPU per stream)."""
    one_chunk = type(opts)(**{**vars(opts), "chunks": 1})
    row = relay_run(name, users, pacer, databases, one_chunk)
    row["ms_per_stream"] = row["us_per_chunk"] / 1000 if row["us_per_chunk"] else None
    row["streams_per_s"] = row["chunks"] / opts.measure
    return row
