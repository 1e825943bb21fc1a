"""Part ``redisops``: the Redis commands a stream costs, counted on real workers.

``python -m bench.redisops [--streams K] [--chunks N] [--gap G] [--json]`` (or ``python -m bench
--parts redisops``): a ``redis-server`` of its own, the paced upstream (:mod:`bench.pacer`) and
Daphne workers with ``REDIS_URL`` set, as in production (the sample project then puts Django's
cache -- so the journal (``RESUME.CACHE``), admission leases and circuit state -- and the Channels
layer on that Redis). Admission is on (``MAX_STREAMS_PER_USER`` high enough for the K streams, so
each takes and gives back a lease).

Each case runs K streams of N chunks, one every G seconds, all at once, on worker A, and reads
Redis's ``INFO commandstats`` before the first request and after the last stream ended and the
journal wrote it out (``INFO`` itself is not counted):

* ``idle``: the same wait with no stream at all (what the workers cost Redis by themselves);
* ``quiet``: nobody resumes the streams (their clients read worker A's memory);
* ``resumed``: each stream, once started, is also resumed on worker B from its first event
  (``GET /chat/stream/<id>/``): B replays from the store and tails live over the channel layer,
  while the original client keeps reading A;
* ``quiet, fallbacks``: as ``quiet``, on a third worker whose models all have a fallback
  (``BENCH_FALLBACKS``), so each stream also reads its target's circuit (without fallbacks no
  circuit is consulted).

Commands per stream = calls / K; per stream-second = calls / (K x N x G). The ``quiet`` counts
depend on the journal's intervals, not on the machine's speed (within a flush or two). The
``resumed`` ones depend on how many flushes worker A makes in time (at most one per
``FLUSH_INTERVAL`` while a stream is listened to, each batch also published on the channel layer):
on a loaded machine fewer, larger batches, so fewer commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs

CASES = ("idle", "quiet", "resumed", "quiet, fallbacks")


def commandstats(client: Any) -> dict[str, int]:
    """Redis's calls per command since it started (``INFO commandstats``; ``client``: a redis-py
    client kept open, so that counting adds no connection of its own)."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two :func:`commandstats`, largest first, without ``info``."""
    calls = {name: n - before.get(name, 0) for name, n in after.items() if name != "info"}
    return dict(sorted(((name, n) for name, n in calls.items() if n > 0), key=lambda kv: (-kv[1], kv[0])))


async def _events(response: Any) -> Any:
    """``(id, event, data)`` of each SSE event of ``response``."""
    seq, name, data = 0, "", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if name:
                yield seq, name, data
            name, data = "", ""
        elif line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]


async def _resume(session: Any, url: str, stream_id: str, after: int) -> list[str]:
    names: list[str] = []
    async with session.get(f"{url}/chat/stream/{stream_id}/", headers={"Last-Event-ID": str(after)}) as response:
        if response.status != 200:
            raise RuntimeError(f"resume: HTTP {response.status} {(await response.text())[:300]}")
        async for _, name, _ in _events(response):
            names.append(name)
    return names


async def _stream(session: Any, a: procs.Server, b: procs.Server | None, index: int, chunks: int,
                  gap: float) -> tuple[list[str], list[str] | None]:
    """One stream on ``a`` read to its end; with ``b``, also resumed there from its first event."""
    prompt = f"redisops {index} [[pace chunks={chunks} gap={gap} first_delay=0]]"
    body = json.dumps({"messages": [{"role": "user", "content": prompt}]})
    names: list[str] = []
    resumed: asyncio.Task[list[str]] | None = None
    async with session.post(a.stream_url, data=body, headers=a.stream_headers()) as response:
        if response.status != 200:
            raise RuntimeError(f"stream: HTTP {response.status} {(await response.text())[:300]}")
        async for seq, name, data in _events(response):
            names.append(name)
            if name == "start" and b is not None:
                resumed = asyncio.create_task(_resume(session, b.url, json.loads(data)["stream_id"], seq))
    return names, (await resumed if resumed is not None else None)


