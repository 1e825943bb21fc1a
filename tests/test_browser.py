"""The demo page in a real headless Chromium: typing, streaming, recovery, stop, text-only rendering.

The browser is Debian's ``/usr/bin/chromium`` (``scripts/ensure-debian-packages.sh`` installs it),
driven by the Python ``playwright`` package, whose wheel bundles the driver: nothing is downloaded
at run time (``playwright install`` is never needed). Each module run launches one browser; each
test gets a fresh browser context (own cookies and localStorage) and page.

The page talks to a real Daphne serving the sample project, which streams from the simulator over
real HTTP, with timeouts small enough for a stall to be noticed in about a second.

How the tests observe the page: before sending, ``WATCH_JS`` installs a MutationObserver on the
conversation that logs a timestamped snapshot (``performance.now()``) of the newest answer's
``data-state``, text and note on every change, and resolves a promise once the answer reaches
``done`` or ``error``. Tests await that promise with an explicit timeout and then inspect the log,
so short-lived states (``reconnecting``) are never missed and nothing waits a fixed time.

Every test saves a screenshot to ``test-artifacts/screenshots/<test name>.png`` and fails on any
console error, uncaught page exception or dialog (``alert``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
from pathlib import Path

import pytest
import pytest_asyncio

playwright_api = pytest.importorskip("playwright.async_api")

from tests.browser_watch import WATCH_INIT_JS  # noqa: E402
from tests.servers import AppServer, simulator_env  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("CHATPROXY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

TIMEOUTS = {
    "STALL": 1.0,
    "FIRST_TOKEN": 2.0,
    "KEEPALIVE": 0.5,
    "GATEWAY": 3.0,
    "BACKOFF_INITIAL": 0.05,
    "BACKOFF_MAX": 0.2,
}
# Generous upper bounds for a loaded 2-core machine; a healthy run needs a fraction of each.
ANSWER_TIMEOUT_S = 15.0
UI_TIMEOUT_MS = 10_000

# The fault menu of templates/index.html, by visible label (the values are simulator directives).
STALL_MID_ANSWER = "Stall mid-answer"
DIVERGENT_RESTART = "Divergent restart"
LONG_ANSWER = "Long answer"
PRIMARY_DOWN = "Primary down (a fallback model answers)"

_unique = itertools.count(1)
_run = secrets.token_hex(3)


def unique_message(topic: str) -> str:
    return f"Tell me about {topic} {_run}-{next(_unique)}"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_server(simulator):
    """Daphne with this module's timeouts (STALL 1 s: a clear stall, yet no false alarm on a busy CI)."""
    # With the demo's fallback (as the sample project ships it with the simulator).
    server = AppServer(simulator_env(simulator.base_url, timeouts=TIMEOUTS,
                                     fallbacks={"gpt-4o-mini": ["gpt-4o"]})).start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing: run scripts/ensure-debian-packages.sh (Debian package chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: a skip there would hide a broken install step
        pytest.skip(reason)
    async with playwright_api.async_playwright() as pw:
        # launch() gives every browser a fresh temporary user-data dir, deleted on close.
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def screenshot_and_close(page, request) -> None:
    """Keep the page's last state in test-artifacts/screenshots/<test name>.png, then close its context."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    try:
        await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    finally:
        await page.context.close()


class Console:
    """Console errors, uncaught exceptions and dialogs seen by one page."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught exception: {error}"))
        page.on("dialog", self._on_dialog)

    def _on_console(self, message) -> None:
        if message.type not in ("error", "assert"):
            return
        url = (message.location or {}).get("url", "")
        self.problems.append(f"console.{message.type}: {message.text} ({url})")

    async def _on_dialog(self, dialog) -> None:
        self.problems.append(f"dialog {dialog.type}: {dialog.message}")
        await dialog.dismiss()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser, app_server, sim, request):
    context = await browser.new_context(base_url=app_server.url, viewport={"width": 900, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = await context.new_page()
    console = Console(page)
    await page.goto("/")
    await page.wait_for_function("document.querySelector('#chat')?.dataset.busy === 'false'")
    try:
        yield page
    finally:
        await screenshot_and_close(page, request)
    assert not console.problems, "unexpected browser console output:\n" + "\n".join(console.problems)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# Arms the watcher for the next answer (see tests/browser_watch.py): window.__cpFinished resolves
# with {log, texts} once it is done or in error.
WATCH_JS = "() => {" + WATCH_INIT_JS + "}"


async def choose(page, *, transport: str = "sse", fault: str | None = None) -> None:
    await page.select_option("#transport", transport)
    if fault is not None:
        await page.select_option("#fault", label=fault)


async def send(page, text: str, *, typed: bool = False) -> None:
    """Put `text` in the message box and press Enter, with the watcher armed first."""
    await page.evaluate(WATCH_JS)
    prompt = page.locator("#prompt")
    if typed:
        await prompt.click()
        await prompt.press_sequentially(text)
    else:
        await prompt.fill(text)
    await prompt.press("Enter")


async def finished(page, within: float = ANSWER_TIMEOUT_S) -> dict[str, list[dict]]:
    """The watcher's {log, texts} once the answer is done or in error (at most `within` s)."""
    try:
        return await asyncio.wait_for(page.evaluate("window.__cpFinished"), within)
    except TimeoutError:
        log = await page.evaluate("window.__cpLog")  # the snapshots so far
        raise AssertionError(f"the answer did not finish within {within} s; last states: {log[-5:]}") from None


async def clean_answer(page, conversation: str | list[dict[str, str]]) -> str:
    """What chatproxy answers with no fault to `conversation` (a message text, or the messages):
    POST /chat/stream/ from the page's context."""
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    response = await page.request.post(
        "/chat/stream/",
        data={"messages": messages},
        headers={"X-CSRFToken": cookies["csrftoken"]},
        timeout=ANSWER_TIMEOUT_S * 1000,
    )
    assert response.status == 200, await response.text()
    events = []
    for block in re.split(r"\r?\n\r?\n", await response.text()):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    assert events and events[-1][0] == "done", events[-3:]
    return "".join(data["text"] for name, data in events if name == "delta")


async def answered_with(page, topic: str, *, transport: str, fault: str) -> tuple[str, dict[str, list[dict]], str]:
    """Ask a new question about ``topic`` with ``fault`` on ``transport``; once the answer is done:
    the question, the watcher's {log, texts} and the answer shown."""
    text = unique_message(topic)
    await choose(page, transport=transport, fault=fault)
    await send(page, text)
    seen = await finished(page)
    state, answer = await answer_state(page)
    assert state == "done", seen["log"][-3:]
    return text, seen, answer


async def answer_state(page) -> tuple[str, str]:
    answer = page.locator(".msg.assistant").last
    return await answer.get_attribute("data-state"), await answer.text_content()


def stall_timing(log: list[dict]) -> dict[str, float]:
    """From the watcher's log: first text, the reconnecting state, the first resumed text (ms)."""
    first_text = next(e for e in log if e["text"])
    reconnecting = next(i for i, e in enumerate(log) if e["state"] == "reconnecting" or e["note"])
    before = log[reconnecting]["text"]
    resumed = next(e for e in log[reconnecting:] if len(e["text"]) > len(before))
    last_before = max(e["t"] for e in log[:reconnecting] if e["text"] == before)
    return {
        "first_text_to_resumed_ms": resumed["t"] - first_text["t"],
        "gap_ms": resumed["t"] - last_before,
        "reconnecting_at_ms": log[reconnecting]["t"] - first_text["t"],
    }


def assert_no_reset(texts: list[dict]) -> None:
    values = [e["text"] for e in texts]
    for earlier, later in itertools.pairwise(values):
        assert later.startswith(earlier), f"the answer was rewritten: {earlier!r} -> {later!r}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_enter_streams_the_full_answer(page, transport):
    text = unique_message("lakes")
    await choose(page, transport=transport)
    await send(page, text, typed=True)
    seen = await finished(page)
    log = seen["log"]

    state, answer = await answer_state(page)
    assert state == "done", log[-3:]
    assert answer == await clean_answer(page, text)
    assert answer.strip()
    assert_no_reset(seen["texts"])
    assert any(e["state"] == "streaming" and e["text"] for e in log)  # it did stream
    assert await page.locator(".msg.user").last.text_content() == text
    await page.wait_for_function("document.getElementById('status').textContent === 'Done.'")
    assert await page.input_value("#prompt") == ""
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_stall_mid_answer_recovers_seamlessly(page, sim, transport):
    text, seen, answer = await answered_with(page, "rivers", transport=transport, fault=STALL_MID_ANSWER)
    log = seen["log"]
    assert any(e["state"] == "reconnecting" for e in log), "the reconnecting state was never shown"
    assert any(e["note"] == "Reconnecting…" for e in log)
    assert_no_reset(seen["texts"])
    assert answer == await clean_answer(page, text)
    assert await page.locator(".msg-note").last.is_hidden()
    await page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Done (recovered after 2 attempts')"
    )
    timing = stall_timing(log)
    print(
        f"\n[{transport}] stall mid-answer: first text -> resumed text {timing['first_text_to_resumed_ms']:.0f} ms"
        f" (reconnecting shown at +{timing['reconnecting_at_ms']:.0f} ms; last text before the stall"
        f" -> resumed {timing['gap_ms']:.0f} ms; STALL = {TIMEOUTS['STALL']} s)"
    )
    # Recovered by the stall deadline (STALL), not by some longer timeout; loose for a busy CI.
    assert TIMEOUTS["STALL"] * 1000 * 0.5 <= timing["gap_ms"] <= timing["first_text_to_resumed_ms"] < 6000
    upstream = [r for r in sim.requests() if r["faults"].get("stall_after")]
    assert [r["attempt"] for r in upstream] == [1, 2], upstream


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_primary_down_a_fallback_model_answers(page, sim, transport):
    text, seen, answer = await answered_with(page, "deltas", transport=transport, fault=PRIMARY_DOWN)
    assert any(e["note"] == "Switching to gpt-4o…" for e in seen["log"]), seen["log"]
    assert answer == await clean_answer(page, text)  # the fallback's answer, exactly
    await page.wait_for_function(
        "document.getElementById('status').textContent.endsWith('answered by gpt-4o).')")
    tried = [r["model"] for r in sim.requests() if "only" in r["faults"]]
    assert tried == ["gpt-4o-mini"] * 3 + ["gpt-4o"], tried


async def test_divergent_restart_replaces_the_partial_answer(page):
    await choose(page, fault=DIVERGENT_RESTART)
    await send(page, unique_message("harbours"))
    seen = await finished(page)
    log = seen["log"]

    state, answer = await answer_state(page)
    assert state == "done", log[-3:]
    reconnecting = next(e for e in log if e["state"] == "reconnecting")
    before = reconnecting["text"]
    assert before.strip(), "no partial answer was shown before the retry"
    # The reset cleared the partial text, then the new answer streamed in its place.
    values = [e["text"] for e in seen["texts"]]
    assert (before, "") in itertools.pairwise(values), f"the partial text was never cleared: {values}"
    assert answer.strip() and answer != before
    assert not answer.startswith(before)
    await page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Done (recovered after 2 attempts')"
    )


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_stop_button_ends_the_stream_and_the_upstream_request(page, sim, transport):
    await choose(page, transport=transport, fault=LONG_ANSWER)  # 200 words, 0.03 s apart
    await send(page, unique_message("glaciers"))
    answer = page.locator(".msg.assistant").last
    await page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a && a.dataset.state === 'streaming' && a.textContent.split(' ').length > 3; }"
    )
    await sim.await_until(lambda s: s["active_requests"] == 1, 2.0)
    assert await page.is_enabled("#stop")

    if transport == "sse":
        # Aborting the fetch only detaches the client (a resumable stream waits RESUME.GRACE for
        # a resume): the page also asks the server to stop, with the session's CSRF token.
        cancel_url = re.compile(r"/chat/stream/[A-Za-z0-9]+/cancel/$")
        async with page.expect_response(lambda r: bool(cancel_url.search(r.url))) as cancel:
            await page.click("#stop")
        response = await cancel.value
        cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
        assert response.request.method == "POST"
        assert response.request.headers.get("x-csrftoken") == cookies["csrftoken"]
        assert response.status == 202, await response.text()
    else:
        await page.click("#stop")  # a cancel frame on the socket
    await sim.await_until(lambda s: s["active_requests"] == 0, 1.0)

    log = (await finished(page, within=5))["log"]
    assert log[-1]["state"] == "error"
    assert await answer.get_attribute("data-error-code") == "cancelled"
    assert await page.locator(".msg-note").last.text_content() == "Stopped."
    stopped_text = await answer.text_content()
    assert stopped_text.strip() and len(stopped_text.split()) < 200
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
    outcomes = [r["outcome"] for r in sim.requests()]
    assert outcomes == ["client_disconnected"], outcomes


