"""Fallbacks over real HTTP, on every way in: SSE, OpenAI-compatible (streamed and not), WebSocket.

Two simulators play two providers: ``primary`` is ``UPSTREAM`` (the request's model
``gpt-4o-mini`` and its same-upstream fallback ``gpt-4o``), ``backup`` is the named upstream
``backup`` (``backup:gpt-4.1-mini``). Faults are the simulators' per-model rules, so each test says
which target is down. The server runs the installed SDK (``UPSTREAM.SDK`` "current" / "legacy"): this module is
marked ``upstream`` and also runs in the legacy-SDK virtualenv, where the OpenAI-compatible endpoint
is driven by ``openai.ChatCompletion.acreate`` instead of ``AsyncOpenAI``.

The simulator's text depends on the conversation only, not the model: whichever target answers, the
answer must be exactly the one a healthy model gives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import websockets

from chatproxy.simulator.process import SimulatorProcess
from chatproxy.upstream import detect_sdk
from tests.fixtures_servers import LIVE_LIMITS, LIVE_TIMEOUTS
from tests.servers import AppServer, simulator_env
from tests.sseclient import read_sse

pytestmark = pytest.mark.upstream

CURRENT_SDK = hasattr(openai, "AsyncOpenAI")
BACKUP_KEY = "sk-backup-provider-0123456789"  # must never reach a client or a log
PRIMARY_KEY = "sk-simulator"  # the sample project's key for the simulator
TIMEOUTS = {**LIVE_TIMEOUTS, "MAX_ATTEMPTS": 3}
COOLDOWN = 1.5
FAILURES = 2
WAYS = ["sse", "openai-stream", "openai", "responses", "websocket"]
_unique = itertools.count()


@pytest.fixture(scope="module")
def primary() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(quiet=True) as sim:
        yield sim


@pytest.fixture(scope="module")
def backup() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(quiet=True) as sim:
        yield sim


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatproxy-fallback-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server_env(primary: SimulatorProcess, backup: SimulatorProcess, cache_dir: Path) -> dict[str, str]:
    env = simulator_env(
        primary.base_url, log_level="INFO", timeouts=TIMEOUTS, limits=LIVE_LIMITS,
        upstreams={"backup": {"BASE_URL": backup.base_url, "API_KEY": BACKUP_KEY},
                   # the same provider's Messages API: an Anthropic-style upstream (its BASE_URL has no /v1)
                   "claude": {"BASE_URL": backup.url, "API_KEY": BACKUP_KEY, "SDK": "anthropic"}},
        fallbacks={"gpt-4o-mini": ["gpt-4o", "backup:gpt-4.1-mini", "claude:claude-sim"]},
        circuit={"FAILURES": FAILURES, "COOLDOWN": COOLDOWN},
    )
    # A file cache the test can wipe between tests (every circuit closed again), shared by the
    # processes of this machine as Redis is by workers; the installed SDK.
    env.update({"DJANGO_CACHE_DIR": str(cache_dir), "REDIS_URL": "", "CHATPROXY_SDK": detect_sdk() or "none"})
    return env


@pytest.fixture(scope="module")
def server(primary, backup, cache_dir) -> Iterator[AppServer]:
    app = AppServer(server_env(primary, backup, cache_dir), capture_stderr=True).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def api_key(server) -> str:
    server.manage("createsuperuser", "--noinput", "--username", "fallback", "--email", "f@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "fallback-pass-123"})
    return server.manage("chatproxy_key", "create", "fallback", "--name", "tests").strip()


@pytest.fixture
async def fresh(primary, backup, cache_dir, server):
    """Both providers healthy, every circuit closed; afterwards, no request left running anywhere."""
    primary.reset()
    backup.reset()
    for entry in cache_dir.iterdir():
        entry.unlink(missing_ok=True)
    yield
    for sim in (primary, backup):
        await sim.await_until(lambda s: s["active_requests"] == 0, timeout=3.0)


@dataclass
class Answer:
    text: str
    model: str | None = None  # the model the way in says answered
    error: str | None = None  # the error code (or OpenAI error type) it ended with
    fallbacks: list[str] = field(default_factory=list)  # the retry events' fallback fields (SSE, WebSocket)
    resets: int = 0
    raw: str = ""  # everything the client received, to look for keys


def question() -> str:
    return f"Tell me about estuaries #{next(_unique)} [[sim chunks=12]]"


async def healthy_text(sim: SimulatorProcess, content: str) -> str:
    """What a healthy model answers to ``content`` (asked from the simulator directly)."""
    body = {"model": "healthy-reference", "messages": [{"role": "user", "content": content}]}
    async with aiohttp.ClientSession() as session, session.post(
        f"{sim.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer x"}
    ) as response:
        return str((await response.json())["choices"][0]["message"]["content"])


async def ask(way: str, server: AppServer, api_key: str, content: str) -> Answer:
    messages = [{"role": "user", "content": content}]
    if way == "sse":
        async with aiohttp.ClientSession(server.url) as session, session.post(
            "/chat/stream/", json={"messages": messages}
        ) as response:
            result = await read_sse(response, time.monotonic())
        end = result.events[-1]
        return Answer(result.text, end.data.get("model"), end.data.get("code"),
                      [r.data["fallback"] for r in result.named("retry") if "fallback" in r.data],
                      len(result.named("reset")), result.body.decode())
    if way == "websocket":
        url = server.url.replace("http://", "ws://") + "/ws/chat/"
        frames: list[dict[str, Any]] = []
        async with websockets.connect(url, origin=server.url.replace("127.0.0.1", "localhost")) as socket:
            await socket.send(json.dumps({"type": "chat", "request_id": "r1", "messages": messages}))
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await asyncio.wait_for(socket.recv(), 15)))
        text = ""
        for frame in frames:
            text = "" if frame["type"] == "reset" else text + (frame["text"] if frame["type"] == "delta" else "")
        end = frames[-1]
        return Answer(text, end.get("model"), end.get("code"),
                      [f["fallback"] for f in frames if f["type"] == "retry" and "fallback" in f],
                      sum(f["type"] == "reset" for f in frames), json.dumps(frames))
    if way == "responses":  # the Responses API, over plain HTTP (the legacy SDK has no client for it)
        headers = {"Authorization": f"Bearer {api_key}"}
        async with aiohttp.ClientSession(server.url) as session, session.post(
            "/chat/v1/responses", json={"model": "gpt-4o-mini", "input": content}, headers=headers
        ) as response:
            raw = await response.text()
        body = json.loads(raw)
        if response.status != 200 or body.get("status") == "failed":
            error = body.get("error") or {}
            return Answer("", error=str(error.get("code") or error.get("type")), raw=raw)
        text = "".join(part["text"] for item in body["output"] for part in item.get("content") or ())
        return Answer(text, body["model"], raw=raw)
    return await (ask_current if CURRENT_SDK else ask_legacy)(way == "openai-stream", server, api_key, messages)


async def ask_current(stream: bool, server: AppServer, api_key: str, messages: list[dict[str, str]]) -> Answer:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/chat/v1", api_key=api_key, max_retries=0, timeout=20)
    try:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True)]  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return Answer(text, chunks[-1].model, raw="".join(c.model_dump_json() for c in chunks))
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        return Answer(completion.choices[0].message.content or "", completion.model, raw=completion.model_dump_json())
    except openai.APIStatusError as exc:
        return Answer("", error=str(exc.code or exc.type), raw=str(exc.body))
    except openai.APIError as exc:  # the in-band error of a stream
        return Answer("", error=str(exc.code or getattr(exc, "type", "")), raw=str(exc.body))
    finally:
        await client.close()


async def ask_legacy(stream: bool, server: AppServer, api_key: str, messages: list[dict[str, str]]) -> Answer:
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "messages": messages, "api_key": api_key,
                              "api_base": f"{server.url}/chat/v1", "request_timeout": 20}
    try:
        if stream:
            chunks = [c async for c in await openai.ChatCompletion.acreate(stream=True, **kwargs)]  # type: ignore[attr-defined]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            return Answer(text, chunks[-1]["model"], raw=json.dumps(chunks))
        completion = await openai.ChatCompletion.acreate(**kwargs)  # type: ignore[attr-defined]
        return Answer(completion["choices"][0]["message"]["content"], completion["model"], raw=json.dumps(completion))
    except openai.error.OpenAIError as exc:  # type: ignore[attr-defined]
        body = exc.json_body or {}
        return Answer("", error=str((body.get("error") or {}).get("code") or type(exc).__name__), raw=str(body))


async def answered(way: str, server: AppServer, api_key: str, reference: SimulatorProcess) -> Answer:
    """A new question asked on ``way``: its answer must be complete and exactly what a healthy model
    gives (asked of ``reference`` afterwards, as the model ``healthy-reference``)."""
    content = question()
    answer = await ask(way, server, api_key, content)
    assert answer.error is None and answer.text == await healthy_text(reference, content)
    return answer


def models_asked(sim: SimulatorProcess) -> list[str]:
    return [r["model"] for r in sim.requests()]


def assert_no_key(*texts: str) -> None:
    for text in texts:
        assert BACKUP_KEY not in text and PRIMARY_KEY not in text


# ------------------------------------------------------------------------------ every way in


@pytest.mark.parametrize("way", WAYS)
async def test_primary_down_the_same_upstream_fallback_answers_exactly(way, server, api_key, primary, backup,
                                                                        fresh):
    primary.set_fault("gpt-4o-mini", "status=503")
    answer = await answered(way, server, api_key, primary)
    assert answer.model == "gpt-4o"
    assert models_asked(primary) == ["gpt-4o-mini"] * 3 + ["gpt-4o", "healthy-reference"]
    assert models_asked(backup) == []
    if way in ("sse", "websocket"):
        assert answer.fallbacks == ["gpt-4o"]
    assert_no_key(answer.raw)


@pytest.mark.parametrize("way", WAYS)
async def test_both_models_down_the_second_provider_answers(way, server, api_key, primary, backup, fresh):
    primary.set_fault("*", "status=503")
    answer = await answered(way, server, api_key, backup)
    assert answer.model == "gpt-4.1-mini"
    assert models_asked(primary) == ["gpt-4o-mini"] * 3 + ["gpt-4o"] * 3
    assert models_asked(backup)[0] == "gpt-4.1-mini"
    if way in ("sse", "websocket"):
        assert answer.fallbacks == ["gpt-4o", "backup:gpt-4.1-mini"]
    assert_no_key(answer.raw)


@pytest.mark.parametrize("way", WAYS)
async def test_every_openai_model_down_an_anthropic_upstream_answers(way, server, api_key, primary, backup, fresh):
    primary.set_fault("*", "status=503")
    backup.set_fault("gpt-4.1-mini", "status=503")
    answer = await answered(way, server, api_key, backup)
    assert answer.model == "claude-sim"
    assert [(r["model"], r["api"]) for r in backup.requests()][-2:] == [
        ("claude-sim", "messages"), ("healthy-reference", "chat.completions")]
    if way in ("sse", "websocket"):
        assert answer.fallbacks == ["gpt-4o", "backup:gpt-4.1-mini", "claude:claude-sim"]
    assert_no_key(answer.raw)


@pytest.mark.parametrize("way", WAYS)
async def test_a_request_error_never_falls_back(way, server, api_key, primary, backup, fresh):
    primary.set_fault("gpt-4o-mini", "status=400")
    answer = await ask(way, server, api_key, question())
    assert answer.error in ("bad_request", "invalid_request_error", "InvalidRequestError")
    assert models_asked(primary) == ["gpt-4o-mini"] and models_asked(backup) == []


@pytest.mark.parametrize("way", WAYS)
async def test_every_attempt_hangs_the_fallback_answers_within_the_deadline(way, server, api_key, primary, backup,
                                                                              fresh):
    primary.set_fault("*", "stall_first=30")
    started = time.monotonic()
    answer = await answered(way, server, api_key, backup)
    elapsed = time.monotonic() - started  # the reference question included: a few milliseconds
    assert answer.model == "gpt-4.1-mini"
    # Each hanging target is left at its first-token deadline, at once: nothing was lost.
    assert models_asked(primary) == ["gpt-4o-mini", "gpt-4o"]
    assert 2 * TIMEOUTS["FIRST_TOKEN"] <= elapsed < 2 * TIMEOUTS["FIRST_TOKEN"] + 2.0 < TIMEOUTS["DEADLINE"]


@pytest.mark.parametrize("way", WAYS)
async def test_a_stream_cut_mid_answer_completes_on_the_fallback(way, server, api_key, primary, backup, fresh):
    primary.set_fault("gpt-4o-mini", "reset_after=5")
    answer = await answered(way, server, api_key, primary)
    assert answer.model == "gpt-4o" and answer.resets == 0  # the fallback repeated the start: seamless


@pytest.mark.parametrize("way", ["sse", "openai-stream"])
async def test_stalls_mid_answer_everywhere_the_last_provider_completes(way, server, api_key, primary, backup,
                                                                         fresh):
    primary.set_fault("*", "stall_after=4 stall=30")
    answer = await answered(way, server, api_key, backup)
    # One more try after the first stall on each target (a seamless restart), then the next target,
    # although MAX_ATTEMPTS would allow a third.
    assert models_asked(primary) == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4o"]
    assert answer.resets == 0


# ------------------------------------------------------------------------------ circuits


async def test_the_circuit_opens_then_a_probe_closes_it(server, api_key, primary, backup, fresh):
    primary.set_fault("gpt-4o-mini", "status=503")
    for _ in range(FAILURES):
        assert (await ask("sse", server, api_key, question())).model == "gpt-4o"
    assert models_asked(primary).count("gpt-4o-mini") == 3 * FAILURES
    # Open: later requests skip the failing target, on every way in.
    for way in WAYS:
        answer = await ask(way, server, api_key, question())
        assert answer.model == "gpt-4o" and answer.fallbacks == []
    assert models_asked(primary).count("gpt-4o-mini") == 3 * FAILURES
    # After the cooldown one request probes it; it has recovered, so the circuit closes.
    primary.clear_faults("gpt-4o-mini")
    await asyncio.sleep(COOLDOWN + 0.1)
    assert (await ask("sse", server, api_key, question())).model == "gpt-4o-mini"
    assert (await ask("openai", server, api_key, question())).model == "gpt-4o-mini"
    assert models_asked(primary).count("gpt-4o-mini") == 3 * FAILURES + 2


async def test_circuits_are_shared_by_the_workers(server, api_key, primary, backup, cache_dir, fresh):
    other = AppServer(server_env(primary, backup, cache_dir)).start()  # a second worker process
    try:
        primary.set_fault("gpt-4o-mini", "status=503")
        for _ in range(FAILURES):
            assert (await ask("sse", server, api_key, question())).model == "gpt-4o"
        before = models_asked(primary).count("gpt-4o-mini")
        # The other worker never saw the primary fail, yet skips it: the circuit is in the shared cache.
        answer = await ask("sse", other, api_key, question())
        assert answer.model == "gpt-4o" and answer.fallbacks == []
        assert models_asked(primary).count("gpt-4o-mini") == before
    finally:
        other.stop()


async def test_nothing_leaks(server, api_key, primary, backup, fresh):
    primary.set_fault("*", "reset_after=3")
    for way in WAYS:
        answer = await ask(way, server, api_key, question())
        assert answer.model == "gpt-4.1-mini"
        assert_no_key(answer.raw)
    for sim in (primary, backup):
        await sim.await_until(lambda s: s["active_requests"] == 0, timeout=3.0)
    log = server.log()
    assert "circuit of default:gpt-4o-mini opened" in log  # the INFO log is captured, and says what happened
    assert_no_key(log)


@pytest.fixture
def fallback_continues(server):
    """The fallback model's own profile says ON_PARTIAL "continue" (the request's model restarts)."""
    code = ("from chatproxy.models import TimeoutProfile as P; P.objects.create(name='continue', "
            "model_pattern='gpt-4o', on_partial='continue', **{k: v for k, v in P.objects.get(name='default')"
            ".__dict__.items() if k.endswith(('_timeout', '_interval', '_max', '_initial', 'deadline', 'attempts'))})")
    server.manage("shell", "-c", code)
    yield
    server.manage("shell", "-c", "from chatproxy.models import TimeoutProfile as P; P.objects.filter(name='continue')"
                                 ".delete()")


@pytest.mark.parametrize("way", ["sse", "openai-stream"])
async def test_a_cut_answer_is_continued_on_a_fallback_that_takes_a_prefill(way, server, api_key, primary, backup,
                                                                           fallback_continues, fresh):
    primary.set_fault("gpt-4o-mini", "reset_after=5")
    answer = await answered(way, server, api_key, primary)
    assert answer.model == "gpt-4o" and answer.resets == 0
    asked = [r for r in primary.requests() if r["model"] == "gpt-4o"]
    assert [r["continuation"] for r in asked] == [True]  # the fallback was asked to continue, not restart


@pytest.mark.parametrize("way", ["sse", "openai-stream"])
async def test_a_fallback_refusing_the_prefill_is_restarted(way, server, api_key, primary, backup,
                                                            fallback_continues, fresh):
    primary.set_fault("gpt-4o-mini", "reset_after=5")
    primary.set_fault("gpt-4o", "no_prefill")
    answer = await answered(way, server, api_key, primary)
    assert answer.model == "gpt-4o" and answer.resets == 0  # the restart repeated the start: seamless
    asked = [(r["continuation"], r["status"]) for r in primary.requests() if r["model"] == "gpt-4o"]
    assert asked == [(True, 400), (False, 200)]  # refused the prefill, then answered from scratch
    assert models_asked(backup) == []  # the refusal did not count as the target failing
