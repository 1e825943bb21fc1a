"""The OpenAI-compatible way in: ``POST /chat/v1/chat/completions``, ``GET /chat/v1/models``.

The official openai client pointed at ``base_url=".../chat/v1"`` works unmodified. The same
resilient core serves it; only the wire differs:

* Every chunk and the answer name the model that is answering (after a fallback, the fallback's).
* ``stream: true``: ``chat.completion.chunk`` lines and ``data: [DONE]``. Retries are invisible;
  keepalives are SSE comments; a final failure is one in-band ``data: {"error": ...}`` event
  (the openai client raises ``APIError`` with the friendly message). A restart that diverges
  from what was already sent cannot be expressed here, so it ends with that error too. The status
  line waits until the upstream answered its headers (at most ``KEEPALIVE``): a request the
  upstream refuses (unknown model, context too long, content filter) is then a real 4xx with
  OpenAI's error code, not an in-band error after a 200.
* Every part of the answer the core sends (:mod:`chatproxy.stream.answer`) becomes the delta it
  came as: ``content`` (with its ``logprobs``), ``tool_calls`` (the head with ``id``, ``type`` and
  ``function.name``, then ``function.arguments`` pieces), ``reasoning_content`` / ``reasoning``,
  ``refusal``, each on its choice; the finish chunk has the upstream's ``finish_reason``
  (``tool_calls``, ``length``, ``content_filter`` ...) and the usage chunk its ``usage``.
* ``stream: false``: one ``chat.completion`` object (the parts put together: ``content``,
  ``tool_calls``, ``refusal``, ``reasoning_content``, ``logprobs``, one choice per index), or a
  failure with its own status code and OpenAI's error shape. An answer not ready by the commit
  point (:func:`commit_after`: just under ``GATEWAY``, the front proxy's idle deadline) is
  committed as 200 then, and JSON-insignificant whitespace is sent every ``KEEPALIVE`` seconds
  until it is, so no gateway times out; a failure after that point is a 200 whose body is the
  error object (the official client returns that object instead of raising).

The Responses API way in (:mod:`chatproxy.openai_responses`) shares what is not wire: admission
(:func:`admit`, :func:`admit_json`, :func:`start`) and the commit logic of a JSON answer
(:class:`JsonAnswer`). Anything else under the prefix is OpenAI's JSON 404 (:func:`not_found`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import orjson
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from chatproxy import limits, sse
from chatproxy.auth import AuthFailure, authorize
from chatproxy.codes import ErrorCode
from chatproxy.conf import Policy, get_config
from chatproxy.core import ChatRequest, Event, Subscription
from chatproxy.fallbacks import model_of
from chatproxy.responses import openai_error, openai_stream_error
from chatproxy.service import StreamNotStarted, open_stream
from chatproxy.validation import InvalidRequest, parse_openai_request
from chatproxy.views import SSE_HEADERS, read_json_body

T = TypeVar("T")

#: Seconds the commit point stays ahead of ``GATEWAY`` at most (a fifth of it when that is less):
#: room for a busy event loop and the network between the worker and the gateway.
COMMIT_MARGIN = 5.0


def commit_after(policy: Policy) -> float:
    """Seconds of silence a non-streamed answer may keep before it must commit to 200."""
    margin = min(COMMIT_MARGIN, policy.gateway / 5)
    return max(policy.keepalive, policy.gateway - margin)



@csrf_exempt  # bearer keys carry no cookie; authorize() enforces CSRF for session users
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    parsed = await admit_json(request, parse_openai_request)
    if isinstance(parsed, HttpResponseBase):
        return parsed
    chat_request, streaming, include_usage = parsed
    reader = await start(request, chat_request)
    if isinstance(reader, HttpResponseBase):
        return reader
    wire = _Wire(reader, include_usage)
    if streaming:
        stream = reader.stream
        try:
            await stream.answered_or_finished(stream.policy.keepalive)
        except BaseException:
            reader.close()
            raise
        refused = _refused_before_output(stream.events_after(0))
        if refused is not None:
            reader.close()
            return openai_error(refused)
        return StreamingHttpResponse(wire.chunks(), content_type="text/event-stream", headers=SSE_HEADERS)
    return await wire.completion()


#: The events that carry part of the answer.
OUTPUT_EVENTS = frozenset({"delta", "tool_call", "reasoning", "refusal"})


def _refused_before_output(events: list[Event]) -> ErrorCode | None:
    """The code of a stream that already ended in an error without sending anything, else None."""
    if events and events[-1].name == "error" and not any(event.name in OUTPUT_EVENTS for event in events):
        return final_code(events[-1])
    return None


async def models(request: HttpRequest) -> HttpResponseBase:
    """``GET /chat/v1/models``: the allowed models (``UPSTREAM.MODELS``, or the default model)."""
    refused = await admit(request)
    if refused is not None:
        return refused
    upstream = get_config()["UPSTREAM"]
    names = upstream["MODELS"] or [upstream["MODEL"]]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "chatproxy"} for name in names]
    return JsonResponse({"object": "list", "data": data})


@csrf_exempt  # any method: a session user's POST must get this JSON, not Django's CSRF page
async def not_found(request: HttpRequest) -> HttpResponseBase:
    """Anything else under the OpenAI-compatible prefix: OpenAI's 404 JSON, never an HTML page."""
    where = f"{request.method} {request.path}"
    if len(where) > 200:
        where = where[:200] + "..."
    return openai_error(
        ErrorCode.NOT_FOUND,
        f"Invalid URL ({where}). This server offers POST chat/completions, POST responses, "
        "GET responses/<id> and GET models under its OpenAI-compatible base URL.",
    )


