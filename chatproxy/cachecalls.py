"""Django cache calls from the event loop, without a thread hop where none is needed.

Django's ``cache.aget()`` & co. run the blocking method in a thread for every backend (a thread hop,
which costs CPU and latency on every call). For an in-process backend (``LocMemCache``,
``DummyCache``) that only guards memory with a lock and never waits for I/O, so chatproxy calls it
directly on the event loop; any other backend (Redis, Memcached, database, file) still gets its
thread, and every call site batches its work into one such hop.

:func:`set_many` writes many keys with one expiry in the fewest commands the backend allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient

T = TypeVar("T")


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
