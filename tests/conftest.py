"""Shared fixtures: the simulator, live servers, and database hygiene for async tests."""

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connections

pytest_plugins = ["tests.fixtures_simulator", "tests.fixtures_servers"]


@pytest.fixture
async def async_db(transactional_db):
    """The database for async tests, and no connection left behind in the threads their ORM calls used.

    Closing the in-memory SQLite test database is a no-op, so a later test without database
    access would trip over the open connection (pytest-django blocks the check Django makes on it).
    """
    from chatproxy import records

    yield
    await sync_to_async(drop_connections)()  # asgiref's thread (async ORM, Channels' auth)
    records._executor().submit(drop_connections).result()  # the record writer's thread


@pytest.fixture
async def no_stale_connections():
    """For async tests without database access whose code still runs Django's connection cleanup
    (Channels' auth does): drop connections earlier async tests left in the worker threads."""
    from chatproxy import records

    await sync_to_async(drop_connections)()
    records._executor().submit(drop_connections).result()
    yield


@pytest.fixture(autouse=True)
def no_connection_left_in_asgirefs_thread(request):
    """After a test marked ``django_db``: drop the connections its async ORM calls opened in asgiref's
    shared thread. Requests served by ``DirectStreams`` send Django's ``request_started`` there, and
    its ``close_old_connections`` would trip over such a connection in a later test without
    database access."""
    yield
    if request.node.get_closest_marker("django_db") is not None:
        SyncToAsync.single_thread_executor.submit(drop_connections).result()


@pytest.fixture
def fresh_profiles():
    """The test starts and ends with no cached profile snapshot (a rolled-back profile must not leak)."""
    from chatproxy import profiles

    profiles.forget()
    yield
    profiles.forget()


def drop_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if conn.vendor == "sqlite" and conn.is_in_memory_db():
            conn.connection = None  # the main thread's connection keeps the shared in-memory database
        else:
            conn.close()