# --- shared by the OpenAI-compatible ways in ------------------------------------------------------


async def admit(request: HttpRequest, method: str | None = None) -> HttpResponseBase | None:
    """Check the method (when given) and authorize (bearer key or session): None to go on, else the
    refusal in OpenAI's shape."""
    if method is not None and request.method != method:
        return openai_error(ErrorCode.METHOD_NOT_ALLOWED, f"Use {method}.", headers={"Allow": method})
    try:
        await authorize(request, allow_bearer=True)
    except AuthFailure as exc:
        return _refused(request, exc)
    return None


async def admit_json(request: HttpRequest, parse: Callable[[Any], T]) -> T | HttpResponseBase:
    """A POST, authorized, its JSON body validated by ``parse``; else the refusal in OpenAI's shape."""
    refused = await admit(request, "POST")
    if refused is not None:
        return refused
    try:
        return parse(read_json_body(request))
    except InvalidRequest as exc:
        return openai_error(exc.code, exc.message, status=exc.status, param=exc.param)


async def start(
    request: HttpRequest, chat_request: ChatRequest, *, resumable: bool = False, background: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Subscription | HttpResponseBase:
    """Open the stream for an admitted request (no ``reset``: these wires cannot express one); its
    first reader, or the 429 refusal when a per-user limit is reached."""
    try:
        return await open_stream(chat_request, user=request.user, allow_reset=False, resumable=resumable,
                                 background=background, who=limits.identity_of(request), meta=meta)
    except limits.LimitExceeded as exc:
        return openai_error(exc.code, exc.message, headers={"Retry-After": str(exc.retry_after)})
    except StreamNotStarted as exc:
        return openai_error(exc.code)


def _refused(request: HttpRequest, exc: AuthFailure) -> JsonResponse:
    """An authorization failure in OpenAI's shape; an anonymous caller is told to send a key."""
    if exc.status == 403 and not request.user.is_authenticated:
        return openai_error(ErrorCode.MISSING_API_KEY)
    return openai_error(exc.code, exc.message)


class JsonAnswer:
    """A stream's answer as one JSON object (``stream: false``), in time for the gateway.

    :meth:`completion` answers with the object's real status if the stream ends before the commit
    point (:func:`commit_after`), else commits to 200 then and sends JSON-insignificant whitespace
    every ``KEEPALIVE`` seconds until the object is ready. Subclasses say what each event adds
    (:meth:`_take`) and what the object is (:meth:`_final_response`).
    """

    def __init__(self, reader: Subscription) -> None:
        self.reader = reader
        # The stream sends a keepalive after this much silence, but it counts every event as
        # output; events a wire does not show (retries, and deltas held for a JSON answer)
        # must not leave the client silent for longer, or a gateway times out (504).
        self._keepalive = reader.stream.policy.keepalive

    def _take(self, event: Event) -> None:
        """Fold one event (not the final one) into the answer."""
        raise NotImplementedError

    def _final_response(self, final: Event | None, committed: bool) -> JsonResponse:
        """The answer for the final event (``done`` / ``error``; None if the stream stopped);
        ``committed``: a 200 was already sent, so the status given here is not seen."""
        raise NotImplementedError

    async def completion(self) -> HttpResponseBase:
        """Collect the answer: a plain response (its real status) if it ends before the commit
        point (:func:`commit_after`), else a 200 kept warm with whitespace until it is ready."""
        collector = asyncio.get_running_loop().create_task(self._collect())
        try:
            done, _ = await asyncio.wait((collector,), timeout=commit_after(self.reader.stream.policy))
        except BaseException:  # the client went away (or shutdown) before the commit point
            collector.cancel()
            self.reader.close()
            raise
        if done:
            self.reader.close()
            return self._final_response(collector.result(), False)
        # Slow answer: commit to 200 now, before the gateway's idle deadline, and send whitespace.
        return StreamingHttpResponse(self._warm_body(collector), content_type="application/json")

    async def _collect(self) -> Event | None:
        """Fold the events in; the final one (``done`` / ``error``; None if the stream stopped)."""
        async for event in self.reader:
            if event.name in ("done", "error"):
                return event
            self._take(event)
        return None

    async def _warm_body(self, collector: asyncio.Task[Event | None]) -> AsyncIterator[bytes]:
        try:
            yield b" "
            while not collector.done():
                await asyncio.wait((collector,), timeout=self._keepalive)
                if not collector.done():
                    yield b" "
            yield self._final_response(collector.result(), True).content
        finally:
            collector.cancel()
            self.reader.close()


class _Wire(JsonAnswer):
    """One stream's events in OpenAI's chat-completion shapes."""

    def __init__(self, reader: Subscription, include_usage: bool) -> None:
        super().__init__(reader)
        stream = reader.stream
        self.include_usage = include_usage
        self.id = f"chatcmpl-{stream.stream_id}"
        self.created = int(time.time())
        self._delta_suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        self._use_model(stream.request.model)
        self._choices = {0}  # the choice indexes seen: each gets a finish chunk
        self._parts: list[Event] = []  # the answer's parts, for a non-streamed answer

    def _use_model(self, model: str) -> None:
        """Name ``model`` in the chunks from here on (the first target tried, then each fallback's)."""
        self.model = model
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model}
        # Every delta chunk is this prefix + the JSON string + this suffix: no dict per chunk.
        self._delta_prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self._head = head

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**self._head, "choices": choices, **extra}) + b"\n\n"

    def _part(self, event: Event) -> bytes:
        """The chunk of an answer part other than a plain choice-0 text delta."""
        data: dict[str, Any] = event.data or {}
        choice = data.get("choice", 0)
        self._choices.add(choice)
        return self._chunk([{"index": choice, "delta": delta_of(event.name, data),
                             "logprobs": data.get("logprobs"), "finish_reason": None}])

    def _finish_reasons(self, done: dict[str, Any]) -> dict[int, str]:
        """Each choice's ``finish_reason``, by index: choice 0's from ``done``, the others' as
        their upstream reported them (the stream's stats), else choice 0's."""
        first = done.get("finish_reason") or "stop"
        others = self.reader.stream.stats.finish_reasons
        return {choice: others.get(choice, first) if choice else first
                for choice in sorted(self._choices | set(others))}

    def chunks(self) -> AsyncIterator[bytes]:
        """The SSE body (not resumable: when it ends, the stream stops and closes its upstream)."""
        return sse.live_body(self.reader, self._encode, sse.OPEN_COMMENT)

    def _encode(self, event: Event) -> bytes:
        """What one event adds to the body (b"" for an event this wire does not show)."""
        name = event.name
        if name == "delta" and len(event.data) == 1:  # type: ignore[arg-type]
            return self._delta_prefix + orjson.dumps(event.data["text"]) + self._delta_suffix  # type: ignore[index]
        if name in OUTPUT_EVENTS:
            return self._part(event)
        if name == "keepalive":
            return sse.KEEPALIVE
        if name == "start":
            self._use_model((event.data or {}).get("model") or self.model)
            return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])
        if name == "done":
            data = event.data or {}
            self._use_model(data.get("model") or self.model)
            reasons = self._finish_reasons(data)
            finish = self._chunk([{"index": choice, "delta": {}, "logprobs": None, "finish_reason": reason}
                                  for choice, reason in reasons.items()])
            usage = self._chunk([], usage=data.get("usage")) if self.include_usage else b""
            return finish + usage + b"data: [DONE]\n\n"
        if name == "error":
            return openai_stream_error(final_code(event))
        if name == "retry":
            # Invisible here, but it restarted the stream's keepalive clock: a comment keeps the
            # client's connection warm instead. (reset cannot happen here.)
            if "fallback" in (event.data or {}):
                self._use_model(model_of(event.data["fallback"]))  # type: ignore[index]
            return sse.KEEPALIVE
        return b""

    def _take(self, event: Event) -> None:
        if event.name in OUTPUT_EVENTS:
            self._parts.append(event)

    def _final_response(self, final: Event | None, committed: bool) -> JsonResponse:
        if final is None or final.name == "error":
            return openai_error(final_code(final))
        data = final.data or {}
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": data.get("model") or self.model,
            "choices": completion_choices(self._parts, self._finish_reasons(data)),
            "usage": data.get("usage"),
        }
        return JsonResponse(body)


