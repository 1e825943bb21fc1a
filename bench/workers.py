"""Part ``workers``: the shape users deploy on one machine, nginx in front of worker processes that
share one Redis (journal, limits, profiles stamp, channel layer), relaying paced streams.

One run: a ``redis-server`` of its own, ``workers`` chatproxy servers (``kind``: Daphne or uvicorn)
started as in :mod:`bench.relay` but with ``REDIS_URL`` set (the sample project then puts the cache
and the channel layer on Redis), nginx round robin over them (``tests/e2e/stack.py``'s config:
HTTP/1.1 to the workers, buffering off; here with nginx's default 60 s read timeout and
``max_fails=0``), and the load generator's closed-loop streams sent to nginx. Over the measured window it reads:

* the workers' CPU, the chunks delivered and the added latency (through nginx and a worker, minus
  the direct probes), as :func:`bench.relay.relay_run` does for one server;
* Redis's ``INFO commandstats`` before and after: commands per stream-second (every stream is
  open the whole window in a closed loop, so stream-seconds = streams x window), by command, and
  Redis's own CPU per stream-second.

From those counts ``docs/deploy.md`` works out how many streams one Redis serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.relay import CONFIGS


def _commandstats(port: int) -> dict[str, int]:
    """Redis's calls per command since start (``INFO commandstats``)."""
    import redis

    info = redis.Redis(host="127.0.0.1", port=port).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


def _redis_cpu(port: int) -> float:
    import redis

    info = redis.Redis(host="127.0.0.1", port=port).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run(kind: str, workers: int, users: int, pacer: procs.Pacer, databases: procs.Databases,
        opts: Any) -> dict[str, Any]:
    from tests.e2e.stack import free_port, redis_ping, start_nginx, start_redis, wait_until, write_nginx_conf

    _, env = CONFIGS[kind]
    with tempfile.TemporaryDirectory(prefix="chatproxy-bench-workers-") as tmpdir:
        tmp = Path(tmpdir)
        redis_proc, redis_port = start_redis(tmp)
        servers: list[procs.Server] = []
        nginx = None
        try:
            wait_until(lambda: redis_ping(redis_port), "redis", [redis_proc], timeout=10)
            worker_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
            for _ in range(workers):
                server = procs.Server(kind, upstream=pacer.base_url, env=worker_env, databases=databases)
                servers.append(server)
                server.warm_up()
            nginx_port = free_port()
            # nginx's default read timeout, and no worker taken out of rotation after one slow answer.
            conf = write_nginx_conf(tmp, {kind: (nginx_port, [s.port for s in servers])},
                                    worker_connections=4 * users + 256, read_timeout=60, server_params="max_fails=0")
            nginx = start_nginx(tmp, conf)
            url = f"http://127.0.0.1:{nginx_port}"
            wait_until(lambda: procs.http("GET", url + "/", timeout=2)[0] == 200, "nginx", [nginx], timeout=10)

            t0 = time.monotonic() + 1.0
            w0, w1 = t0 + opts.warmup, t0 + opts.warmup + opts.measure
            cfg = {"url": url + "/chat/stream/", "headers": servers[0].stream_headers(), "kind": "sse",
                   "pacer": pacer.base_url, "users": users, "probes": opts.probes, "chunks": opts.chunks,
                   "gap": opts.gap, "first_delay": 0.0, "t0": t0, "spread": opts.spread, "warmup": opts.warmup,
                   "measure": opts.measure, "stationary": True, "seed": opts.seed}
            loadgen = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(cfg)], cwd=procs.ROOT,
                                       env=procs._child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            procs.sleep_until(w0)
            cpu0 = sum(procs.cpu_seconds(s.pid) for s in servers)
            calls0, redis_cpu0 = _commandstats(redis_port), _redis_cpu(redis_port)
            procs.sleep_until(w1)
            cpu1 = sum(procs.cpu_seconds(s.pid) for s in servers)
            calls1, redis_cpu1 = _commandstats(redis_port), _redis_cpu(redis_port)
            stdout, stderr = loadgen.communicate(timeout=120)
        finally:
            for server in servers:
                server.stop()
            if nginx is not None:
                nginx.stop()
            redis_proc.stop()
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{stderr[-3000:]}")
    result = json.loads(stdout)
    through, direct = result["latency"]["through"], result["latency"]["direct"]
    chunks = result["chunks"].get("through", 0)
    offered = users * opts.measure / opts.gap
    stream_seconds = users * opts.measure
    by_command = {name: calls1.get(name, 0) - calls0.get(name, 0) for name in calls1}
    by_command = {name: n for name, n in sorted(by_command.items(), key=lambda kv: -kv[1]) if n > 0}
    redis_calls = sum(by_command.values()) - by_command.get("info", 0)

    def added(q: str) -> float | None:
        if through.get(q) is None or direct.get(q) is None:
            return None
        return (through[q] - direct[q]) * 1e3

    return {
        "config": f"nginx + {workers} {kind} workers + Redis",
        "kind": kind,
        "workers": workers,
        "users": users,
        "chunks": chunks,
        "offered": offered,
        "delivered": chunks / offered if offered else None,
        "errors": result["errors"],
        "added_p50_ms": added("p50"),
        "added_p99_ms": added("p99"),
        "us_per_chunk": (cpu1 - cpu0) / chunks * 1e6 if chunks else None,
        "workers_cpu_share": (cpu1 - cpu0) / opts.measure,
        "redis_calls_per_stream_s": redis_calls / stream_seconds,
        "redis_cpu_us_per_stream_s": (redis_cpu1 - redis_cpu0) / stream_seconds * 1e6,
        "redis_by_command": {name: n / stream_seconds for name, n in by_command.items() if name != "info"},
        "streams": result["streams"],
    }
