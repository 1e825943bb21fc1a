"""The journal in an in-process cache: its keys go once their TTL has passed.

LocMemCache drops an expired entry only when the key is read again or the cache is full, so without
the journal's own sweep every finished stream's batches would stay in memory up to MAX_ENTRIES.
"""

from __future__ import annotations

import asyncio

from django.core.cache import caches

from chatproxy import resume
from chatproxy.core import ChatStream
from tests.scripted import ScriptedUpstream, say
from tests.test_core_unit import REQUEST, P


def keys_of(stream_id: str) -> list[str]:
    # The cache's own entries, expired ones included (what it holds in memory).
    return [key for key in caches["default"]._cache if stream_id in key]


async def answered(*texts: str) -> ChatStream:
    stream = ChatStream(ScriptedUpstream([say(*texts)]), REQUEST, P, persistent=True).start()
    await resume.track(stream, None)
    assert [e.name async for e in stream][-1] == "done"
    for _ in range(40):  # the journal writes it within a flush or two, then forgets it
        if stream.stream_id not in resume.journal().tracked:
            break
        await asyncio.sleep(resume.FLUSH_INTERVAL)
    return stream


async def test_expired_journal_entries_leave_the_in_process_cache(settings) -> None:
    settings.CHATPROXY = {"RESUME": {"CACHE": "default", "TTL": 1}, "RECORDS": {"ENABLED": False}}
    caches["default"].clear()
    first = await answered("a", "b")
    assert len(keys_of(first.stream_id)) >= 2  # its meta and a batch
    await asyncio.sleep(1.1)  # past TTL: expired, but LocMem still holds them
    second = await answered("c")  # the journal runs again, and sweeps
    assert keys_of(first.stream_id) == []
    assert len(keys_of(second.stream_id)) >= 2  # a live entry stays
    await first.aclose()
    await second.aclose()
