"""Resumable streams in a real headless Chromium: a network drop and a page reload mid-answer.

The issue (9): "The JS client resumes by itself after a network drop and after a page reload
within TTL, and the user sees the answer continue, not restart." Each test checks that the final
answer equals the clean answer exactly (nothing lost, nothing repeated), that the text only ever
grew (no restart), that the upstream was asked once (the server kept generating; no new attempt),
and prints the resume latency the browser saw.

Same setup as ``tests/test_browser.py`` (Debian's ``/usr/bin/chromium`` through playwright, a
module-scoped Daphne with small timeouts, screenshots in ``test-artifacts/screenshots/``, any
console error fails the test) plus:

* ``CHATPROXY_RESUME='{"GRACE": 5, "TTL": 60}'``: the server keeps generating 5 s after the client
  leaves, so a stream survives a reload.
* **The network drop** goes through :class:`Relay`, a TCP relay on this module's event loop between
  the browser and Daphne (the page is loaded from the relay, so the fetch and the WebSocket go
  through it). ``Relay.cut()`` resets both sides of every open connection (SO_LINGER 0, so an RST
  rather than a FIN): the browser's streaming fetch fails mid-body and the WebSocket closes with
  1006, as when the network goes away, and Daphne sees its client vanish (the grace period starts).
  Playwright's offline emulation (``context.set_offline(True)``) cannot do this: in Chromium it
  leaves an established streaming fetch running (the text kept arriving) and holds a WebSocket's
  frames without closing it (and, now and then, even the close event of a socket cut meanwhile,
  until the browser is online again). It is used for what it does do: ``navigator.onLine`` turns
  false and new requests fail, so the "outage" case (offline, cut, online again OUTAGE_S later)
  checks that the client waits for the ``online`` event instead of spending its resume attempts.
* **The reload** is ``page.reload()`` mid-answer: the page records the conversation, the stream id
  and the last event id in sessionStorage while the answer streams, and the new page shows the
  conversation again and resumes (GET with Last-Event-ID, or the WebSocket ``resume`` frame).
* Observation across a reload: :data:`WATCH_INIT_JS` is an init script (it runs in every new
  document, before the page's own scripts), so the new page's restore and resume are seen from its
  first mutation. Times are epoch milliseconds (``performance.timeOrigin + performance.now()``),
  comparable with the test's ``time.time()`` on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import socket
import struct
import time

import pytest
import pytest_asyncio

from tests.browser_watch import WATCH_INIT_JS
from tests.servers import AppServer, simulator_env
from tests.test_browser import (
    TIMEOUTS,
    UI_TIMEOUT_MS,
    Console,
    assert_no_reset,
    browser,  # noqa: F401 (a fixture)
    clean_answer,
    screenshot_and_close,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

RESUME = {"GRACE": 5, "TTL": 60}
# Answers of N words, 50 ms apart: 2 s to interrupt once, 3 s to reload twice.
DROP_WORDS = 40
RELOAD_WORDS = 60
ANSWER_TIMEOUT_S = 20.0
OUTAGE_S = 1.0  # how long the "outage" case stays offline (the scenario, not a wait)
RESUME_KEY = "chatproxy.resume"
# What Chromium logs for the failures these tests cause on purpose.
RESET_ERROR = "Failed to load resource: net::ERR_CONNECTION_RESET"
NOT_FOUND_ERROR = "Failed to load resource: the server responded with a status of 404 (Not Found)"


def paced(words: int) -> str:
    return f"[[sim chunks={words} gap=0.05]]"


def unpaced(words: int) -> str:
    """The same answer text without the pacing (gap only changes timing): the clean reference."""
    return f"[[sim chunks={words}]]"


_unique = itertools.count(1)
_run = secrets.token_hex(3)


def unique_message(topic: str) -> str:
    return f"Tell me about {topic} {_run}-{next(_unique)}"


# --------------------------------------------------------------------------------------------
# A TCP relay whose connections the test can cut
# --------------------------------------------------------------------------------------------


class Relay:
    """Forwards 127.0.0.1:<port> to the app server; :meth:`cut` resets every open connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> int:
        """Reset both sides of every open connection (an RST each way); returns how many."""
        pairs = list(self.pairs)
        self.pairs.clear()
        for pair in pairs:
            for writer in pair:
                _reset(writer)
        return len(pairs)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(client_writer)
            return
        pair = (client_writer, upstream_writer)
        self.pairs.add(pair)
        self.connections += 1
        try:
            await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        finally:
            if pair in self.pairs:
                self.pairs.discard(pair)
                for writer in pair:
                    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()  # pass a half-close on
    except (ConnectionError, OSError, RuntimeError):
        pass


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_server(simulator):
    server = AppServer(simulator_env(simulator.base_url, timeouts=TIMEOUTS, resume=RESUME)).start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def relay(app_server):
    relay = await Relay(app_server.port).start()
    yield relay
    await relay.stop()


