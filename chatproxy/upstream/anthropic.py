"""Anthropic's Messages API as an upstream (``UPSTREAM.SDK = "anthropic"``), over plain aiohttp.

The chat request is translated: system messages become ``system`` (joined by blank lines), the
other messages stay in order; an assistant message's ``tool_calls`` become ``tool_use`` blocks
(their JSON arguments the ``input`` object), ``tool`` messages ``tool_result`` blocks (the results
of one turn in one user message); ``tools`` become Messages tools (``parameters`` is the
``input_schema``), ``tool_choice`` ``auto`` / ``required`` / ``none`` / a function becomes ``auto``
/ ``any`` / ``none`` / ``tool``, and ``parallel_tool_calls: false`` is
``disable_parallel_tool_use``; ``max_tokens`` is required there, so a request without one gets
:data:`DEFAULT_MAX_TOKENS`; ``temperature`` is capped at 1 (the Messages API's range), ``top_p``
passes, ``stop`` becomes ``stop_sequences``; parameters the API does not have (``seed``,
penalties) are not sent. ``EXTRA_BODY`` is merged as-is. A partial answer to continue
(``ON_PARTIAL = "continue"``) is a trailing assistant message, which the Messages API continues
natively (its trailing whitespace is removed: the API refuses it).

``POST {BASE_URL}/v1/messages`` (``BASE_URL`` is the API root, e.g. ``https://api.anthropic.com``;
one that already ends in ``/v1`` gets ``/messages``), with ``x-api-key`` (``UPSTREAM.API_KEY``, else
``ANTHROPIC_API_KEY``) and ``anthropic-version``. The stream's events, by their ``type``:

* ``content_block_start`` / ``content_block_delta`` with ``text_delta``: the text, yielded as a
  plain ``str`` (the per-chunk path, as cheap as before);
* a ``tool_use`` block's start and its ``input_json_delta`` pieces: the OpenAI-shaped choices the
  other adapters yield for a streamed tool call (``delta.tool_calls``: the head with ``id``,
  ``name`` and empty arguments, then the arguments piece by piece, the call ``index`` counting the
  answer's tool_use blocks), so ``stop_reason: tool_use`` ends an answer of tool calls;
* ``thinking_delta``: a reasoning delta (``delta.reasoning_content``), so a long thinking phase is
  progress for the first-token and stall deadlines like any other output; ``signature_delta``
  and ``redacted_thinking`` blocks carry nothing to show (a thinking block's signature, which a
  later turn with tools would need, is not kept);
* ``message_start`` (input tokens) and ``message_delta`` (``stop_reason`` -> ``finish_reason``,
  output tokens): ``usage`` in Chat Completions' names;
* ``message_stop``: the end (the rest of the body is drained briefly so the connection is reused);
* ``ping``: nothing. A ping is not progress: a stream of pings is a stall, and the stream core's
  first-token and stall deadlines catch it as they catch silence;
* ``error`` after the 200 (``overloaded_error``, ``api_error``): a retryable
  ``UpstreamStatusError(0)``; ``rate_limit_error`` is ``RateLimited``; an error about the request
  itself (``invalid_request_error`` ...) is not retried.

HTTP errors, connect errors and broken bodies map as in :mod:`chatproxy.upstream.raw` (whose
session handling and body reading this adapter shares): 429 with ``Retry-After`` is
``RateLimited``, 529 (overloaded) and 5xx are retryable, 400 is not.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
import orjson

import chatproxy
from chatproxy.errors import ConfigurationError, RateLimited, UpstreamDisconnected, UpstreamError, UpstreamStatusError
from chatproxy.upstream.base import Item, PerLoop, UpstreamRequest
from chatproxy.upstream.common import PLACEHOLDER_API_KEY, error_code
from chatproxy.upstream.raw import RawStream, RawUpstream, _new_session, _proxy_for
from chatproxy.upstream.sse import EventSplitter

__all__ = ["AnthropicUpstream"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
#: ``max_tokens`` of a request that gives none (the Messages API requires one).
DEFAULT_MAX_TOKENS = 8192
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: Chat Completions ``tool_choice`` strings as the Messages API's types.
_TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}
#: In-band error types about the request itself (not retried), as their HTTP status.
_REQUEST_ERRORS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
}
_MALFORMED = (orjson.JSONDecodeError, AttributeError, TypeError, KeyError)


class AnthropicUpstream(RawUpstream):
    """:class:`~chatproxy.upstream.base.Upstream` speaking Anthropic's Messages API over aiohttp."""

    def __init__(self, *, base_url: str | None, api_key: str | None) -> None:
        base = (base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"UPSTREAM.BASE_URL must be an http(s) URL, not {base!r}")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            if not (base_url or os.environ.get("ANTHROPIC_BASE_URL")):
                raise ConfigurationError(
                    "no upstream API key: set CHATPROXY['UPSTREAM']['API_KEY'] or ANTHROPIC_API_KEY "
                    "(or set UPSTREAM.BASE_URL to a server that needs none)"
                )
            key = PLACEHOLDER_API_KEY
        self.name = "anthropic/aiohttp"
        self._url = url
        self._headers = {
            "x-api-key": key,
            "anthropic-version": API_VERSION,
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": f"chatproxy/{chatproxy.__version__}",
        }
        self._proxy = _proxy_for(url)
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(_new_session, lambda s: not s.closed)

    def __repr__(self) -> str:
        return f"<AnthropicUpstream {self.name} url={self._url!r}>"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            role, content = message["role"], message.get("content") or ""
            if role == "system":
                system.append(content)
                continue
            if role == "tool":
                _add_tool_result(messages, message)
                continue
            if message.get("tool_calls"):
                blocks = [{"type": "text", "text": content}] if isinstance(content, str) and content else \
                    list(content) if isinstance(content, list) else []
                blocks += [_tool_use(call) for call in message["tool_calls"]]
                messages.append({"role": "assistant", "content": blocks})
                continue
            if message.get("prefix"):  # the partial answer to continue: the API continues it as is
                content = content.rstrip()
            messages.append({"role": role, "content": content})
        params = request.params
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": params.get("max_tokens") or DEFAULT_MAX_TOKENS,
            "messages": messages,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if params.get("temperature") is not None:
            body["temperature"] = min(1.0, float(params["temperature"]))
        if params.get("top_p") is not None:
            body["top_p"] = params["top_p"]
        if params.get("stop"):
            body["stop_sequences"] = list(params["stop"])
        if params.get("tools"):
            body["tools"] = [_tool(tool["function"]) for tool in params["tools"]]
            choice = _tool_choice(params.get("tool_choice"), params.get("parallel_tool_calls"))
            if choice is not None:
                body["tool_choice"] = choice
        body.update((k, v) for k, v in request.extra_body.items() if k != "stream_options")
        return body

    def _stream(self, response: aiohttp.ClientResponse) -> AnthropicStream:
        return AnthropicStream(response)