async def test_html_in_messages_is_shown_as_text(page):
    payload = "<img src=x onerror=alert(1)> <b>bold</b>"
    text = f"{unique_message('tags')} {payload}"
    await send(page, text)
    log = (await finished(page))["log"]

    assert log[-1]["state"] == "done"
    user = page.locator(".msg.user").last
    assert await user.text_content() == text
    assert payload in await user.inner_text()  # rendered literally, visible to the reader
    assert await page.locator("#conversation img, #conversation b").count() == 0
    assert await page.evaluate("document.images.length") == 0
    # The answer is text nodes only, too.
    assert await page.evaluate(
        "[...document.querySelectorAll('.msg')].every((m) => [...m.childNodes].every((n) => n.nodeType === 3))"
    )


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_a_tool_call_is_rendered_and_a_stall_inside_it_stays_invisible(page, sim, transport):
    await choose(page, transport=transport, fault="Tool call, stall inside its arguments")
    await send(page, unique_message("the weather in Paris"))
    log = (await finished(page))["log"]

    assert log[-1]["state"] == "done", log[-3:]
    call = page.locator(".msg.assistant").last.locator(".chatproxy-tool-call")
    assert await call.count() == 1
    assert (await call.get_attribute("data-call-id")).startswith("call_")
    assert await call.locator(".chatproxy-tool-name").text_content() == "get_weather"
    assert set(json.loads(await call.locator(".chatproxy-tool-arguments").text_content())) == {"city", "unit"}
    upstream = [r for r in sim.requests() if r["faults"].get("stall_after")]
    assert [r["attempt"] for r in upstream] == [1, 2], upstream
