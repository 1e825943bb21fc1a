"""Clients that stream through nginx and time every byte they receive.

Each returns a :class:`Outcome`: the status, the text the user ends up with, the events seen, and
the arrival time of every piece of the response (headers and each body read for HTTP, each frame
for WebSocket). ``worst_silence`` is the longest gap a user waited for *anything*: from sending
the request to the first byte, and between any two later arrivals. ``total`` runs from sending
the request to the last byte.
"""

from __future__ import annotations

import asyncio
import html.parser
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

from chatproxy.policy import KNOBS
from tests.sseclient import parse_block

STREAM_CAP = 45.0  # seconds: no scenario may take longer (the workers' DEADLINE is 30 s)


@dataclass
class Outcome:
    transport: str
    status: int = 0
    text: str = ""
    events: list[str] = field(default_factory=list)  # event / frame types in order (keepalives too)
    retry_reasons: list[str] = field(default_factory=list)
    final: dict[str, Any] | None = None  # the done / error payload
    profile: str | None = None  # from the start event, where the transport shows it
    started: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    body: bytes = b""

    @property
    def keepalives(self) -> int:
        return self.events.count("keepalive")

    @property
    def worst_silence(self) -> float:
        points = [self.started, *self.arrivals]
        return max((b - a for a, b in itertools.pairwise(points)), default=float("inf"))

    @property
    def total(self) -> float:
        return (self.arrivals[-1] - self.started) if self.arrivals else float("inf")

    @property
    def first_byte(self) -> float:
        return (self.arrivals[0] - self.started) if self.arrivals else float("inf")


# --------------------------------------------------------------------------------------- sessions


class _Inputs(html.parser.HTMLParser):
    """The named form fields of a page (inputs, selects, textareas) with their current values."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        name = a.get("name")
        if tag == "input" and name:
            kind = a.get("type", "text")
            if kind in ("checkbox", "radio"):
                if "checked" in a:
                    self.values[name] = a.get("value", "on")
            elif kind not in ("submit", "button", "image", "file"):
                self.values[name] = a.get("value", "")
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and ("selected" in a or self._select not in self.values):
            self.values[self._select] = a.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.values[name] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.values[self._textarea] += data


def form_values(page: str) -> dict[str, str]:
    parser = _Inputs()
    parser.feed(page)
    return parser.values


async def admin_session(base_url: str, username: str, password: str) -> aiohttp.ClientSession:
    """An aiohttp session logged in through the admin's login form, sending the CSRF header."""
    session = aiohttp.ClientSession(base_url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                    timeout=aiohttp.ClientTimeout(total=STREAM_CAP))
    try:
        async with session.get("/admin/login/") as response:
            assert response.status == 200, response.status
            fields = form_values(await response.text())
        fields.update(username=username, password=password, next="/admin/")
        async with session.post("/admin/login/", data=fields, allow_redirects=False) as response:
            assert response.status == 302, f"admin login failed: {response.status}"
        session.headers["X-CSRFToken"] = csrf_token(session, base_url)
    except BaseException:
        await session.close()
        raise
    return session


def csrf_token(session: aiohttp.ClientSession, base_url: str) -> str:
    return session.cookie_jar.filter_cookies(yarl.URL(base_url))["csrftoken"].value


def cookie_header(session: aiohttp.ClientSession, base_url: str) -> str:
    cookies = session.cookie_jar.filter_cookies(yarl.URL(base_url))
    return "; ".join(f"{name}={morsel.value}" for name, morsel in cookies.items())


PROFILE_ADMIN = "/admin/chatproxy/timeoutprofile/"
# CHATPROXY["TIMEOUTS"] key -> TimeoutProfile field
PROFILE_FIELDS = {knob.setting: knob.field for knob in KNOBS}


def profile_values(timeouts: dict[str, Any]) -> dict[str, Any]:
    """Admin form values for a ``TIMEOUTS``-style dict."""
    return {PROFILE_FIELDS[key]: value for key, value in timeouts.items()}


async def save_profile(session: aiohttp.ClientSession, values: dict[str, Any], pk: int | None = None) -> int:
    """Add (``pk=None``) or change a TimeoutProfile through the admin's own form; returns its pk.

    The form is fetched first so every field keeps the value the admin shows unless ``values``
    says otherwise (``enabled``: a bool).
    """
    url = f"{PROFILE_ADMIN}add/" if pk is None else f"{PROFILE_ADMIN}{pk}/change/"
    async with session.get(url) as response:
        assert response.status == 200, f"GET {url}: {response.status}"
        fields = form_values(await response.text())
    for name, value in values.items():
        if isinstance(value, bool):
            if value:
                fields[name] = "on"
            else:
                fields.pop(name, None)
        else:
            fields[name] = str(value)
    fields["_continue"] = "1"
    async with session.post(url, data=fields, allow_redirects=False) as response:
        if response.status != 302:
            page = await response.text()
            errors = re.findall(r'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', page, re.S)
            raise AssertionError(f"the admin refused the profile {values}: {errors or page[:2000]}")
        location = response.headers["Location"]
    match = re.search(r"/(\d+)/change/", location)
    assert match, location
    return int(match.group(1))


