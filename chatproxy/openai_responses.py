"""The Responses API way in: ``POST /chat/v1/responses`` and ``GET /chat/v1/responses/<id>``.

The official client's ``client.responses.create(...)`` pointed at ``base_url=".../chat/v1"`` works
unmodified. A thin transport over the same resilient stream as every other way in: the request
becomes a chat request (``instructions`` a leading system message, ``input`` the messages; the
upstream is spoken to in Chat Completions, which every adapter speaks), and the stream's events
become the Responses API's typed events, each with a ``sequence_number`` that grows by one:

    response.created, response.in_progress,
    response.output_item.added, response.content_part.added    (with the first text)
    response.output_text.delta ...
    response.output_text.done, response.content_part.done, response.output_item.done
    response.output_item.added                                  (a function_call, at a tool call)
    response.function_call_arguments.delta ...
    response.function_call_arguments.done, response.output_item.done
    response.output_item.added, response.content_part.added    (a refusal: its own message item)
    response.refusal.delta ..., response.refusal.done, response.content_part.done, ...
    response.completed | response.incomplete | (error, response.failed)

Retries are invisible (an SSE comment keeps the connection warm meanwhile, as keepalives do); a
restart that diverges from text already sent cannot be expressed, so it fails the response. Output
items are opened as their content starts and closed before the next one opens, so each function
call takes its own ``output_index`` beside the message. The stream's ``reasoning`` events are
left out: a chat upstream's raw reasoning is not the summary a Responses reasoning item carries.

Resume. A stored response (``store``, the default) is the stream's journal: ``GET
/chat/v1/responses/<id>?stream=true&starting_after=N`` rebuilds the typed events from the
journaled stream events (the mapping is deterministic, so the numbers are the same ones) and sends
those after ``N``, then live ones, from any worker, to the owner only. ``GET`` without ``stream``
answers the response object as it stands. ``background: true`` keeps generating after the client
leaves (else the stream waits ``RESUME.GRACE`` seconds for a resume, then stops); a background
request without ``stream`` is answered at once with the ``queued`` response, to be polled.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from chatproxy import resume, sse
from chatproxy.codes import ErrorCode
from chatproxy.core import Event, Subscription
from chatproxy.messages import friendly_message
from chatproxy.openai_views import JsonAnswer, admit, admit_json, final_code, start
from chatproxy.responses import openai_error
from chatproxy.validation import parse_responses_request
from chatproxy.views import SSE_HEADERS

#: A response id is this prefix and the stream id.
ID_PREFIX = "resp_"
#: ``starting_after`` for a fold that only builds the response object (no event is wanted).
_QUIET = sys.maxsize
#: ``finish_reason`` -> ``incomplete_details.reason`` of an answer cut short.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponseEvents:
    """Folds one stream's events into the Responses API's typed events and response object.

    :meth:`encode` gives the SSE bytes for each stream event (empty when it shows nothing), numbering
    every typed event; those numbered ``starting_after`` or less are counted but not sent (a resume).
    :meth:`response` is the response object as it stands.
    """

    def __init__(self, response_id: str, *, model: str, created_at: float, starting_after: int = 0,
                 echo: Mapping[str, Any] | None = None) -> None:
        self.id = response_id
        self.model = model
        self.created_at = int(created_at)
        self._echo = echo if echo is not None else _DEFAULT_ECHO
        self.seq = 0
        self.status = "queued"
        self._after = starting_after
        self._output: list[dict[str, Any]] = []  # closed output items
        self._usage: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None
        self._incomplete: dict[str, Any] | None = None
        # The open message item: its id, output index and text so far.
        self._message_id = ""
        self._message_index: int | None = None
        self._parts: list[str] = []
        # The open function_call item (None when there is none), and every call's item by its index.
        self._call: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}
        # The open refusal message item: its id, output index and text so far.
        self._refusal: dict[str, Any] | None = None
        # Every text delta is these bytes around its sequence number, output index and JSON string.
        self._delta_prefix = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",' \
                             b'"sequence_number":'
        self._delta_head = b""

    # ------------------------------------------------------------------ typed events

    def encode(self, event: Event) -> bytes:
        name = event.name
        if name == "delta":
            text: str = event.data["text"]  # type: ignore[index]
            opened = b"" if self._message_index is not None else self._open_message()
            index: int = self._message_index  # type: ignore[assignment]  # (opened above)
            self._parts.append(text)
            self.seq += 1
            if self.seq <= self._after:
                return opened
            # The hot path: one JSON string encoded, no dict built.
            chunk = b'%s%d,%s%d,"content_index":0,"delta":%s,"logprobs":[]}\n\n' % (
                self._delta_prefix, self.seq, self._delta_head, index, orjson.dumps(text))
            return opened + chunk if opened else chunk
        if name == "tool_call":
            return self._tool_call(event.data)  # type: ignore[arg-type]
        if name == "refusal":
            return self._refusal_delta(event.data)  # type: ignore[arg-type]
        if name in ("keepalive", "retry"):
            # A retry is invisible, but it restarted the stream's keepalive clock: keep the client warm.
            return sse.KEEPALIVE
        if name == "start":
            self.status = "in_progress"
            self.model = (event.data or {}).get("model") or self.model  # the first target tried
            return (self._event("response.created", {"response": self.response()})
                    + self._event("response.in_progress", {"response": self.response()}))
        if name == "done":
            data = event.data or {}
            self.model = data.get("model") or self.model  # the model that answered (a fallback's)
            closed = self._close_open("completed")
            self._usage = _usage(data.get("usage"))
            reason = _INCOMPLETE.get(data.get("finish_reason") or "")
            if reason is None:
                self.status = "completed"
                return closed + self._event("response.completed", {"response": self.response()})
            self.status = "incomplete"
            self._incomplete = {"reason": reason}
            return closed + self._event("response.incomplete", {"response": self.response()})
        if name == "error":
            code = final_code(event)
            message = friendly_message(code)
            closed = self._close_open("incomplete")
            self.status = "failed"
            self._error = {"code": str(code), "message": message}
            return (closed + self._event("error", {"code": str(code), "message": message, "param": None})
                    + self._event("response.failed", {"response": self.response()}))
        return b""  # reset cannot happen here (the stream runs without reset)

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        self.seq += 1
        if self.seq <= self._after:
            return b""
        data = orjson.dumps({"type": kind, "sequence_number": self.seq, **payload})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _close_open(self, status: str) -> bytes:
        """Close whichever item is open."""
        return self._close_call(status) + self._close_refusal(status) + self._close_message(status)

    def _new_message_id(self, index: int) -> str:
        """The first message is "msg_" and the stream id, as a resume rebuilds it; a later one (text
        after a tool call) also has its output index."""
        suffix = self.id.removeprefix(ID_PREFIX)
        return f"msg_{suffix}" if not any(i["type"] == "message" for i in self._output) else f"msg_{suffix}_{index}"

    def _open_message(self) -> bytes:
        closed = self._close_call("completed") + self._close_refusal("completed")
        self._message_index = index = len(self._output)
        self._message_id = self._new_message_id(index)
        self._parts = []
        self._delta_head = b'"item_id":"' + self._message_id.encode() + b'","output_index":'
        where = {"output_index": index}
        return closed + (self._event("response.output_item.added", {**where, "item": self._message_item("in_progress")})
                + self._event("response.content_part.added", {"item_id": self._message_id, **where,
                                                              "content_index": 0, "part": _text_part("")}))

    def _close_message(self, status: str) -> bytes:
        index = self._message_index
        if index is None:
            return b""
        text = "".join(self._parts)
        where = {"item_id": self._message_id, "output_index": index, "content_index": 0}
        item = self._message_item(status)
        self._message_index = None
        self._output.append(item)
        return (self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
                + self._event("response.content_part.done", {**where, "part": _text_part(text)})
                + self._event("response.output_item.done", {"output_index": index, "item": item}))

    def _tool_call(self, data: dict[str, Any]) -> bytes:
        """A ``tool_call`` event of choice 0: the head of a call closes the open item and opens a
        ``function_call`` item; a piece of arguments is a ``function_call_arguments.delta``."""
        if data.get("choice"):
            return b""  # (a Responses request asks for one choice)
        current = self._call
        if current is not None and self._calls.get(data["index"]) is current and not data["arguments"] \
                and (not current["call_id"] or not current["name"]):
            # The rest of the open call's head (an upstream that sends its id and name apart).
            current["call_id"] = current["call_id"] or data["id"] or ""
            current["name"] = current["name"] or data["name"] or ""
            return b""
        if data["id"] is not None or data["name"] is not None:
            closed = self._close_open("completed")
            index = len(self._output)
            opened = self._call = self._calls[data["index"]] = {
                "id": f"fc_{self.id.removeprefix(ID_PREFIX)}_{index}", "type": "function_call",
                "status": "in_progress", "call_id": data["id"] or "", "name": data["name"] or "",
                "arguments": "", "output_index": index,
            }
            return closed + self._event("response.output_item.added",
                                        {"output_index": index, "item": _call_item(opened)})
        call = self._calls.get(data["index"])
        if call is None:
            return b""  # arguments without a head: nothing names the call they belong to
        piece: str = data["arguments"]
        call["arguments"] += piece
        if call is not self._call:
            return b""  # (a call already closed: chat upstreams send calls one after another)
        return self._event("response.function_call_arguments.delta",
                           {"item_id": call["id"], "output_index": call["output_index"], "delta": piece})

    def _close_call(self, status: str) -> bytes:
        call = self._call
        if call is None:
            return b""
        self._call = None
        call["status"] = status
        self._output.append(call)
        where = {"item_id": call["id"], "output_index": call["output_index"]}
        return (self._event("response.function_call_arguments.done", {**where, "arguments": call["arguments"]})
                + self._event("response.output_item.done",
                              {"output_index": call["output_index"], "item": _call_item(call)}))

    def _refusal_delta(self, data: dict[str, Any]) -> bytes:
        """A ``refusal`` event of choice 0: a message item whose content is one ``refusal`` part
        (opened at the first piece, as text opens its own), then ``response.refusal.delta``."""
        if data.get("choice"):
            return b""
        opened = b""
        refusal = self._refusal
        if refusal is None:
            opened = self._close_open("completed")
            index = len(self._output)
            refusal = self._refusal = {"id": self._new_message_id(index), "output_index": index, "text": ""}
            opened += (self._event("response.output_item.added",
                                   {"output_index": index, "item": _refusal_item(refusal, "in_progress")})
                       + self._event("response.content_part.added",
                                     {"item_id": refusal["id"], "output_index": index, "content_index": 0,
                                      "part": {"type": "refusal", "refusal": ""}}))
        piece: str = data["text"]
        refusal["text"] += piece
        return opened + self._event("response.refusal.delta", {"item_id": refusal["id"], "content_index": 0,
                                                               "output_index": refusal["output_index"], "delta": piece})

    def _close_refusal(self, status: str) -> bytes:
        refusal = self._refusal
        if refusal is None:
            return b""
        self._refusal = None
        item = _refusal_item(refusal, status)
        self._output.append(item)
        where = {"item_id": refusal["id"], "output_index": refusal["output_index"], "content_index": 0}
        return (self._event("response.refusal.done", {**where, "refusal": refusal["text"]})
                + self._event("response.content_part.done", {**where, "part": item["content"][0]})
                + self._event("response.output_item.done", {"output_index": refusal["output_index"], "item": item}))

    def _message_item(self, status: str) -> dict[str, Any]:
        content = [_text_part("".join(self._parts))] if status != "in_progress" or self._parts else []
        return {"id": self._message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    # ------------------------------------------------------------------ the response object

    def response(self) -> dict[str, Any]:
        output = [_call_item(item) if item["type"] == "function_call" else item for item in self._output]
        if self._message_index is not None:
            output.append(self._message_item("in_progress"))
        if self._call is not None:
            output.append(_call_item(self._call))
        if self._refusal is not None:
            output.append(_refusal_item(self._refusal, "in_progress"))
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self._error,
            "incomplete_details": self._incomplete,
            "model": self.model,
            "output": output,
            **self._echo,
            "usage": self._usage,
        }

    @classmethod
    def of_stored(cls, response_id: str, meta: Mapping[str, Any], starting_after: int = 0) -> ResponseEvents:
        """The fold for a stored response, from its journal meta (:func:`chatproxy.resume.stream_meta`)."""
        return cls(response_id, model=meta["model"], created_at=float(meta.get("created") or 0),
                   starting_after=starting_after, echo=meta.get("echo"))


#: What a response object says of a request that set nothing (a stored response older than the echo).
_DEFAULT_ECHO: Mapping[str, Any] = {
    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
    "metadata": {},
}


def _refusal_item(refusal: dict[str, Any], status: str) -> dict[str, Any]:
    """The message item of a refusal (no content while it opens, as a text message's)."""
    content = [{"type": "refusal", "refusal": refusal["text"]}] if status != "in_progress" or refusal["text"] else []
    return {"id": refusal["id"], "type": "message", "status": status, "role": "assistant", "content": content}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call`` output item (the kept state less its output index)."""
    return {key: value for key, value in call.items() if key != "output_index"}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Any) -> dict[str, Any] | None:
    """Chat Completions usage in the Responses API's names."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


async def _replay_body(events: AsyncIterator[Event], wire: ResponseEvents) -> AsyncIterator[bytes]:
    """The SSE body of a resumed stream (``events`` from the journal, then live)."""
    yield sse.OPEN_COMMENT
    async with contextlib.aclosing(events) as iterator:  # type: ignore[type-var]
        async for event in iterator:
            chunk = wire.encode(event)
            if chunk:
                yield chunk


class _Collected(JsonAnswer):
    """A non-streamed response: the fold's response object (a failure before the commit point is
    an error with its own status, as for chat completions)."""

    def __init__(self, reader: Subscription, wire: ResponseEvents) -> None:
        super().__init__(reader)
        self.wire = wire

    def _take(self, event: Event) -> None:
        self.wire.encode(event)

    def _final_response(self, final: Event | None, committed: bool) -> JsonResponse:
        if final is None or final.name == "error":
            if not committed:
                return openai_error(final_code(final))
            final = final or Event(0, "error", {"code": ErrorCode.INTERNAL})
        self.wire.encode(final)
        return JsonResponse(self.wire.response())


def _stream_id(response_id: str) -> str | None:
    stream_id = response_id.removeprefix(ID_PREFIX)
    return stream_id if response_id.startswith(ID_PREFIX) and stream_id else None


def _unknown(response_id: str) -> JsonResponse:
    return openai_error(ErrorCode.NOT_FOUND, f"No response with id '{response_id[:80]}': it ended more than "
                        "RESUME.TTL ago, was not stored, or never existed.", param="response_id")


@csrf_exempt  # bearer keys carry no cookie; authorize() enforces CSRF for session users
async def create(request: HttpRequest) -> HttpResponseBase:
    """``POST /chat/v1/responses``."""
    asked = await admit_json(request, parse_responses_request)
    if isinstance(asked, HttpResponseBase):
        return asked
    reader = await start(request, asked.chat, resumable=asked.store, background=asked.background,
                         meta={"echo": asked.echo})
    if isinstance(reader, HttpResponseBase):
        return reader
    stream = reader.stream
    meta = resume.journal().local_meta(stream.stream_id) if asked.store else None
    created = meta["created"] if meta is not None else time.time()  # what a resume will say too
    response_id = ID_PREFIX + stream.stream_id
    fold = functools.partial(ResponseEvents, response_id, model=stream.request.model, created_at=created,
                             echo=asked.echo)
    if asked.stream:
        wire = fold()
        body = sse.live_body(reader, wire.encode, sse.OPEN_COMMENT)  # a background stream goes on without it
        return StreamingHttpResponse(body, content_type="text/event-stream", headers=SSE_HEADERS)
    quiet = fold(starting_after=_QUIET)
    if asked.background:
        reader.close()  # nobody reads it now: it goes on alone, and GET reads it
        return JsonResponse(quiet.response())
    return await _Collected(reader, quiet).completion()


async def retrieve(request: HttpRequest, response_id: str) -> HttpResponseBase:
    """``GET /chat/v1/responses/<id>``: the response object; with ``stream=true`` its events after
    ``starting_after``, then live ones."""
    refused = await admit(request, "GET")
    if refused is not None:
        return refused
    streaming = request.GET.get("stream", "false").lower()
    if streaming not in ("true", "false"):
        return openai_error(ErrorCode.BAD_REQUEST, "'stream' must be true or false.", param="stream")
    raw = request.GET.get("starting_after", "0")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 12):
        return openai_error(ErrorCode.BAD_REQUEST, "'starting_after' must be a whole number (a sequence_number "
                            "you received).", param="starting_after")
    stream_id = _stream_id(response_id)
    if stream_id is None:
        return _unknown(response_id)
    try:
        meta = await resume.stream_meta(stream_id, request.user)
        if streaming == "true":
            events = await resume.open_replay(stream_id, request.user, 0)
        else:
            snapshot = await resume.events_so_far(stream_id, request.user)
    except resume.StreamNotFound:
        return _unknown(response_id)
    except resume.JournalUnavailable as exc:
        return _unavailable(exc)
    if streaming == "true":
        wire = ResponseEvents.of_stored(response_id, meta, starting_after=int(raw))
        return StreamingHttpResponse(_replay_body(events, wire), content_type="text/event-stream", headers=SSE_HEADERS)
    return _snapshot(response_id, meta, snapshot)


