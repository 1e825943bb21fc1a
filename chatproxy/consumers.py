"""The WebSocket way in (SPEC 6.4): several resilient streams over one socket.

Thin like the HTTP views: frames are validated, each ``chat`` frame opens a
:class:`~chatproxy.core.ChatStream`, and one relay task per stream turns its events into frames.
Closing the socket closes every stream it opened (and so their upstream connections).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer

from chatproxy.auth import permitted
from chatproxy.core import ChatStream
from chatproxy.service import open_stream
from chatproxy.sse import event_data
from chatproxy.validation import InvalidRequest, parse_native_request

# Close code for a refused connection (4000-4999 are the application's; 4403 echoes HTTP 403).
CLOSE_FORBIDDEN = 4403
MAX_FRAME_BYTES = 1024 * 1024
KEEPALIVE_FRAME = '{"type":"keepalive"}'


class ChatConsumer(AsyncWebsocketConsumer):
    """``ws/chat/``: ``chat`` / ``cancel`` frames in, stream events out."""

    streams: dict[str, tuple[ChatStream, asyncio.Task[None]]]

    async def connect(self) -> None:
        self.streams = {}
        if not await permitted(self.scope):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.accept()

    async def disconnect(self, code: int) -> None:
        streams = list(getattr(self, "streams", {}).values())
        self.streams = {}
        for stream, task in streams:
            task.cancel()
            await stream.aclose()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raw = text_data if text_data is not None else bytes_data
        if raw is None or len(raw) > MAX_FRAME_BYTES:
            await self.send_error("Frames must be JSON text of at most 1 MiB.")
            return
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.send_error("The frame is not valid JSON.")
            return
        if not isinstance(frame, dict):
            await self.send_error("A frame must be a JSON object with a 'type'.")
            return
        kind = frame.get("type")
        request_id = frame.get("request_id")
        if kind == "chat":
            await self.start_chat(frame)
        elif kind == "cancel":
            entry = self.streams.get(request_id) if isinstance(request_id, str) else None
            if entry is None:
                await self.send_error("No running request with that 'request_id'.", request_id)
            else:
                entry[0].cancel()  # the stream ends with error/cancelled, relayed as usual
        else:
            await self.send_error("Unknown frame 'type': use 'chat' or 'cancel'.", request_id)

    async def start_chat(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("request_id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
            await self.send_error("'request_id' must be a non-empty string.")
            return
        if request_id in self.streams:
            await self.send_error("A request with this 'request_id' is already running.", request_id)
            return
        body = {k: v for k, v in frame.items() if k not in ("type", "request_id")}
        try:
            chat_request = parse_native_request(body)
        except InvalidRequest as exc:
            await self.send_error(exc.message, request_id)
            return
        stream = open_stream(chat_request)
        task = asyncio.get_running_loop().create_task(self.relay(request_id, stream))
        self.streams[request_id] = (stream, task)

    async def relay(self, request_id: str, stream: ChatStream) -> None:
        """Send one stream's events as frames until it ends."""
        head = {"request_id": request_id, "stream_id": stream.stream_id}
        try:
            async for event in stream:
                if event.name == "keepalive":
                    await self.send(text_data=KEEPALIVE_FRAME)
                    continue
                frame = {"type": event.name, **head, "seq": event.seq, **event_data(event)}
                await self.send(text_data=orjson.dumps(frame).decode())
        finally:
            if self.streams.get(request_id, (None,))[0] is stream:
                del self.streams[request_id]
            await stream.aclose()

    async def send_error(self, message: str, request_id: Any = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": "bad_request", "message": message}
        if isinstance(request_id, str):
            frame["request_id"] = request_id
        await self.send(text_data=orjson.dumps(frame).decode())
