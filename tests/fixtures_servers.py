"""Live-server fixtures: the sample project under a real Daphne, streaming from the simulator.

``daphne`` is session-scoped (one server for every module that needs it); its timeouts are tiny
so faults resolve in tenths of a second. ``LIVE_TIMEOUTS`` documents them for assertions.
"""

from __future__ import annotations

import aiohttp
import pytest
import yarl

from tests.servers import AppServer, simulator_env

LIVE_TIMEOUTS = {
    "CONNECT": 1.0,
    "FIRST_TOKEN": 1.0,
    "STALL": 0.5,
    "DEADLINE": 20.0,
    "BACKOFF_INITIAL": 0.05,
    "BACKOFF_MAX": 0.2,
    "KEEPALIVE": 0.3,
    "GATEWAY": 2.0,
}
LIVE_RESUME = {"GRACE": 0.6, "TTL": 60}
# Tests drive many streams at once as one visitor; the limits have their own servers (test_limits.py).
# Their WebSocket clients send frames back to back (tests/test_fuzz.py: 23 in a row).
LIVE_LIMITS = {"MAX_STREAMS_PER_USER": 1000, "WS_FRAMES_PER_SECOND": 40}


@pytest.fixture(scope="session")
def daphne(simulator):
    server = AppServer(
        simulator_env(simulator.base_url, timeouts=LIVE_TIMEOUTS, resume=LIVE_RESUME, limits=LIVE_LIMITS)
    ).start()
    yield server
    server.stop()


async def csrf_session(url: str) -> aiohttp.ClientSession:
    """An aiohttp session on a live server holding its CSRF cookie and sending the token header,
    as a page of that server would (the caller closes it)."""
    session = aiohttp.ClientSession(url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with session.get("/") as response:
        assert response.status == 200
    session.headers["X-CSRFToken"] = session.cookie_jar.filter_cookies(yarl.URL(url))["csrftoken"].value
    return session


@pytest.fixture
async def client(daphne):
    """:func:`csrf_session` on the live server."""
    async with await csrf_session(daphne.url) as session:
        yield session


def new_api_key(server: AppServer, username: str) -> str:
    """A superuser ``username`` on ``server`` and a fresh API key of theirs (``chatproxy_key create``)."""
    server.manage("createsuperuser", "--noinput", "--username", username, "--email", f"{username}@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": f"{username}-pass-123"})
    return server.manage("chatproxy_key", "create", username, "--name", "tests").strip()
