"""Django cache calls from the event loop, without a thread hop where none is needed.

Django's ``cache.aget()`` & co. run the blocking method in a thread for every backend (a thread hop,
which costs CPU and latency on every call). For an in-process backend (``LocMemCache``,
``DummyCache``) that only guards memory with a lock and never waits for I/O, so chatproxy calls it
directly on the event loop; any other backend (Redis, Memcached, database, file) still gets its
thread, and every call site batches its work into one such hop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache

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