def delta_of(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``delta`` that an answer-part event (see :mod:`chatproxy.stream.answer`) stands for."""
    if name == "tool_call":
        call: dict[str, Any] = {"index": data["index"]}
        function: dict[str, Any] = {}
        if data.get("id"):
            call["id"] = data["id"]
            call["type"] = "function"
        if data.get("name"):
            function["name"] = data["name"]
        function["arguments"] = data.get("arguments") or ""
        call["function"] = function
        return {"tool_calls": [call]}
    if name == "reasoning":
        return {data.get("field") or "reasoning_content": data["text"]}
    if name == "refusal":
        return {"refusal": data["text"]}
    return {"content": data["text"]}


def completion_choices(parts: list[Event], finish_reasons: dict[int, str]) -> list[dict[str, Any]]:
    """The ``choices`` of a whole ``chat.completion``: each choice's parts put together, with its
    ``finish_reason`` (``finish_reasons[0]`` for a choice not listed)."""
    choices = {index: _new_choice(index, reason) for index, reason in finish_reasons.items()}
    for event in parts:
        data: dict[str, Any] = event.data or {}
        index = data.get("choice", 0)
        choice = choices.get(index) or choices.setdefault(index, _new_choice(index, finish_reasons[0]))
        message = choice["message"]
        name = event.name
        if name == "tool_call":
            calls = message.setdefault("tool_calls", {})
            call = calls.get(data["index"])
            if call is None:
                call = calls[data["index"]] = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            call["id"] += data.get("id") or ""
            call["function"]["name"] += data.get("name") or ""
            call["function"]["arguments"] += data.get("arguments") or ""
        else:
            key = "content" if name == "delta" else "refusal" if name == "refusal" else data.get("field", "reasoning")
            message[key] = (message.get(key) or "") + data["text"]
        if data.get("logprobs"):
            logprobs = choice["logprobs"] = choice["logprobs"] or {"content": None, "refusal": None}
            for key, values in data["logprobs"].items():
                if values:
                    logprobs[key] = (logprobs.get(key) or []) + list(values)
    for choice in choices.values():
        message = choice["message"]
        if "tool_calls" in message:
            message["tool_calls"] = [message["tool_calls"][key] for key in sorted(message["tool_calls"])]
        elif message["content"] is None and message["refusal"] is None:
            message["content"] = ""
    return [choices[index] for index in sorted(choices)]


def _new_choice(index: int, finish_reason: str) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": None, "refusal": None},
            "logprobs": None, "finish_reason": finish_reason}


def final_code(event: Event | None) -> ErrorCode:
    """The code an ``error`` event ends with (``internal`` when there is no such event)."""
    return ErrorCode.of((event.data or {}).get("code") if event is not None else None)
