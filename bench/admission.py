"""Admission cost: time per new stream to take (and give back) a ``MAX_STREAMS_PER_USER`` lease.

``python -m bench.admission [--rounds N] [--running M]``: for each cache (``LocMemCache`` in
process; Django's ``RedisCache`` against a ``redis-server`` started on a free loopback port) and
each limit (4 and 100000), one user already holds ``running`` leases, then ``rounds`` admissions
of that user each take a lease and give it back (:func:`chatproxy.limits.admit`, then
``release_now``), timed one by one on one thread. Prints the median and p99 per admission (a
markdown table, or with ``--json`` the rows for ``python -m bench --parts admission``). With a limit
of 4 the held leases are 3, so every admission succeeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import django
from django.conf import settings

LIMITS = (4, 100_000)


def _configure(redis_url: str | None) -> None:
    caches: dict[str, Any] = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    if redis_url:
        caches["redis"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url}
    settings.configure(CACHES=caches, USE_TZ=True, CHATPROXY={},
                       INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "chatproxy"])
    django.setup()


def measure(alias: str, limit: int, rounds: int, running: int) -> dict[str, Any]:
    """Median and p99 microseconds per admit + release on cache ``alias`` under ``limit``."""
    from django.core.cache import caches
    from django.test.utils import override_settings

    from chatproxy import limits

    with override_settings(CHATPROXY={"LIMITS": {"MAX_STREAMS_PER_USER": limit}, "RESUME": {"CACHE": alias}}):
        caches[alias].clear()
        who = f"u:bench-{limit}"
        held = [limits.admit(who, 330.0) for _ in range(min(running, limit - 1))]
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            limits.admit(who, 330.0).release_now()
            times.append((time.perf_counter() - started) * 1e6)
        for lease in held:
            lease.release_now()
        caches[alias].clear()
    times.sort()
    return {"cache": alias, "limit": limit, "median_us": statistics.median(times),
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))], "held": len(held)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2000, help="admissions timed per case (default 2000)")
    parser.add_argument("--running", type=int, default=200, help="leases already held (default 200)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.running)
    if args.json:
        print(json.dumps(rows))
        return
    print("\n".join(table(rows)))


def run(rounds: int, running: int) -> list[dict[str, Any]]:
    """Every (cache, limit) case, against a redis-server of its own."""
    from tests.e2e.stack import HOST, redis_ping, start_redis, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        redis, port = start_redis(Path(tmp))
        try:
            wait_until(lambda: redis_ping(port), "redis", [redis], timeout=10)
            _configure(f"redis://{HOST}:{port}/0")
            return [{**measure(alias, limit, rounds, running), "cache": name}
                    for alias, name in (("default", "LocMemCache"), ("redis", "RedisCache")) for limit in LIMITS]
        finally:
            redis.stop()


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of :func:`run`'s rows."""
    lines = ["| cache | MAX_STREAMS_PER_USER | leases held | µs per admission + release, median | p99 |",
             "|---|--:|--:|--:|--:|"]
    lines += [f"| {r['cache']} | {r['limit']} | {r['held']} | {r['median_us']:.0f} | {r['p99_us']:.0f} |" for r in rows]
    return lines


if __name__ == "__main__":
    main()