class AnthropicStream(RawStream):
    """The body of one Messages stream: its text, ``finish_reason`` and ``usage``."""

    __slots__ = ("_calls", "_input_tokens", "_stopped")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._input_tokens = 0
        self._calls: dict[int, int] = {}  # content block index -> tool call index
        self._stopped = False
        super().__init__(response)

    async def _iterate(self) -> AsyncGenerator[Item, None]:
        chunks = self._body_chunks()
        take = self._take
        split = EventSplitter().feed  # "event:" lines are skipped: the data names its type too
        try:
            async for raw in chunks:
                for payload in split(raw):
                    item = take(payload)
                    if item is not None:
                        yield item
                    elif self._stopped:
                        break
                if self._stopped:
                    break
            if self._stopped:
                await self._drain(chunks)
                return
            if self.finish_reason is None:
                raise UpstreamDisconnected("body ended without message_stop or a stop_reason")
        except UpstreamError:
            raise
        except self._errors as exc:
            raise self._body_error(exc) from exc

    def _take(self, payload: bytes) -> Item | None:
        """One event's item (None if it carries none); records the end, the stop reason and usage."""
        try:
            event = orjson.loads(payload)
            kind = event["type"]
            if kind == "content_block_delta":
                delta = event["delta"]
                if delta["type"] == "text_delta":  # the hot path: a piece of text is the text itself
                    text = delta["text"]
                    return text if text and type(text) is str else None
                return self._delta_choices(event["index"], delta)
            if kind == "content_block_start":
                return self._start_choices(event["index"], event["content_block"])
            self._other(kind, event)
            return None
        except _MALFORMED:
            raise UpstreamDisconnected("malformed event") from None

    def _start_choices(self, block: int, start: dict[str, Any]) -> Item | None:
        """A content block's start: its text, or the head of a tool call (``tool_use``)."""
        kind = start["type"]
        if kind == "text":
            text = start.get("text")
            return text if text and type(text) is str else None
        if kind == "tool_use":
            number = self._calls[block] = len(self._calls)
            given = start.get("input")
            call = {"index": number, "id": start["id"], "type": "function",
                    "function": {"name": start["name"], "arguments": orjson.dumps(given).decode() if given else ""}}
            return [{"index": 0, "delta": {"tool_calls": [call]}}]
        if kind == "thinking":
            return _reasoning(start.get("thinking"))
        return None  # redacted_thinking (nothing to show) and block types added later

    def _delta_choices(self, block: int, delta: dict[str, Any]) -> Item | None:
        """A delta other than text: a piece of a tool call's arguments, or of thinking."""
        kind = delta["type"]
        if kind == "input_json_delta":
            piece = delta.get("partial_json")
            number = self._calls.get(block)
            if not piece or type(piece) is not str or number is None:
                return None
            return [{"index": 0, "delta": {"tool_calls": [{"index": number, "function": {"arguments": piece}}]}}]
        if kind == "thinking_delta":
            return _reasoning(delta.get("thinking"))
        return None  # signature_delta (it authenticates the thinking for the next turn, not shown)

    def _other(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "message_start":
            usage = event["message"].get("usage") or {}
            self._input_tokens = _input_tokens(usage)
        elif kind == "message_delta":
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish_reason = _STOP_REASONS.get(reason, "stop")
            usage = event.get("usage") or {}
            prompt = _input_tokens(usage) or self._input_tokens
            completion = int(usage.get("output_tokens") or 0)
            self.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        elif kind == "message_stop":
            self._stopped = True
        elif kind == "error":
            raise _in_band_error(event)
        # ping, content_block_stop and event types added later: nothing to do


def _reasoning(text: Any) -> Item | None:
    """Thinking as the choices of a reasoning delta (the field DeepSeek and vLLM use)."""
    if not text or type(text) is not str:
        return None
    return [{"index": 0, "delta": {"reasoning_content": text}}]


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions function tool as a Messages tool."""
    tool = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object",
                                                                                      "properties": {}}}
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """``tool_choice`` / ``parallel_tool_calls`` as the Messages ``tool_choice`` (None: the default)."""
    if isinstance(choice, dict):
        result: dict[str, Any] = {"type": "tool", "name": choice["function"]["name"]}
    elif choice in _TOOL_CHOICES:
        result = {"type": _TOOL_CHOICES[choice]}
    elif parallel is False:
        result = {"type": "auto"}
    else:
        return None
    if parallel is False and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool call as a ``tool_use`` block (its arguments a JSON object)."""
    function = call["function"]
    try:
        arguments = orjson.loads(function["arguments"] or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise UpstreamStatusError(400, f"the arguments of tool call {str(call['id'])[:64]!r} are not a JSON "
                                       "object, which the Messages API requires")
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def _add_tool_result(messages: list[dict[str, Any]], message: Mapping[str, Any]) -> None:
    """A ``tool`` message as a ``tool_result`` block; the results of one turn share a user message."""
    content = message.get("content") or ""
    result = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": content}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "user" and isinstance(last["content"], list) \
            and all(block.get("type") == "tool_result" for block in last["content"]):
        last["content"].append(result)
    else:
        messages.append({"role": "user", "content": [result]})


def _input_tokens(usage: dict[str, Any]) -> int:
    """Every input token of a Messages usage object (cache writes and reads included)."""
    return sum(int(usage.get(key) or 0)
               for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))


def _in_band_error(event: dict[str, Any]) -> UpstreamError:
    kind = error_code(event)
    detail = "in-stream error" + (f" ({kind})" if kind else "")
    if kind == "rate_limit_error":
        return RateLimited(detail)
    return UpstreamStatusError(_REQUEST_ERRORS.get(kind or "", 0), detail)
