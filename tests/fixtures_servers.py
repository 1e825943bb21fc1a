"""Live-server fixtures: the sample project under a real Daphne, streaming from the simulator.

``daphne`` is session-scoped (one server for every module that needs it); its timeouts are tiny
so faults resolve in tenths of a second. ``LIVE_TIMEOUTS`` documents them for assertions.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
import yarl

from tests.servers import AppServer

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
LIVE_LIMITS = {"MAX_STREAMS_PER_USER": 1000}


@pytest.fixture(scope="session")
def daphne(simulator):
    server = AppServer(
        {
            "CHATPROXY_SIMULATOR_URL": simulator.base_url,
            "CHATPROXY_TIMEOUTS": json.dumps(LIVE_TIMEOUTS),
            "CHATPROXY_RESUME": json.dumps(LIVE_RESUME),
            "CHATPROXY_LIMITS": json.dumps(LIVE_LIMITS),
            "DJANGO_DEBUG": "1",
            "DJANGO_LOG_LEVEL": "WARNING",
        }
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def client(daphne):
    """An aiohttp session on the live server holding a CSRF cookie, sending the token header."""
    async with aiohttp.ClientSession(daphne.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get("/") as response:
            assert response.status == 200
        token = session.cookie_jar.filter_cookies(yarl.URL(daphne.url))["csrftoken"].value
        session.headers["X-CSRFToken"] = token
        yield session
