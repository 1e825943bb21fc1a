"""Django cache calls from the event loop, without a thread hop where none is needed.

Django's ``cache.aget()`` & co. run the blocking method in a thread for every backend (a thread hop,
which costs CPU and latency on every call). For an in-process backend (``LocMemCache``,
``DummyCache``) that only guards memory with a lock and never waits for I/O, so chatproxy calls it
directly on the event loop; any other backend (Redis, Memcached, database, file) still gets its
thread, and every call site batches its work into one such hop.

:func:`set_many` writes many keys with one expiry in the fewest commands the backend allows.

:func:`cache` is the cache object chatproxy's own calls use: one per process for Django's
``RedisCache``. Django gives every request (every async context) a cache object of its own, and a
``RedisCache`` object has its own connection pool: each stream opened a Redis connection (TCP
connect, ``HELLO``) for its admission and journal calls, left for the garbage collector to close.
redis-py's pool is thread-safe, so one object serves the event loop and the threads the calls run in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient

T = TypeVar("T")

_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def cache(alias: str) -> Any:
    """The Django cache ``alias`` for chatproxy's calls: a process-wide object for Django's own
    ``RedisCache`` (one connection pool per process), Django's per-context object otherwise."""
    shared = _shared.get(alias)
    if shared is not None:
        return shared
    current = caches[alias]
    if type(current) is not RedisCache:
        return current
    with _shared_lock:
        if alias not in _shared:
            _shared[alias] = caches.create_connection(alias)  # Django never closes it: nor does anyone need to
        return _shared[alias]


def forget_shared(**kwargs: Any) -> None:
    """Drop the process-wide cache objects (``CACHES`` changed: connected to ``setting_changed``)."""
    if kwargs.get("setting", "CACHES") == "CACHES":
        with _shared_lock:
            _shared.clear()


def in_process(cache: Any) -> bool:
    """Whether ``cache`` lives in this process and never blocks on I/O."""
    return isinstance(cache, (LocMemCache, DummyCache))


async def run(cache: Any, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` (blocking calls on ``cache``): inline for an in-process cache, else in a thread."""
    if in_process(cache):
        return func(*args)
    result: T = await sync_to_async(func, thread_sensitive=False)(*args)
    return result


def _redis_client(cache: Any) -> Any:
    """The ``RedisCacheClient`` of ``cache`` if that is Django's own ``RedisCache``, else None."""
    client = getattr(cache, "_cache", None) if type(cache) is RedisCache else None
    return client if type(client) is RedisCacheClient else None


def set_many(cache: Any, data: dict[str, Any], timeout: int) -> None:
    """``cache.set_many(data, timeout)`` (blocking; raises what the cache raises while it is down).

    Django's ``RedisCache.set_many`` sends ``MULTI``, ``MSET``, then an ``EXPIRE`` per key and
    ``EXEC``: two commands per key. For Django's own ``RedisCache`` (not a subclass, which may
    store differently) this sends one pipeline, without a transaction, of ``SET key value EX
    timeout`` per key: one command per key, with the keys and values Django's ``set`` would write
    (its key function and serializer), so ``cache.get`` reads them as usual. Commands run in order
    on one connection, so a reader never sees a key without the ones written before it. Any other
    cache gets its own ``set_many``.
    """
    client = _redis_client(cache)
    backend_timeout = cache.get_backend_timeout(timeout)
    if client is None or not backend_timeout:
        cache.set_many(data, timeout)
        return
    dumps = client._serializer.dumps  # the client's pickle serializer (Django's set and get use it)
    pipeline = client.get_client(None, write=True).pipeline(transaction=False)
    for key, value in data.items():
        pipeline.set(cache.make_and_validate_key(key), dumps(value), ex=backend_timeout)
    pipeline.execute()
