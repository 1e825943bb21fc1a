"""Prototype, not the package: the resume journal on Redis Streams, measured beside the current one.

``python -m bench.journal_streams [--streams 200] [--resumed 20] [--chunks 200] [--gap 0.05] [--json]``

The question (issue "Operations"): would one Redis Stream per chatproxy stream -- ``XADD`` for the
log, ``XRANGE`` from a seq for the replay, ``XREAD BLOCK`` for the live tail -- be simpler and
cheaper than the journal's cache keys (one key per batch, through Django's cache API) plus the
Channels layer for the live tail?

Both designs run in this process on the same load, each against a fresh ``redis-server``: ``streams``
real :class:`chatproxy.core.ChatStream` objects on a scripted upstream (``chunks`` deltas, one
every ``gap`` seconds), each read to its end by its own client; ``resumed`` of them are also
resumed "on another worker" from their first event: a replay from the store, then the live tail.

* ``keys``: chatproxy's journal as it is (:mod:`chatproxy.resume`: :class:`~chatproxy.resume.Journal`
  writing through Django's ``RedisCache``, and ``_replay_remote``, which reads batches with
  ``MGET`` and tails the Channels group of ``channels_redis``).
* ``keys, Django set_many``: the same, each flush through Django's own ``RedisCache.set_many``
  (``MULTI``, ``MSET``, an ``EXPIRE`` per key, ``EXEC``), as the journal wrote before
  :func:`chatproxy.cachecalls.set_many`.
* ``keys, quiet flush 2 s``: the journal with ``QUIET_FLUSH_INTERVAL`` 2 s instead of 0.5 s
  (fewer, larger batches of the streams nobody resumes; run without resumed streams only).
* ``streams``: :class:`StreamsJournal` below, the same batches on the same schedule (every
  ``QUIET_FLUSH_INTERVAL``, or ``FLUSH_INTERVAL`` while the listen flag is set -- still read with one
  ``MGET`` per ``CONTROL_INTERVAL``), each batch one ``XADD key <last seq>-0 b <json>`` (its entry
  id is the batch's last seq, so a replay after seq ``n`` is ``XRANGE key (n-0 +``); ``EXPIRE``
  once per key when it is created (``XADD`` keeps a key's TTL); the meta stays a ``SET ... EX``.
  A resumed reader replays with ``XRANGE``, then loops on ``XREAD BLOCK`` on a connection of its own.

Measured over a window while every stream runs (the first and last second left out): Redis
commands per stream-second by command, Redis CPU (``INFO cpu`` user + sys) per stream-second,
the connections Redis holds, and at the end of the window memory per stream (``INFO memory``
``used_memory`` growth, and ``MEMORY USAGE`` of each stream's keys). Every resumed reader must
have received every event exactly once, in order, ending with ``done`` (else the run fails).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DESIGNS = ("keys, Django set_many", "keys", "keys, quiet flush 2 s", "streams")


def _configure(redis_url: str) -> None:
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "chatproxy"],
        # As the sample project configures Redis (project/settings.py).
        CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url,
                            "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}}},
        CHANNEL_LAYERS={"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                    "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 30}]}}},
        CHATPROXY={"RESUME": {"CACHE": "default", "TTL": 600}, "RECORDS": {"ENABLED": False}},
    )
    django.setup()


def stream_key(stream_id: str) -> str:
    return f"chatproxy:x:{stream_id}"


@dataclass(eq=False)
class _Tracked:
    stream: Any
    reader: Any
    flushed_at: float = 0.0
    listened: bool = False
    created: bool = False


class StreamsJournal:
    """The journal's writer with one Redis Stream per chatproxy stream (no outage handling, no
    meta refresh: a prototype for counting, with the journal's schedule)."""

    def __init__(self, client: Any, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self.tracked: dict[str, _Tracked] = {}
        self._next_control = 0.0
        self.task: asyncio.Task[None] | None = None

    async def track(self, stream: Any) -> None:
        from chatproxy import resume

        self.tracked[stream.stream_id] = _Tracked(stream, stream.subscribe(client=False))
        meta = {"owner": "anon", "keepalive": stream.policy.keepalive, "created": time.time(),
                "deadline": time.time() + stream.policy.deadline + 5.0}
        await self.client.set(resume.meta_key(stream.stream_id), orjson.dumps(meta), ex=self.ttl)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from chatproxy import resume

        while self.tracked:
            await asyncio.sleep(resume.FLUSH_INTERVAL)
            await self.flush()
        self.task = None

    async def flush(self) -> None:
        from chatproxy import resume

        now = time.monotonic()
        if now >= self._next_control:
            self._next_control = now + resume.CONTROL_INTERVAL
            keys = [resume.flag_key(sid, "listen") for sid in self.tracked]
            flags = await self.client.mget(keys)
            for tracked, flag in zip(self.tracked.values(), flags, strict=True):
                tracked.listened = flag is not None
        pipe = self.client.pipeline(transaction=False)
        ended: list[_Tracked] = []
        quiet_before = now - resume.QUIET_FLUSH_INTERVAL
        for sid, tracked in self.tracked.items():
            finished = tracked.stream.finished
            if not (tracked.listened or finished or tracked.flushed_at <= quiet_before):
                continue
            events = tracked.reader.pending()
            if events:
                tracked.flushed_at = now
                batch = orjson.dumps([[e.seq, e.name, e.data] for e in events])
                pipe.xadd(stream_key(sid), {"b": batch}, id=f"{events[-1].seq}-0")
                if not tracked.created:
                    tracked.created = True
                    pipe.expire(stream_key(sid), self.ttl)
            elif finished:
                ended.append(tracked)
        if len(pipe):
            await pipe.execute()
        for tracked in ended:
            tracked.reader.close()
            del self.tracked[tracked.stream.stream_id]


def _decoded(entries: list[Any], after: int) -> list[Any]:
    from chatproxy.resume import _decode

    return [e for _, fields in entries for e in _decode(fields[b"b"]) if e.seq > after]


async def streams_replay(url: str, stream_id: str, after: int, ttl: int) -> AsyncIterator[Any]:
    """The events after seq ``after``: ``XRANGE`` from the store, then ``XREAD BLOCK`` (a connection
    of its own: a blocked read holds its connection until it returns)."""
    import redis.asyncio

    from chatproxy import resume

    client: Any = redis.asyncio.Redis.from_url(url, single_connection_client=True)
    key, flag = stream_key(stream_id), resume.flag_key(stream_id, "listen")
    try:
        await client.set(flag, 1, ex=ttl)
        entries = await client.xrange(key, min=f"({after}-0")
        last_id = entries[-1][0] if entries else f"{after}-0"
        events = _decoded(entries, after)
        while True:
            for event in events:
                after = event.seq
                yield event
                if event.name in resume.TERMINAL:
                    return
            found = await client.xread({key: last_id}, block=500)
            entries = found[0][1] if found else []
            if entries:
                last_id = entries[-1][0]
            events = _decoded(entries, after)
    finally:
        await client.delete(flag)
        await client.aclose()


async def _read(replay: AsyncIterator[Any]) -> list[tuple[int, str]]:
    return [(event.seq, event.name) async for event in replay if event.name]


def _info(client: Any) -> dict[str, Any]:
    cpu, memory, clients = client.info("cpu"), client.info("memory"), client.info("clients")
    calls = {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in client.info("commandstats").items()}
    return {"cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), "memory": int(memory["used_memory"]),
            "clients": int(clients["connected_clients"]), "calls": calls}


async def _design(design: str, url: str, stats: Any, streams: int, resumed: int, chunks: int,
                  gap: float) -> dict[str, Any]:
    from chatproxy import cachecalls, resume
    from tests.scripted import ScriptedUpstream, say
    from tests.test_core_unit import REQUEST, P

    # A loaded machine must not make a scripted stream look stalled (its script has one attempt).
    policy = dataclasses.replace(P, stall=10.0, first_token=10.0, deadline=chunks * gap + 30.0)
    set_many, quiet = cachecalls.set_many, resume.QUIET_FLUSH_INTERVAL
    if design == "keys, Django set_many":
        cachecalls.set_many = lambda cache, data, timeout: cache.set_many(data, timeout)
    elif design == "keys, quiet flush 2 s":
        resume.QUIET_FLUSH_INTERVAL = 2.0
    try:
        return await _run_design(design, url, stats, streams, resumed, chunks, gap, policy, REQUEST,
                                 lambda: ScriptedUpstream([say(*[f" w{i}" for i in range(chunks)], gap=gap)]))
    finally:
        cachecalls.set_many, resume.QUIET_FLUSH_INTERVAL = set_many, quiet


async def _run_design(design: str, url: str, stats: Any, streams: int, resumed: int, chunks: int, gap: float,
                      policy: Any, request: Any, upstream: Any) -> dict[str, Any]:
    import redis.asyncio

    from chatproxy import resume
    from chatproxy.core import ChatStream

    stats.flushall()
    base = _info(stats)
    client = redis.asyncio.Redis.from_url(url)
    journal = StreamsJournal(client, 600)
    running = [ChatStream(upstream(), request, policy, persistent=True).start() for _ in range(streams)]
    clients = [asyncio.ensure_future(_read(stream)) for stream in running]
    for stream in running:
        if design != "streams":
            await resume.track(stream, None)
        else:
            await journal.track(stream)
    await asyncio.sleep(0.5)
    readers = []
    for stream in running[:resumed]:
        if design != "streams":
            meta = await resume.stream_meta(stream.stream_id, None)
            replay = resume._replay_remote(stream.stream_id, 1, meta)
        else:
            replay = streams_replay(url, stream.stream_id, 1, 600)
        readers.append(asyncio.ensure_future(_read(replay)))
    seconds = chunks * gap
    window = max(1.0, seconds - 2.5)
    await asyncio.sleep(0.5)
    before = await asyncio.to_thread(_info, stats)
    await asyncio.sleep(window)
    after = await asyncio.to_thread(_info, stats)

    def usage(sid: str) -> int:
        keys = [resume.meta_key(sid)] + ([stream_key(sid)] if design == "streams" else
                                         [k.decode() for k in stats.keys(f":1:chatproxy:s:{sid}:*")])
        return sum(stats.memory_usage(k, samples=0) or 0 for k in keys)

    memory_usage = sum(await asyncio.to_thread(lambda: [usage(s.stream_id) for s in running[resumed:]])) \
        / max(1, streams - resumed)
    finished = await asyncio.gather(*clients)
    got = await asyncio.gather(*readers)
    if design != "streams":
        await resume.journal().idle()
    elif journal.task is not None:
        await journal.task
    for stream in running:
        await stream.aclose()
    await client.aclose()
    expected = [(seq, name) for seq, name in finished[0] if seq > 1]
    for events in got:
        if [seq for seq, _ in events] != list(range(2, len(events) + 2)) or events[-1][1] != "done" \
                or len(events) != len(expected):
            raise RuntimeError(f"{design}: a resumed reader got {len(events)} events, expected {len(expected)}")
    calls = {name: n - before["calls"].get(name, 0) for name, n in after["calls"].items() if name != "info"}
    calls = dict(sorted(((k, v) for k, v in calls.items() if v > 0), key=lambda kv: -kv[1]))
    stream_s = streams * window
    return {"design": design, "streams": streams, "resumed": resumed, "window_s": window,
            "calls_per_stream_s": sum(calls.values()) / stream_s,
            "by_command": {name: n / stream_s for name, n in calls.items()},
            "cpu_us_per_stream_s": (after["cpu"] - before["cpu"]) / stream_s * 1e6,
            "used_memory_per_stream": (after["memory"] - base["memory"]) / streams,
            "memory_usage_per_quiet_stream": memory_usage, "connections": after["clients"] - base["clients"],
            "events_per_stream": len(finished[0])}


def run(streams: int = 200, resumed: int = 20, chunks: int = 200, gap: float = 0.05) -> list[dict[str, Any]]:
    """Both designs, with no stream resumed and with ``resumed`` of them, each run on a redis-server
    of its own (fresh memory and counters)."""
    import redis

    from tests.e2e.stack import redis_ping, start_redis, wait_until

    rows = []
    for design, readers in ((d, r) for r in dict.fromkeys((0, resumed)) for d in DESIGNS):
        if readers and design == "keys, quiet flush 2 s":
            continue
        with tempfile.TemporaryDirectory(prefix="chatproxy-bench-streams-") as tmpdir:
            proc, port = start_redis(Path(tmpdir))
            try:
                wait_until(lambda port=port: redis_ping(port), "redis", [proc], timeout=10)
                url = f"redis://127.0.0.1:{port}/1"
                _configure(url)
                from django.conf import settings

                settings.CACHES["default"]["LOCATION"] = url  # this run's own server
                from django.core.cache import caches

                caches.close_all()
                _reset_layer(url)
                stats = redis.Redis(host="127.0.0.1", port=port, db=1)
                rows.append(asyncio.run(_design(design, url, stats, streams, readers, chunks, gap)))
                stats.close()
            finally:
                proc.stop()
    return rows


def _reset_layer(url: str) -> None:
    """Point the Channels layer at ``url`` (a new layer object for this design's Redis)."""
    from channels.layers import channel_layers
    from django.conf import settings

    layers: Any = settings.CHANNEL_LAYERS
    layers["default"]["CONFIG"]["hosts"] = [{"address": url, "socket_timeout": 30}]
    channel_layers.backends.clear()


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| design | streams (resumed) | Redis commands per stream-second | Redis CPU µs per stream-second | "
             "bytes per stream (used_memory) | bytes per quiet stream (MEMORY USAGE) | connections | "
             "commands per stream-second, by command |", "|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        top = ", ".join(f"{name} {n:.2f}" for name, n in list(r["by_command"].items())[:10])
        lines.append(f"| {r['design']} | {r['streams']} ({r['resumed']}) | {r['calls_per_stream_s']:.2f} | "
                     f"{r['cpu_us_per_stream_s']:.1f} | {r['used_memory_per_stream']:,.0f} | "
                     f"{r['memory_usage_per_quiet_stream']:,.0f} | {r['connections']} | {top} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--resumed", type=int, default=20, help="streams also resumed from their first event")
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args.streams, args.resumed, args.chunks, args.gap)
    print(json.dumps(rows) if args.json else "\n".join(table(rows)))


if __name__ == "__main__":
    main()
