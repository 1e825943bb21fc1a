"""A TimeoutProfile saved in one worker's admin governs the next requests served by the other.

Worker A and worker B share the SQLite database and Redis (the profile version token lives in
Django's Redis cache). The admin is used on A directly and the streams go to B directly, so
which process did what is certain. Each step waits the documented re-check interval
(``chatproxy.profiles.CHECK_INTERVAL``) and then looks at the very next stream on B.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatproxy.profiles import CHECK_INTERVAL
from tests.e2e import clients
from tests.e2e.stack import ADMIN_PASSWORD, ADMIN_USER, WORKER_TIMEOUTS, Site

pytestmark = pytest.mark.e2e


async def test_profile_saved_on_one_worker_applies_on_the_other(site: Site, sim) -> None:
    worker_a, worker_b = site.workers[:2]
    model = f"e2e-switch-{site.kind}-{uuid.uuid4().hex[:6]}"
    name = f"e2e {model}"
    admin_a = await clients.admin_session(worker_a.url, ADMIN_USER, ADMIN_PASSWORD)
    user_b = await clients.admin_session(worker_b.url, ADMIN_USER, ADMIN_PASSWORD)

    async def stream_on_b(directive: str) -> clients.Outcome:
        content = f"Explain tides ({uuid.uuid4().hex[:8]}) [[sim chunks=4 {directive}]]"
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        out = await clients.sse_stream(user_b, body, f"profile-{model}")
        assert out.status == 200 and out.final is not None and out.final["event"] == "done", (out.status, out.final)
        return out

    async def after_a_change() -> None:
        await asyncio.sleep(CHECK_INTERVAL + 0.2)

    try:
        # B has served this model under the default profile (and holds that snapshot).
        out = await stream_on_b("first_delay=1.5 times=1")
        assert out.profile == "default"
        assert out.retry_reasons == []  # the default profile waits FIRST_TOKEN 2 s

        # A adds a profile for the model that gives up on a first token after 1 s.
        strict = {**WORKER_TIMEOUTS, "FIRST_TOKEN": 1.0}
        pk = await clients.save_profile(
            admin_a, {"name": name, "model_pattern": model, "enabled": True, **clients.profile_values(strict)}
        )
        await after_a_change()
        out = await stream_on_b("first_delay=1.5 times=1")
        assert out.profile == name
        assert out.retry_reasons == ["first_token"]

        # A relaxes it to 4 s: B's next stream waits out the same 1.5 s silence without a retry.
        await clients.save_profile(admin_a, {"first_token_timeout": 4.0}, pk=pk)
        await after_a_change()
        out = await stream_on_b("first_delay=1.5 times=1")
        assert out.profile == name
        assert out.retry_reasons == []
        assert out.total >= 1.5

        # A disables it: B is back on the default profile.
        await clients.save_profile(admin_a, {"enabled": False}, pk=pk)
        await after_a_change()
        out = await stream_on_b("chunks=2")
        assert out.profile == "default"
    finally:
        await admin_a.close()
        await user_b.close()
    await sim.await_until(lambda s: s["active_requests"] == 0 and s["open_connections"] == 0, timeout=5)
