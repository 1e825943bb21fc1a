"""The WebSocket way in: several resilient streams over one socket.

Thin like the HTTP views: frames are validated, each ``chat`` frame opens a
:class:`~chatproxy.core.ChatStream`, and one relay task per stream turns its events into frames.
Closing the socket closes every stream it opened (and so their upstream connections).

A client may send at most ``LIMITS["WS_FRAMES_PER_SECOND"]`` frames in any one-second window
(counted per socket, from its first frame of the window): one more gets an error frame
(``rate_limited``) and the socket is closed with code 4008 (1008 "policy violation" moved into the
application's range, as 4403 echoes HTTP 403: Daphne's WebSocket library lets an application
close only with 1000 or 3000-4999, so 1008 itself would fail there). Well-behaved
clients send a frame per question; a flood is a broken or hostile client, and each frame costs
validation and perhaps a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer

from chatproxy import limits, resume
from chatproxy.auth import permitted
from chatproxy.codes import ErrorCode
from chatproxy.core import ChatStream, Event
from chatproxy.responses import error_event_data, websocket_error
from chatproxy.service import StreamNotStarted, open_stream
from chatproxy.sse import event_data
from chatproxy.validation import InvalidRequest, max_body_bytes, parse_native_request

# Close code for a refused connection (4000-4999 are the application's; 4403 echoes HTTP 403).
CLOSE_FORBIDDEN = 4403
#: Close code for a client that sent frames faster than ``LIMITS["WS_FRAMES_PER_SECOND"]`` (1008 echoed).
CLOSE_POLICY_VIOLATION = 4008
KEEPALIVE_FRAME = '{"type":"keepalive"}'
logger = logging.getLogger("chatproxy.consumers")


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels ships no type information
    """``ws/chat/``: ``chat`` / ``cancel`` frames in, stream events out."""

    #: request_id -> (the stream, or None for a resumed remote one; the relay task)
    streams: dict[str, tuple[ChatStream | None, asyncio.Task[None]]]

    async def connect(self) -> None:
        self.streams = {}
        self.stream_ids: dict[str, str] = {}
        self._window_start = 0.0  # loop time the current one-second frame window began
        self._window_frames = 0
        self._flooded = False
        if not await permitted(self.scope):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.accept()

    async def disconnect(self, code: int) -> None:
        # Stop relaying; each stream then waits RESUME.GRACE seconds for a resume before it stops.
        relays = [task for _, task in getattr(self, "streams", {}).values()]
        self.streams = {}
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if await self._over_frame_cap():
            return
        raw = text_data if text_data is not None else bytes_data
        if raw is None or len(raw) > max_body_bytes():
            await self.send_error(f"Frames must be JSON text of at most {max_body_bytes()} bytes.")
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
            await self.cancel_request(request_id)
        elif kind == "resume":
            await self.resume_stream(frame)
        else:
            await self.send_error("Unknown frame 'type': use 'chat', 'cancel' or 'resume'.", request_id)

    async def _over_frame_cap(self) -> bool:
        """Count this frame; past the cap, answer once with an error frame and close with 4008."""
        if self._flooded:
            return True  # closing: frames still in flight are dropped
        cap = limits.ws_frames_per_second()
        if cap is None:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_frames = now, 0
        self._window_frames += 1
        if self._window_frames <= cap:
            return False
        self._flooded = True
        message = f"Too many frames: at most {cap} per second. The connection is closed; reconnect and slow down."
        with contextlib.suppress(Exception):  # the client may be gone already
            await self.send(text_data=websocket_error(ErrorCode.RATE_LIMITED, message=message))
            await self.close(code=CLOSE_POLICY_VIOLATION)
        return True

    async def cancel_request(self, request_id: Any) -> None:
        entry = self.streams.get(request_id) if isinstance(request_id, str) else None
        if entry is None:
            await self.send_error("No running request with that 'request_id'.", request_id)
        elif entry[0] is not None:
            entry[0].cancel()  # the stream ends with error/cancelled, relayed as usual
        else:
            try:
                await resume.cancel(self.stream_ids[request_id], self.scope.get("user"))
            except (resume.StreamNotFound, resume.JournalUnavailable) as exc:
                await self.send(text_data=_journal_error(exc, request_id))

    async def resume_stream(self, frame: dict[str, Any]) -> None:
        stream_id, after = frame.get("stream_id"), frame.get("last_event_id", 0)
        request_id = frame.get("request_id")
        if not isinstance(stream_id, str) or isinstance(after, bool) or not isinstance(after, int) or after < 0:
            await self.send_error("'resume' needs 'stream_id' (string) and 'last_event_id' (whole number).", request_id)
            return
        if not isinstance(request_id, str) or not request_id:
            request_id = stream_id
        if request_id in self.streams:
            await self.send_error("A request with this 'request_id' is already running.", request_id)
            return
        try:
            events = await resume.open_replay(stream_id, self.scope.get("user"), after)
        except (resume.StreamNotFound, resume.JournalUnavailable) as exc:
            await self.send(text_data=_journal_error(exc, request_id, stream_id=stream_id))
            return
        local = resume.journal().local(stream_id)
        self.stream_ids[request_id] = stream_id
        task = asyncio.get_running_loop().create_task(self.relay(request_id, stream_id, events))
        self.streams[request_id] = (local, task)

    async def start_chat(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("request_id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
            await self.send_error("'request_id' must be a non-empty string of at most 200 characters.")
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
        try:
            reader = await open_stream(chat_request, user=self.scope.get("user"), resumable=True,
                                       who=limits.identity_of(self.scope))
        except limits.LimitExceeded as exc:
            await self.send(text_data=websocket_error(exc.code, request_id=request_id, message=exc.message,
                                                      retry_after=exc.retry_after))
            return
        except StreamNotStarted as exc:  # logged with its cause where it was raised
            await self.send(text_data=websocket_error(exc.code, request_id=request_id))
            return
        except Exception:
            # Any other failure while starting the stream: the client gets the one friendly error
            # for this request, the socket stays open for the rest.
            logger.exception("chatproxy could not start a stream for WebSocket request %r", request_id)
            await self.send(text_data=websocket_error(ErrorCode.INTERNAL, request_id=request_id))
            return
        stream = reader.stream
        self.stream_ids[request_id] = stream.stream_id
        task = asyncio.get_running_loop().create_task(self.relay(request_id, stream.stream_id, reader))
        self.streams[request_id] = (stream, task)

    async def relay(self, request_id: str, stream_id: str, events: AsyncIterator[Event]) -> None:
        """Send one stream's events as frames until it ends."""
        head = {"request_id": request_id, "stream_id": stream_id}
        try:
            async for event in events:
                if event.name == "keepalive":
                    await self.send(text_data=KEEPALIVE_FRAME)
                    continue
                frame = {"type": event.name, **head, "seq": event.seq, **event_data(event)}
                await self.send(text_data=orjson.dumps(frame).decode())
        except Exception:
            # Never leave the client waiting on a relay that died: one friendly error ends it.
            logger.exception("chatproxy relay of stream %s failed", stream_id)
            with contextlib.suppress(Exception):
                frame = {"type": "error", **head, **error_event_data(ErrorCode.INTERNAL)}
                await self.send(text_data=orjson.dumps(frame).decode())
        finally:
            entry = self.streams.get(request_id)
            if entry is not None and entry[1] is asyncio.current_task():
                del self.streams[request_id]
                self.stream_ids.pop(request_id, None)
            close = getattr(events, "close", None) or getattr(events, "aclose", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    async def send_error(self, message: str, request_id: Any = None) -> None:
        ids = {"request_id": request_id} if isinstance(request_id, str) else {}
        await self.send(text_data=websocket_error(ErrorCode.BAD_REQUEST, message=message, **ids))


def _journal_error(exc: Exception, request_id: str, **fields: Any) -> str:
    """The error frame of a resume or cancel that the journal refused (unknown stream, or unreachable)."""
    if isinstance(exc, resume.JournalUnavailable):
        return websocket_error(ErrorCode.UNAVAILABLE, request_id=request_id, **fields, message=exc.message,
                               retry_after=exc.retry_after)
    return websocket_error(ErrorCode.NOT_FOUND, request_id=request_id, **fields,
                           message="That answer can no longer be resumed.")
