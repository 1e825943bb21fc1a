"""chatproxy.inflight: which cancellations of a request in flight it obeys, and how the drain ends.

The server here is the test: it runs :func:`chatproxy.inflight.serve` in a task and cancels that
task the way Daphne does (``application_close_timeout`` after a disconnect, ``kill_all_applications``
at shutdown). The real servers are driven in ``tests/test_operations.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatproxy import inflight


class Request:
    """An ASGI app standing for a response being sent: it waits for ``release``, then sends its end."""

    def __init__(self, read_disconnect: bool = False) -> None:
        self.release = asyncio.Event()
        self.read_disconnect = read_disconnect
        self.sent: list[dict[str, Any]] = []
        self.cancelled = False
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            if self.read_disconnect:
                assert (await receive())["type"] == "http.disconnect"
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"the end"})
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(inflight.serve(self, {"type": "http"}, self.inbox.get, self.send))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_cancellation_while_not_stopping_is_obeyed_at_once() -> None:
    request = Request()
    task = request.start()
    await settle()
    assert inflight.in_flight() == 1 and not inflight.stopping()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert request.cancelled and request.sent == [] and inflight.in_flight() == 0


async def test_the_shutdown_cancellation_lets_the_request_finish() -> None:
    request = Request()
    task = request.start()
    await settle()
    inflight.begin()
    task.cancel()  # Daphne's kill_all_applications
    await settle()
    assert not task.done() and not request.cancelled and inflight.stopping()
    finishing = asyncio.ensure_future(inflight.finish(5.0))
    await settle()
    assert not finishing.done()  # it waits for the request
    request.release.set()
    assert await asyncio.wait_for(finishing, 1.0) == (1, 0)
    await task  # ends normally
    assert request.sent == [{"type": "http.response.body", "body": b"the end"}]
    assert inflight.in_flight() == 0


async def test_a_request_whose_client_left_is_not_kept() -> None:
    """Stopping, but the client is gone (its disconnect was read): the cancellation is obeyed."""
    request = Request(read_disconnect=True)
    task = request.start()
    await request.inbox.put({"type": "http.disconnect"})
    await settle()
    inflight.begin()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert request.cancelled and request.sent == []


async def test_what_outlives_the_drain_is_cancelled() -> None:
    request = Request()
    task = request.start()
    await settle()
    inflight.begin()
    task.cancel()
    assert await inflight.finish(0.2) == (1, 1)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert request.cancelled and request.sent == [] and inflight.in_flight() == 0


async def test_finish_without_requests_returns_at_once() -> None:
    assert await asyncio.wait_for(inflight.finish(30.0), 0.5) == (0, 0)


async def test_a_second_cancellation_while_held_is_held_too() -> None:
    """Held requests stay held whatever else cancels them while the server stops, until finish()."""
    request = Request()
    task = request.start()
    await settle()
    inflight.begin()
    for _ in range(2):
        task.cancel()
        await settle()
    assert not task.done()
    request.release.set()
    await asyncio.wait_for(task, 1.0)
    assert request.sent and not request.cancelled
