"""Part ``soak``: one worker relaying paced streams for a long time, watched for growth.

``python -m bench --parts soak --soak-minutes 30 --soak-streams 200`` (not in the default parts,
not in ``make test``). One server (``--soak-config``, default Daphne as shipped) relays
``streams`` closed-loop streams for ``minutes``; every ``interval`` seconds the driver samples the
server's RSS, open file descriptors, OS threads and the asyncio tasks alive in its loop
(``GET /_bench/info``). Before the load and again after it (once the last streams have ended and
their grace period is over) the idle figures are taken: what a leak leaves behind shows there,
without the noise of the streams in flight.

Reported: the idle figures before and after, the loaded figures at the first and the last tenth of
the run (medians) and their growth per hour, and delivery over the whole run.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import psutil

from bench import procs
from bench.relay import _loadgen, start_server


def _sample(server: procs.Server) -> dict[str, float]:
    proc = psutil.Process(server.pid)
    _, _, body = procs.http("GET", server.url + "/_bench/info", timeout=10)
    return {"t": time.monotonic(), "rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
            "threads": proc.num_threads(), "tasks": json.loads(body)["tasks"]}


def _idle(server: procs.Server, settle: float) -> dict[str, float]:
    """The idle figures, once nothing has been streaming for ``settle`` seconds."""
    time.sleep(settle)
    return _sample(server)


def _median_of(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def run(config: str, streams: int, minutes: float, pacer: procs.Pacer, databases: procs.Databases, opts: Any,
        interval: float = 10.0, log: Any = print) -> dict[str, Any]:
    server = start_server(config, pacer, databases)
    try:
        before = _idle(server, 2.0)
        duration = minutes * 60
        t0 = time.monotonic() + 1.0
        cfg = {"url": server.stream_url, "headers": server.stream_headers(), "kind": "sse", "pacer": pacer.base_url,
               "users": streams, "probes": 0, "chunks": opts.chunks, "gap": opts.gap, "first_delay": 0.0, "t0": t0,
               "spread": opts.spread, "warmup": 0.0, "measure": duration, "stationary": True, "seed": opts.seed}
        loadgen = _loadgen(cfg)
        samples: list[dict[str, float]] = []
        next_sample = t0 + min(interval, duration / 10)
        while next_sample < t0 + duration:
            procs.sleep_until(next_sample)
            samples.append(_sample(server))
            if len(samples) % 6 == 0:
                s = samples[-1]
                log(f"  soak {(s['t'] - t0) / 60:.1f} min: RSS {s['rss_mib']:.1f} MiB, {s['fds']:.0f} fds, "
                    f"{s['tasks']:.0f} tasks, {s['threads']:.0f} threads")
            next_sample += interval
        stdout, stderr = loadgen.communicate(timeout=duration + 300)
        # Streams still open when the load generator stopped end, then their RESUME.GRACE runs out.
        after = _idle(server, 5.0 + float(opts.soak_grace))
    finally:
        server.stop()
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{stderr[-3000:]}")
    result = json.loads(stdout)
    tenth = max(1, len(samples) // 10)
    first, last = samples[:tenth], samples[-tenth:]
    hours = max(1e-9, (_median_of(last, "t") - _median_of(first, "t")) / 3600)
    offered = streams * duration / opts.gap
    return {
        "config": config,
        "streams": streams,
        "minutes": minutes,
        "samples": samples,
        "idle_before": before,
        "idle_after": after,
        "loaded_first": {k: _median_of(first, k) for k in ("rss_mib", "fds", "threads", "tasks")},
        "loaded_last": {k: _median_of(last, k) for k in ("rss_mib", "fds", "threads", "tasks")},
        "rss_mib_per_hour": (_median_of(last, "rss_mib") - _median_of(first, "rss_mib")) / hours,
        "delivered": result["chunks"].get("through", 0) / offered if offered else None,
        "errors": result["errors"],
        "stream_counts": result["streams"],
    }