@csrf_exempt
async def cancel(request: HttpRequest, response_id: str) -> HttpResponseBase:
    """``POST /chat/v1/responses/<id>/cancel``: stop generating (it ends ``failed``, ``cancelled``);
    answers the response object as it stands."""
    refused = await admit(request, "POST")
    if refused is not None:
        return refused
    stream_id = _stream_id(response_id)
    if stream_id is None:
        return _unknown(response_id)
    try:
        meta = await resume.stream_meta(stream_id, request.user)
        await resume.cancel(stream_id, request.user)
        snapshot = await resume.events_so_far(stream_id, request.user)
    except resume.StreamNotFound:
        return _unknown(response_id)
    except resume.JournalUnavailable as exc:
        return _unavailable(exc)
    return _snapshot(response_id, meta, snapshot)


def _unavailable(exc: resume.JournalUnavailable) -> JsonResponse:
    """The store is unreachable (Redis down) and the response is not in this process: try again soon."""
    return openai_error(ErrorCode.UNAVAILABLE, exc.message, headers={"Retry-After": str(exc.retry_after)})


def _snapshot(response_id: str, meta: dict[str, Any], events: list[Event]) -> JsonResponse:
    """The response object after ``events`` (a stored stream's, ``meta`` its journal meta)."""
    quiet = ResponseEvents.of_stored(response_id, meta, starting_after=_QUIET)
    for event in events:
        quiet.encode(event)
    return JsonResponse(quiet.response())