# ---------------------------------------------------------------------------------------- streams


OPENAI_PATH = "/chat/v1/chat/completions"


async def _timed_post(
    session: aiohttp.ClientSession, out: Outcome, path: str, body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[tuple[float, bytes]]:
    """POST and yield ``(arrival time, chunk)`` per body chunk, recording status, body and every
    arrival (the headers' first) in ``out``; the whole exchange is capped by STREAM_CAP."""
    async with asyncio.timeout(STREAM_CAP):
        out.started = time.monotonic()
        async with session.post(path, json=body, headers=headers) as response:
            out.arrivals.append(time.monotonic())  # the headers
            out.status = response.status
            async for chunk in response.content.iter_any():
                now = time.monotonic()
                out.arrivals.append(now)
                out.body += chunk
                yield now, chunk


async def sse_stream(session: aiohttp.ClientSession, body: dict[str, Any], tag: str) -> Outcome:
    """``POST /chat/stream/`` (native SSE) with the session's cookies and CSRF header."""
    out = Outcome("sse")
    buffer = ""
    async for now, chunk in _timed_post(session, out, "/chat/stream/", body, {"X-E2E-Id": tag}):
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            item = parse_block(block, now)
            if item is None:
                continue
            if item.kind == "comment":
                if item.comment == "keepalive":
                    out.events.append("keepalive")
                continue
            _native_event(out, item.event, item.data)
    return out


def _native_event(out: Outcome, name: str, data: dict[str, Any]) -> None:
    out.events.append(name)
    if name == "start":
        out.profile = data.get("profile")
    elif name == "delta":
        out.text += data["text"]
    elif name == "reset":
        out.text = ""
    elif name == "retry":
        out.retry_reasons.append(data["reason"])
    elif name in ("done", "error"):
        out.final = {"event": name, **data}


async def openai_stream(session: aiohttp.ClientSession, api_key: str, body: dict[str, Any], tag: str) -> Outcome:
    """``POST /chat/v1/chat/completions`` with ``stream: true`` and a bearer key, on the raw wire."""
    out = Outcome("openai-stream")
    buffer = ""
    headers = {"Authorization": f"Bearer {api_key}", "X-E2E-Id": tag}
    async for _, chunk in _timed_post(session, out, OPENAI_PATH, {**body, "stream": True}, headers):
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            for line in block.split("\n"):
                if line == ": keepalive":
                    out.events.append("keepalive")
                elif line.startswith("data: "):
                    _openai_data(out, line[len("data: "):])
    return out


def _openai_data(out: Outcome, data: str) -> None:
    if data == "[DONE]":
        out.events.append("[DONE]")
        return
    payload = json.loads(data)
    if "error" in payload:
        out.events.append("error")
        out.final = {"event": "error", **payload["error"]}
        return
    out.events.append("chunk")
    for choice in payload.get("choices", []):
        out.text += choice.get("delta", {}).get("content") or ""
        if choice.get("finish_reason"):
            out.final = {"event": "done", "finish_reason": choice["finish_reason"]}


async def openai_json(session: aiohttp.ClientSession, api_key: str, body: dict[str, Any], tag: str) -> Outcome:
    """The same endpoint with ``stream: false``: one ``chat.completion`` (whitespace while waiting)."""
    out = Outcome("openai-json")
    headers = {"Authorization": f"Bearer {api_key}", "X-E2E-Id": tag}
    async for _, chunk in _timed_post(session, out, OPENAI_PATH, {**body, "stream": False}, headers):
        if not chunk.strip():
            out.events.append("keepalive")
    try:
        payload = json.loads(out.body)
    except ValueError:
        out.final = {"event": "not JSON", "body": out.body[:300]}
        return out
    if "error" in payload:
        out.final = {"event": "error", **payload["error"]}
    else:
        out.events.append("chat.completion")
        out.text = payload["choices"][0]["message"]["content"]
        out.final = {"event": "done", "finish_reason": payload["choices"][0]["finish_reason"]}
    return out


async def websocket_stream(ws_url: str, origin: str, cookie: str, body: dict[str, Any], tag: str) -> Outcome:
    """``ws/chat/`` through nginx with the session cookie; times the frames after the chat frame."""
    import websockets  # here: the legacy-SDK virtualenv collects this package without it

    out = Outcome("websocket")
    async with asyncio.timeout(STREAM_CAP):
        async with websockets.connect(f"{ws_url}/ws/chat/", origin=origin,  # type: ignore[arg-type]
                                      additional_headers={"Cookie": cookie, "X-E2E-Id": tag},
                                      open_timeout=10, ping_interval=None) as socket:
            out.status = socket.response.status_code if socket.response is not None else 0
            out.started = time.monotonic()
            await socket.send(json.dumps({"type": "chat", "request_id": tag, **body}))
            while out.final is None:
                raw = await socket.recv()
                out.arrivals.append(time.monotonic())
                frame = json.loads(raw)
                kind = frame["type"]
                if kind == "keepalive":
                    out.events.append("keepalive")
                    continue
                if frame.get("request_id") != tag:
                    raise AssertionError(f"unexpected frame {frame}")
                _native_event(out, kind, frame)
    return out