async def _streams(a: procs.Server, b: procs.Server | None, streams: int, chunks: int, gap: float) -> dict[str, int]:
    import aiohttp

    outcomes = {"complete": 0, "resumed complete": 0, "failed": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=chunks * gap + 30)) as session:
        results = await asyncio.gather(*(_stream(session, a, b, i, chunks, gap) for i in range(streams)),
                                       return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            outcomes["failed"] += 1
            continue
        names, resumed = result
        outcomes["complete"] += names[-1:] == ["done"]
        outcomes["resumed complete"] += resumed is not None and resumed[-1:] == ["done"]
    return outcomes


def _settle(client: Any, quiet: float = 1.0, timeout: float = 10.0) -> None:
    """Wait until Redis has seen no command but INFO for ``quiet`` seconds (the journal wrote out)."""
    deadline = time.monotonic() + timeout
    last = delta({}, commandstats(client))
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = delta({}, commandstats(client))
        if now == last:
            return
        last = now


def run(streams: int = 50, chunks: int = 40, gap: float = 0.05, pacer: procs.Pacer | None = None,
        databases: procs.Databases | None = None) -> dict[str, Any]:
    """Every case of the module docstring; the counts per case and per command."""
    import redis

    from tests.e2e.stack import redis_ping, start_redis, wait_until

    own_pacer, own_dbs = pacer is None, databases is None
    pacer = pacer or procs.Pacer()
    databases = databases or procs.Databases()
    seconds = chunks * gap
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatproxy-bench-redisops-") as tmpdir:
        redis_proc, port = start_redis(Path(tmpdir))
        servers: list[procs.Server] = []
        try:
            wait_until(lambda: redis_ping(port), "redis", [redis_proc], timeout=10)
            env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0",
                   "CHATPROXY_LIMITS": json.dumps({"MAX_STREAMS_PER_USER": 2 * streams + 10})}
            for extra in ({}, {}, {"BENCH_FALLBACKS": "1"}):
                server = procs.Server("daphne", upstream=pacer.base_url, env={**env, **extra}, databases=databases)
                servers.append(server)
                server.warm_up()
            a, b, c = servers
            stats = redis.Redis(host="127.0.0.1", port=port)
            for case in CASES:
                _settle(stats)
                before = commandstats(stats)
                if case == "idle":
                    time.sleep(seconds)
                    outcomes: dict[str, int] = {}
                else:
                    origin = c if case == "quiet, fallbacks" else a
                    outcomes = asyncio.run(_streams(origin, b if case == "resumed" else None, streams, chunks, gap))
                _settle(stats)
                calls = delta(before, commandstats(stats))
                total = sum(calls.values())
                rows.append({"case": case, "streams": streams, "chunks": chunks, "gap": gap, "outcomes": outcomes,
                             "calls": calls, "total": total, "per_stream": total / streams,
                             "per_stream_s": total / (streams * seconds)})
            stats.close()
        finally:
            for server in servers:
                server.stop()
            redis_proc.stop()
            if own_pacer:
                pacer.stop()
            if own_dbs:
                databases.cleanup()
    return {"streams": streams, "chunks": chunks, "gap": gap, "rows": rows}


def table(result: dict[str, Any]) -> list[str]:
    """Markdown: commands per stream and per stream-second, by command, for each case."""
    rows = result["rows"]
    commands = list(dict.fromkeys(name for row in rows for name in row["calls"]))
    lines = [f"{result['streams']} streams of {result['chunks']} chunks every {result['gap']:g} s "
             f"({result['chunks'] * result['gap']:g} s each), all at once, on one Daphne worker (resumed on another); "
             "commands per stream (per stream-second in brackets):", "",
             "| case | streams ended `done` | all commands | " + " | ".join(commands) + " |",
             "|---|--:|--:|" + "--:|" * len(commands)]
    for row in rows:
        outcomes = row["outcomes"]
        done = f"{outcomes['complete']}" + (f", resumed {outcomes['resumed complete']}"
                                            if row["case"] == "resumed" else "") if outcomes else "–"
        seconds = row["chunks"] * row["gap"]
        cells = [f"{n / row['streams']:.1f} ({n / row['streams'] / seconds:.2f})" if n else "–"
                 for n in (row["calls"].get(name, 0) for name in commands)]
        lines.append(f"| {row['case']} | {done} | **{row['per_stream']:.1f} ({row['per_stream_s']:.2f})** | "
                     + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=50, help="concurrent streams per case (default 50)")
    parser.add_argument("--chunks", type=int, default=40, help="chunks per stream (default 40)")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between chunks (default 0.05)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    result = run(args.streams, args.chunks, args.gap)
    print(json.dumps(result) if args.json else "\n".join(table(result)))


if __name__ == "__main__":
    main()