class ExpectingConsole(Console):
    """Console, plus the exact messages a test causes on purpose (and says it expects)."""

    def __init__(self, page) -> None:
        super().__init__(page)
        self.expected: set[str] = set()
        self.seen_expected: list[str] = []

    def expect(self, text: str) -> None:
        self.expected.add(text)

    def _on_console(self, message) -> None:
        if message.type == "error" and message.text in self.expected:
            self.seen_expected.append(message.text)
            return
        super()._on_console(message)


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser, relay, sim, request):  # noqa: F811 (pytest passes the imported fixture)
    context = await browser.new_context(base_url=relay.url, viewport={"width": 900, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    await context.add_init_script(WATCH_INIT_JS)
    page = await context.new_page()
    page.console = ExpectingConsole(page)
    await page.goto("/")
    await ready(page)
    try:
        yield page
    finally:
        await screenshot_and_close(page, request)
    problems = page.console.problems
    assert not problems, "unexpected browser console output:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# Watching the page, across reloads
# --------------------------------------------------------------------------------------------

LAST_ANSWER_JS = "() => [...document.querySelectorAll('.msg.assistant')].pop()?.textContent ?? null"


async def ready(page) -> None:
    await page.wait_for_function("document.querySelector('#chat')?.dataset.busy !== undefined")


async def send(page, text: str, *, transport: str, rearm: bool = False) -> None:
    """Send `text`; `rearm` when an earlier answer of this document was already watched."""
    if rearm:
        await page.evaluate("window.__cpArm()")
    await page.select_option("#transport", transport)
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def finished(page, within: float = ANSWER_TIMEOUT_S) -> dict[str, list[dict]]:
    try:
        return await asyncio.wait_for(page.evaluate("window.__cpFinished"), within)
    except TimeoutError:
        log = await page.evaluate("window.__cpLog")
        raise AssertionError(f"the answer did not finish within {within} s; last states: {log[-5:]}") from None


async def words_at_least(page, n: int) -> str:
    """Wait until the newest answer is streaming with at least `n` words; returns its text."""
    await page.wait_for_function(
        "(n) => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a && a.dataset.state === 'streaming' && a.textContent.split(' ').filter(Boolean).length >= n; }",
        arg=n,
    )
    return await page.evaluate(LAST_ANSWER_JS)


async def recorded(page) -> dict | None:
    raw = await page.evaluate(f"sessionStorage.getItem('{RESUME_KEY}')")
    return json.loads(raw) if raw else None


def now_ms() -> float:
    return time.time() * 1000


def resumed_at(log: list[dict], since: float, before_text: str) -> dict:
    """The first snapshot after `since` whose text is longer than `before_text`."""
    return next(e for e in log if e["t"] >= since and len(e["text"]) > len(before_text))


def upstream_requests(sim) -> list[dict]:
    """The simulator requests of the page's answer (its pacing tells it from the clean one)."""
    return [r for r in sim.requests() if r["faults"].get("gap") == 0.05]


async def assert_finished_cleanly(
    page, sim, text: str, words: int, seen: dict, history: tuple[str, str] | None = None
) -> str:
    """The answer to `text` (after the exchange `history`, if any) is done and exactly the clean one."""
    log = seen["log"]
    assert log[-1]["state"] == "done", log[-3:]
    answer = await page.evaluate(LAST_ANSWER_JS)
    messages = [{"role": "user", "content": f"{text} {unpaced(words)}"}]
    if history:
        messages[:0] = [{"role": "user", "content": history[0]}, {"role": "assistant", "content": history[1]}]
    clean = await clean_answer(page, messages)
    assert answer == clean, f"the answer differs from the clean one:\n{answer!r}\n{clean!r}"
    assert len(answer.split()) == words
    assert_no_reset(seen["texts"])
    assert await page.locator(".msg-note").last.is_hidden()
    await page.wait_for_function("document.getElementById('status').textContent === 'Done.'")
    assert await recorded(page) is None, "the record was not cleared when the answer ended"
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
    # The server kept generating while the browser was away: one upstream request, no restart.
    requests = upstream_requests(sim)
    assert [(r["attempt"], r["outcome"]) for r in requests] == [(1, "complete")], requests
    return answer


# --------------------------------------------------------------------------------------------
# (a) A network drop mid-answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", [False, True], ids=["reset", "outage"])
@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_network_drop_mid_answer_continues_the_answer(page, sim, relay, transport, outage):
    """reset: every connection is reset once, the network stays up. outage: the browser goes
    offline, the connections are reset, and it comes back online OUTAGE_S later."""
    text = unique_message("estuaries")
    resume_requests: list[tuple[str, str | None]] = []  # (method, Last-Event-ID)
    sockets: list[str] = []
    resume_url = re.compile(r"/chat/stream/[A-Za-z0-9]+/$")

    def on_request(request) -> None:
        if resume_url.search(request.url):
            resume_requests.append((request.method, request.headers.get("last-event-id")))

    page.on("request", on_request)
    page.on("websocket", lambda ws: sockets.append(ws.url))
    # Chromium reports the cut of the streaming fetch (a WebSocket's close is not logged).
    page.console.expect(RESET_ERROR)

    await send(page, f"{text} {paced(DROP_WORDS)}", transport=transport)
    await words_at_least(page, 8)
    assert (await recorded(page) or {}).get("transport") == transport

    online_at = None
    if outage:
        await page.context.set_offline(True)  # first: no resume attempt can get through
    cut_at = now_ms()
    assert relay.cut() >= 1
    if outage:
        await asyncio.sleep(OUTAGE_S)  # the length of the outage: the scenario, not a wait
        assert await page.evaluate("navigator.onLine") is False
        assert resume_requests == [] and len(sockets) <= 1, "the client tried to resume while offline"
        online_at = now_ms()
        await page.context.set_offline(False)
    else:
        await page.wait_for_function(
            "() => [...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'reconnecting'"
        )

    seen = await finished(page)
    log = seen["log"]
    reconnecting = next(e for e in log if e["t"] >= cut_at and e["state"] == "reconnecting")
    if outage and transport == "sse":
        # The cut fetch fails at once; the client then waited for `online` (no request above).
        assert reconnecting["t"] < online_at, "the drop was not noticed while offline"
    # WebSocket: Chromium's offline emulation sometimes holds a socket's close event until the
    # browser is online again (not a real network's behaviour), so the drop may show only then.
    before = max((e for e in log if e["t"] <= reconnecting["t"]), key=lambda e: len(e["text"]))["text"]
    first_new = resumed_at(log, reconnecting["t"], before)
    await assert_finished_cleanly(page, sim, text, DROP_WORDS, seen)
    assert reconnecting["note"] == "Reconnecting…"
    # One resume: a GET with Last-Event-ID over SSE, a second socket over WebSocket.
    if transport == "sse":
        [(method, last_event_id)] = resume_requests
        assert method == "GET" and last_event_id.isdigit() and int(last_event_id) > 8, resume_requests
        assert len(sockets) == 0
        assert page.console.seen_expected == [RESET_ERROR]
    else:
        assert resume_requests == []
        assert len(sockets) == 2, sockets

    detect = reconnecting["t"] - cut_at
    total = first_new["t"] - cut_at
    extra = f"; back online -> new text {first_new['t'] - online_at:.0f} ms" if online_at else ""
    if online_at and reconnecting["t"] >= online_at:
        extra += " (Chromium held the socket's close until online)"
    print(
        f"\n[{transport}, {'outage' if outage else 'reset'}] drop -> reconnecting shown {detect:.0f} ms;"
        f" drop -> first new text {total:.0f} ms{extra}"
    )
    if not outage:
        assert detect < 2000
        assert total < 3000


# --------------------------------------------------------------------------------------------
# (b) A page reload mid-answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_reload_mid_answer_continues_the_answer(page, sim, transport):
    """Two reloads while the answer streams: each time the conversation comes back, with the
    answer so far, and the answer continues where it was."""
    first = unique_message("harbours")
    await send(page, first, transport=transport)
    first_answer = (await finished(page))["log"][-1]["text"]
    assert first_answer.strip()
    assert await recorded(page) is None

    text = unique_message("tides")
    question = f"{text} {paced(RELOAD_WORDS)}"
    await send(page, question, transport=transport, rearm=True)
    await words_at_least(page, 8)
    record = await recorded(page)
    assert record and record["transport"] == transport and record["user"] == question
    assert record["turns"] == [{"user": first, "text": first_answer, "final": {"type": "done", "data": {}}}]

    latencies = []
    for reload_number in (1, 2):
        shown = await page.evaluate(LAST_ANSWER_JS)
        reload_at = now_ms()
        await page.reload()
        # The conversation is back at once, the answer resuming where it was.
        assert await page.locator(".msg.user").all_text_contents() == [first, question]
        assert (await page.locator(".msg.assistant").all_text_contents())[0] == first_answer
        if reload_number == 1:
            await words_at_least(page, len(shown.split()) + 8)
        else:
            seen = await finished(page)
        log = await page.evaluate("window.__cpLog")
        restored = next(e for e in log if e["text"])
        assert restored["state"] == "reconnecting", log[:3]
        assert restored["text"].startswith(shown), "the reload lost text the user had seen"
        first_new = resumed_at(log, restored["t"], restored["text"])
        navigation = await page.evaluate("performance.timeOrigin")
        latencies.append(
            f"reload {reload_number}: reload() -> first new text {first_new['t'] - reload_at:.0f} ms"
            f" (navigation start -> restored text {restored['t'] - navigation:.0f} ms,"
            f" restored -> first new text {first_new['t'] - restored['t']:.0f} ms)"
        )

    answer = await assert_finished_cleanly(page, sim, text, RELOAD_WORDS, seen, history=(first, first_answer))
    assert answer.startswith(restored["text"])
    assert (await page.locator(".msg.assistant").first.get_attribute("data-state")) == "done"
    print(f"\n[{transport}] " + "\n[{transport}] ".join(latencies).replace("{transport}", transport))

    # The answer is over: a reload now shows the page as it always was (nothing to continue).
    await page.reload()
    await ready(page)
    assert await page.locator("#conversation > *").count() == 0


async def test_stop_after_a_reload_cancels_the_resumed_stream(page, sim):
    text = unique_message("currents")
    await send(page, f"{text} {paced(RELOAD_WORDS)}", transport="sse")
    await words_at_least(page, 5)
    await page.reload()
    await words_at_least(page, 10)
    cancel_url = re.compile(r"/chat/stream/[A-Za-z0-9]+/cancel/$")
    async with page.expect_response(lambda r: bool(cancel_url.search(r.url))) as cancel:
        await page.click("#stop")
    response = await cancel.value
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    assert response.request.headers.get("x-csrftoken") == cookies["csrftoken"]
    assert response.status == 202
    await sim.await_until(lambda s: s["active_requests"] == 0, 2.0)
    log = (await finished(page, within=5))["log"]
    assert log[-1]["state"] == "error" and log[-1]["code"] == "cancelled"
    assert await recorded(page) is None
    assert [r["outcome"] for r in upstream_requests(sim)] == ["client_disconnected"]


# --------------------------------------------------------------------------------------------
# A stream the server no longer has
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_reload_after_the_stream_expired_keeps_the_partial_answer(page, transport):
    """The record names a stream the server does not have (as after RESUME.TTL): the page shows
    the conversation and the partial answer, with a friendly note instead of an error."""
    unknown = secrets.token_hex(16)
    partial = "Lakes are bodies of water surrounded by"
    page.console.expect(NOT_FOUND_ERROR)  # the resume GET's answer, over SSE
    await page.evaluate(
        """([key, streamId, transport, partial]) => {
          sessionStorage.setItem(key, JSON.stringify({
            v: 1, transport, streamId, user: "Tell me about lakes",
            turns: [{ user: "Hi", text: "Hello! How can I help?", final: { type: "done", data: {} } }],
          }));
          sessionStorage.setItem(key + ".progress", JSON.stringify({ streamId, lastEventId: 9, text: partial }));
        }""",
        [RESUME_KEY, unknown, transport, partial],
    )
    await page.reload()
    seen = await finished(page, within=5)
    last = seen["log"][-1]
    assert last["state"] == "error" and last["code"] == "expired", seen["log"]
    assert last["text"] == partial
    assert last["note"].startswith("The rest of this answer is no longer available")
    assert "TTL" not in last["note"] and "404" not in last["note"]
    assert await page.locator(".msg-note").last.get_attribute("data-kind") == "notice"
    assert await page.locator(".msg.user").all_text_contents() == ["Hi", "Tell me about lakes"]
    assert await recorded(page) is None
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
    assert page.console.seen_expected == ([NOT_FOUND_ERROR] if transport == "sse" else [])
