"""The journal on Redis (``RESUME.CACHE`` is Django's ``RedisCache``): what its writes cost Redis,
and that Django reads back what it wrote. Counted with ``INFO commandstats`` on a redis-server of
the module's own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

from chatproxy import cachecalls, resume
from chatproxy.core import ChatStream
from tests.scripted import ScriptedUpstream, say
from tests.test_core_unit import REQUEST, P

STREAMS = 12
TTL = 60


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from tests.e2e.stack import redis_ping, start_redis, wait_until

    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        wait_until(lambda: redis_ping(port), "redis", [proc], timeout=10)
        yield port
    finally:
        proc.stop()


@pytest.fixture
def stats(redis_port: int, settings: Any) -> Iterator[redis.Redis]:
    """The journal on the module's Redis (keys with a prefix and a version, as a project may set
    them); yields a client for ``INFO commandstats``, the counts reset."""
    settings.CACHES = {**settings.CACHES, "journal": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"redis://127.0.0.1:{redis_port}/1",
        "KEY_PREFIX": "site", "VERSION": 3}}
    settings.CHATPROXY = {"RESUME": {"CACHE": "journal", "TTL": TTL}, "RECORDS": {"ENABLED": False}}
    client = redis.Redis(host="127.0.0.1", port=redis_port, db=1)
    client.flushdb()
    client.config_resetstat()
    yield client
    client.flushdb()
    client.close()


def calls(client: redis.Redis) -> dict[str, int]:
    """Commands since the last reset, without INFO itself and connection setup."""
    skip = {"info", "hello", "client|setinfo", "select", "config|resetstat"}
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in client.info("commandstats").items()
            if name.removeprefix("cmdstat_") not in skip}


async def test_a_flush_costs_one_command_per_key_written(stats: redis.Redis) -> None:
    """Every key the journal writes (each stream's meta, then its batches) is one ``SET ... EX``:
    no ``MULTI``/``MSET``/``EXPIRE``/``EXEC`` (Django's ``set_many``: two commands per key)."""
    streams = [ChatStream(ScriptedUpstream([say("a", "b", gap=0.01)]), REQUEST, P, persistent=True).start()
               for _ in range(STREAMS)]
    for stream in streams:
        await resume.track(stream, None)
    for stream in streams:
        assert [e.name async for e in stream][-1] == "done"
    await asyncio.wait_for(resume.journal().idle(), 5)
    counted = calls(stats)
    keys: list[bytes] = stats.keys("site:3:chatproxy:s:*")  # type: ignore[assignment]
    batches = [key for key in keys if key.rsplit(b":", 1)[-1].isdigit()]
    assert len(keys) - len(batches) == STREAMS and len(batches) >= STREAMS  # a meta and a batch or more each
    writes = {name: n for name, n in counted.items() if name != "mget"}  # mget: the listen/cancel flags
    assert writes == {"set": len(keys)}, counted
    assert all(0 < stats.ttl(key) <= TTL for key in keys)
    for stream in streams:  # read back through Django, from the store
        stored, _ = await resume._stored_events(stream.stream_id, 0)
        assert [e.seq for e in stored] == list(range(1, stream.last_seq + 1))
        assert [e.name for e in stored][-1] == "done"
        await stream.aclose()


def test_set_many_writes_what_django_reads(stats: redis.Redis) -> None:
    cache = caches["journal"]
    assert type(cache) is RedisCache
    data: dict[str, Any] = {"bytes": b"[[1,\"delta\",{}]]", "dict": {"owner": "anon", "deadline": 1.5},
                            "int": 7, "text": "tides", "list": [1, None]}
    cachecalls.set_many(cache, data, TTL)
    assert calls(stats) == {"set": len(data)}
    assert cache.get_many(list(data)) == data
    assert all(cache.get(key) == value for key, value in data.items())
    assert all(0 < stats.ttl(cache.make_key(key)) <= TTL for key in data)


def test_other_caches_and_no_expiry_keep_set_many(stats: redis.Redis, settings: Any) -> None:
    """Not Django's own RedisCache (a subclass may store differently), or a timeout Redis cannot
    give with SET EX: the cache's own ``set_many``."""

    class Custom(RedisCache):
        pass

    custom = Custom(f"redis://127.0.0.1:{stats.connection_pool.connection_kwargs['port']}/1", {})
    cachecalls.set_many(custom, {"a": 1, "b": 2}, TTL)
    assert calls(stats)["expire"] == 2
    cachecalls.set_many(caches["journal"], {"c": 3}, None)  # type: ignore[arg-type]
    assert stats.ttl(caches["journal"].make_key("c")) == -1  # no expiry
    assert caches["journal"].get("c") == 3


def test_set_many_raises_while_redis_is_down() -> None:
    """The journal's outage handling keeps the batches and retries when the write raises."""
    with socket.socket() as probe:  # a port nobody listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = RedisCache(f"redis://127.0.0.1:{port}/0", {"OPTIONS": {"socket_connect_timeout": 0.5}})
    with pytest.raises(redis.ConnectionError):
        cachecalls.set_many(down, {"a": 1}, TTL)


async def test_requests_share_one_redis_connection_pool(stats: redis.Redis) -> None:
    """Django gives every async context (every request) a cache object of its own, and each
    ``RedisCache`` object its own connection pool: admission, journal and circuit calls opened a
    Redis connection per stream. chatproxy's calls share one object per process."""
    from chatproxy import circuit, limits

    before = int(stats.info("stats")["total_connections_received"])

    async def one_request(index: int) -> None:  # a task: a new async context, as a request has
        for cache in (limits._cache(), resume._cache(), circuit.get_breaker().cache):
            await cachecalls.run(cache, cache.get, f"k{index}")

    for index in range(10):  # one after the other: a connection is free again each time
        await asyncio.ensure_future(one_request(index))
    opened = int(stats.info("stats")["total_connections_received"]) - before
    assert opened <= 1, opened  # one for all of them (it was one per request or more)
    assert limits._cache() is resume._cache() and type(resume._cache()) is RedisCache
