"""ASGI application for benchmark servers: ``project.asgi.application``, plus opt-in bench knobs.

* ``BENCH_NO_JOURNAL=1`` makes ``POST /chat/stream/`` open its streams with ``resumable=False``:
  no journal, no grace period, no event persistence -- the per-chunk cost of resumability is the
  difference to the default. (There is no setting for that yet: ``RESUME.GRACE = 0`` still
  journals every event.) This patches the view module's reference only; nothing else changes.
* ``BENCH_DJANGO_PATH=1``: ``POST /chat/stream/`` through Django's handler and middleware (the
  project's ``http`` app is ``RequestSizeGuard`` instead of ``DirectStreams``), for comparison.
* ``BENCH_GC_UNFREEZE=1``: undo the ``gc.freeze()`` of ``project/asgi.py``, for comparison.
* ``BENCH_GC_THRESHOLD=a,b,c``: ``gc.set_threshold(a, b, c)``.
* ``BENCH_DIAG=1``: ``GET /_bench/diag`` (below).
* Always: ``GET /_bench/info`` (before Django): the upstream adapter in use (``UPSTREAM.SDK`` as
  detected, ``HTTP_CLIENT``, openai's version), so results say what was measured, and the number
  of asyncio tasks alive in the server's loop (the soak part watches it).
"""

import asyncio
import functools
import os

from project.asgi import application

if os.environ.get("BENCH_DJANGO_PATH") == "1":
    # Every request through Django's handler and middleware, as with the plain RequestSizeGuard.
    from chatproxy.asgi import RequestSizeGuard

    application.application_mapping["http"] = RequestSizeGuard(application.application_mapping["http"].app)

if os.environ.get("BENCH_NO_JOURNAL") == "1":
    from chatproxy import views

    _open_stream = views.open_stream

    @functools.wraps(_open_stream)
    async def _open_stream_not_resumable(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["resumable"] = False
        return await _open_stream(*args, **kwargs)

    views.open_stream = _open_stream_not_resumable

if os.environ.get("BENCH_DIAG") == "1":
    # Diagnostics for the harness, served at GET /_bench/diag (before Django): CPU time spent in the
    # cyclic garbage collector per generation, the number of tracked objects and their commonest types, with
    # BENCH_GC_GARBAGE=1 the types of the objects that collections freed, and with
    # BENCH_TRACEMALLOC=1 Python heap growth since the previous call (the first call takes the
    # baseline snapshot).
    import collections
    import gc
    import json
    import time
    import tracemalloc

    # generation -> [collections, CPU seconds, longest pause (wall seconds)]
    _gc_stats = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
    _gc_started = [0.0, 0.0]

    def _gc_callback(phase, info):  # type: ignore[no-untyped-def]
        # CPU time of the collecting thread (wall time would count preemption on a busy machine),
        # and the wall-clock pause, which is what a stream waiting on this event loop feels.
        if phase == "start":
            _gc_started[0] = time.thread_time()
            _gc_started[1] = time.perf_counter()
        else:
            entry = _gc_stats[info["generation"]]
            entry[0] += 1
            entry[1] += time.thread_time() - _gc_started[0]
            entry[2] = max(entry[2], time.perf_counter() - _gc_started[1])

    gc.callbacks.append(_gc_callback)
    if os.environ.get("BENCH_TRACEMALLOC") == "1":
        tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "10")))
    if os.environ.get("BENCH_GC_GARBAGE") == "1":
        gc.set_debug(gc.DEBUG_SAVEALL)  # collected cycles go to gc.garbage: counted, then dropped
    _baseline: list[tracemalloc.Snapshot] = []

    def _diag() -> dict:
        tracked = gc.get_objects()
        out: dict = {"gc": {str(k): v for k, v in _gc_stats.items()}, "gc_objects": len(tracked),
                     "time": time.monotonic(),
                     "gc_types": collections.Counter(
                         f"{type(o).__module__}.{type(o).__qualname__}" for o in tracked).most_common(30)}
        del tracked
        if gc.get_debug() & gc.DEBUG_SAVEALL:
            kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            out["garbage"] = kinds.most_common(40)
            out["garbage_total"] = len(gc.garbage)
            gc.garbage.clear()
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            if not _baseline:
                out["tracemalloc"] = None
            else:
                out["tracemalloc"] = [
                    {"size_diff": s.size_diff, "count_diff": s.count_diff,
                     "frames": [(f.filename, f.lineno) for f in s.traceback]}
                    for s in snapshot.compare_to(_baseline[0], "traceback") if s.size_diff > 0
                ]
            _baseline[:] = [snapshot]
        return out

    _application = application

    async def application(scope, receive, send):  # type: ignore[no-redef,no-untyped-def]
        if scope["type"] == "http" and scope["path"] == "/_bench/diag":
            body = json.dumps(_diag()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await _application(scope, receive, send)

_with_diag = application


async def application(scope, receive, send):  # type: ignore[no-redef,no-untyped-def]
    if scope["type"] == "http" and scope["path"] == "/_bench/info":
        import importlib.metadata
        import json as _json

        from chatproxy.conf import get_config
        from chatproxy.upstream import resolve_sdk

        upstream = get_config()["UPSTREAM"]
        sdk = resolve_sdk(upstream["SDK"])
        body = _json.dumps({"sdk": sdk, "http_client": upstream["HTTP_CLIENT"],
                            "openai": importlib.metadata.version("openai"),
                            "tasks": len(asyncio.all_tasks())}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    await _with_diag(scope, receive, send)


if os.environ.get("BENCH_GC_UNFREEZE") == "1":
    import gc as _gc

    _gc.unfreeze()  # undo project/asgi.py's gc.freeze(), for comparison

if os.environ.get("BENCH_GC_THRESHOLD"):
    import gc as _gc

    _gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC_THRESHOLD"].split(",")))
