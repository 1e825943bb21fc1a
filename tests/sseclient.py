"""A small, strict SSE reader for tests: records every event and comment with its arrival time."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class SSEItem:
    at: float  # time.monotonic() when the block was complete
    kind: str  # "event" or "comment"
    event: str = ""
    id: int | None = None
    data: Any = None
    comment: str = ""
    retry: int | None = None


@dataclass
class SSEResponse:
    status: int
    headers: dict[str, str]
    started: float
    first_byte: float | None = None
    items: list[SSEItem] = field(default_factory=list)
    body: bytes = b""

    @property
    def events(self) -> list[SSEItem]:
        return [i for i in self.items if i.kind == "event"]

    def named(self, name: str) -> list[SSEItem]:
        return [i for i in self.events if i.event == name]

    @property
    def text(self) -> str:
        parts: list[str] = []
        for item in self.events:
            if item.event == "reset":
                parts = []
            elif item.event == "delta":
                parts.append(item.data["text"])
        return "".join(parts)


def parse_block(block: str, at: float) -> SSEItem | None:
    item = SSEItem(at=at, kind="event")
    data_lines = []
    comments = []
    for line in block.split("\n"):
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            item.event = value
        elif name == "id":
            item.id = int(value)
        elif name == "data":
            data_lines.append(value)
        elif name == "retry":
            item.retry = int(value)
    if data_lines:
        item.data = json.loads("\n".join(data_lines))
        return item
    if comments:
        return SSEItem(at=at, kind="comment", comment=comments[0], retry=item.retry)
    return None


async def read_sse(response: aiohttp.ClientResponse, started: float, *, stop_after: str | None = None) -> SSEResponse:
    """Read a whole SSE response (or until an event named ``stop_after``)."""
    result = SSEResponse(status=response.status, headers=dict(response.headers), started=started)
    buffer = ""
    async for chunk in response.content.iter_any():
        now = time.monotonic()
        if result.first_byte is None:
            result.first_byte = now
        result.body += chunk
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            item = parse_block(block, now)
            if item is not None:
                result.items.append(item)
                if stop_after and item.kind == "event" and item.event == stop_after:
                    return result
    return result
