"""``POST /v1/messages``: the Anthropic Messages API, with the same answers and faults.

Contract
--------
Authentication is ``x-api-key: <anything>`` (or ``Authorization: Bearer``, which the SDK's
``auth_token`` sends); an ``anthropic-version`` header is required, as on api.anthropic.com.
Errors use Anthropic's shape, ``{"type": "error", "error": {"type", "message"}, "request_id"}``,
with its error types (``invalid_request_error``, ``authentication_error``, ``not_found_error``,
``rate_limit_error``, ``api_error``, ``overloaded_error`` for 529 ...).

The request is converted to the OpenAI-shaped conversation :mod:`.answers` plans from (``system``
becomes a leading system message, ``tool_result`` blocks become ``tool`` messages, ``tool_use``
blocks assistant ``tool_calls``), so **the same conversation gets the same text over both APIs**.
``thinking: {"type": "enabled"}`` (or the ``reasoning=N`` directive) adds a thinking block. With
``tools`` an answer is one ``tool_use`` block (``tool_calls=N``: N of them, unless ``tool_choice``
has ``disable_parallel_tool_use: true``, which allows one).

A stream is ``message_start``; per block ``content_block_start``, ``content_block_delta``
(``thinking_delta`` then a ``signature_delta``, ``text_delta``, or ``input_json_delta`` for a
``tool_use`` block) and ``content_block_stop``; one ``ping`` after the first block starts (as the
real API does); ``message_delta`` with ``stop_reason`` (``end_turn``, ``max_tokens``,
``tool_use``, ``refusal``) and ``usage``; ``message_stop``. While silent with ``keepalive=S`` the
simulator sends ``event: ping`` frames (``pings_only``: nothing but pings); ``error_after=N``
sends an in-band ``event: error`` with an ``overloaded_error`` after the 200.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from .answers import AnswerRequest, Choice, ToolSpec, counted_units, cut_for_filter, plan_answer
from .faults import ERRORS, DirectiveError
from .text import content_text
from .wire import (
    FILTERED,
    GO_ON,
    Delivery,
    RequestRecord,
    SimState,
    dumps,
    non_stream_faults,
    select_faults,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_DEFAULT_THINKING = 8


class MessagesError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str, etype: str | None = None) -> dict[str, Any]:
    kind = etype or _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": _request_id()}


def error_response(
    status: int, message: str, etype: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=dumps(error_body(status, message, etype)), content_type="application/json", headers=headers
    )


def preset_error(name: str, model: str, headers: Mapping[str, str] | None = None) -> web.Response:
    preset = ERRORS[name]
    message = preset.anthropic_message.format(model=model)
    return error_response(preset.anthropic_status, message, preset.anthropic_type, headers)


def status_error(status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    message = "Overloaded" if status == 529 else f"Simulated error {status}."
    return error_response(status, message, headers=headers)


def _request_id() -> str:
    return f"req_sim{uuid.uuid4().hex[:20]}"


def check_headers(request: web.BaseRequest) -> MessagesError | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not request.headers.get("x-api-key", "").strip() and not (scheme.lower() == "bearer" and token.strip()):
        return MessagesError(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return MessagesError(400, "anthropic-version: header is required")
    return None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return content_text([b for b in content if isinstance(b, Mapping) and b.get("type") == "text"])
    return content_text(content)


def _convert(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape, validating Anthropic's rules on the way."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MessagesError(
            400, "messages: Field required" if messages is None else "messages: at least one message is required"
        )
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        if not isinstance(system, (str, list)):
            raise MessagesError(400, "system: Input should be a valid string or a list of text blocks")
        out.append({"role": "system", "content": _text(system)})
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise MessagesError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise MessagesError(
                400, f"messages.{i}.content: Input should be a valid string or a list of content blocks"
            )
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, block in enumerate(blocks):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise MessagesError(400, f"messages.{i}.content.{j}: Input should be a content block object")
        if message["role"] == "user":
            results = [b for b in blocks if b["type"] == "tool_result"]
            for j, block in enumerate(results):
                if block.get("tool_use_id") not in open_calls:
                    raise MessagesError(
                        400,
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message.",
                    )
                out.append(
                    {"role": "tool", "tool_call_id": block["tool_use_id"], "content": _text(block.get("content"))}
                )
            if open_calls - {b.get("tool_use_id") for b in results}:
                raise MessagesError(
                    400,
                    f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(sorted(open_calls))}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message.",
                )
            open_calls = set()
            texts = [b for b in blocks if b["type"] == "text"]
            if texts or not results:
                out.append({"role": "user", "content": content if isinstance(content, str) else content_text(texts)})
        else:
            uses = [b for b in blocks if b["type"] == "tool_use"]
            converted: dict[str, Any] = {"role": "assistant", "content": _text(blocks)}
            if uses:
                converted["tool_calls"] = [
                    {
                        "id": str(b.get("id")),
                        "type": "function",
                        "function": {"name": str(b.get("name")), "arguments": json.dumps(b.get("input", {}))},
                    }
                    for b in uses
                ]
                open_calls = {str(b.get("id")) for b in uses}
            out.append(converted)
    return out


def _tools(body: Mapping[str, Any]) -> tuple[tuple[ToolSpec, ...], str, str | None, bool]:
    """(tools, the tool choice in Chat Completions' terms, the forced tool, one call at most)."""
    raw = body.get("tools")
    if raw is None:
        return (), "none", None, False
    if not isinstance(raw, list):
        raise MessagesError(400, "tools: Input should be a valid list")
    specs = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise MessagesError(400, f"tools.{i}.name: Field required")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise MessagesError(400, f"tools.{i}.custom.input_schema: Field required")
        if schema.get("type") != "object":
            raise MessagesError(400, f"tools.{i}.custom.input_schema.type: Input should be 'object'")
        specs.append(ToolSpec(name=tool["name"], parameters=schema))
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    mapping = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
    if kind not in mapping:
        raise MessagesError(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    name = choice.get("name") if kind == "tool" else None
    if kind == "tool" and name not in {s.name for s in specs}:
        raise MessagesError(400, f"tool_choice.name: tool '{name}' is not in 'tools'")
    single = choice.get("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise MessagesError(400, "tool_choice.disable_parallel_tool_use: Input should be a valid boolean")
    return tuple(specs), mapping[kind], name, single


def parse_messages(body: Any, record: RequestRecord, state: SimState, header: str | None) -> tuple[AnswerRequest, bool]:
    """Validate a Messages body and choose its faults. Raises :class:`MessagesError`."""
    if not isinstance(body, dict):
        raise MessagesError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MessagesError(400, "model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise MessagesError(400, "max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise MessagesError(400, "max_tokens: Input should be a valid integer greater than or equal to 1")
    messages = _convert(body)
    tools, tool_choice, forced, single = _tools(body)
    thinking = body.get("thinking")
    thinking_on = isinstance(thinking, dict) and thinking.get("type") == "enabled"
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    last_user_raw = content_text(last_user["content"]) if last_user else ""
    try:
        faults = select_faults(state, record, model, last_user_raw, header)
    except DirectiveError as exc:
        raise MessagesError(400, f"Simulator directive error: {exc}") from None
    if single and faults.tool_calls:
        faults = dataclasses.replace(faults, tool_calls=1)  # at most one tool_use block, as the real API
    reasoning = faults.reasoning if faults.reasoning is not None else (_DEFAULT_THINKING if thinking_on else 0)
    answer = AnswerRequest(
        model=model,
        messages=messages,
        faults=faults,
        salt=(record.attempt or 0) if faults.diverge else 0,
        max_tokens=max_tokens,
        tools=tools,
        tool_choice=tool_choice,
        forced_tool=forced,
        reasoning=reasoning,
        id_prefix="toolu_",
    )
    return answer, body.get("stream") is True


def _usage_in(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(content_text(m.get("content")).split()) + 4 for m in messages)


def _signature(choice: Choice) -> str:
    return "sim" + hashlib.sha256(choice.text("reasoning").encode("utf-8")).hexdigest()[:40]


def _event(name: str, payload: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


async def stream_messages(
    request: web.Request, answer: AnswerRequest, record: RequestRecord, headers: Mapping[str, str]
) -> web.StreamResponse:
    faults = answer.faults
    (choice,) = plan_answer(answer)
    record.continuation = choice.continuation
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **headers},
    )
    await resp.prepare(request)
    record.status, record.headers_sent = 200, time.monotonic()
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    delivery = Delivery(request, resp, record, faults, keepalive=_PING, error_frame=_event("error", overloaded))
    await delivery.silence(faults.first_delay)
    message: dict[str, Any] = {
        "id": f"msg_sim{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _usage_in(answer.messages),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        },
    }
    await resp.write(_event("message_start", {"type": "message_start", "message": message}))
    record.first_chunk = time.monotonic()
    block = -1
    block_kind = ""
    pinged = False
    count_all = faults.count == "all"
    sent = 0
    stop = _STOP_REASONS[choice.finish]

    async def close_block() -> None:
        if block_kind == "reasoning":
            delta = {"type": "signature_delta", "signature": _signature(choice)}
            await resp.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": block, "delta": delta})
            )
        await resp.write(_event("content_block_stop", {"type": "content_block_stop", "index": block}))

    for kind, text, call in choice.units:
        counted = count_all or kind == "tool_args"
        if counted:
            outcome = await delivery.faults_after(sent)
            if outcome != GO_ON:
                if outcome != FILTERED:
                    return resp
                stop = "refusal"
                break
        group = "text" if kind in ("content", "refusal") else kind
        if group != block_kind or kind == "tool_start":
            if block >= 0:
                await close_block()
            block += 1
            block_kind = "tool_args" if kind == "tool_start" else group
            if kind == "tool_start":
                tool = choice.calls[call]
                start: dict[str, Any] = {"type": "tool_use", "id": tool.id, "name": text, "input": {}}
            elif kind == "reasoning":
                start = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                start = {"type": "text", "text": ""}
            await resp.write(
                _event("content_block_start", {"type": "content_block_start", "index": block, "content_block": start})
            )
            if not pinged:
                await resp.write(_PING)
                pinged = True
        await delivery.silence(faults.gap)
        if kind == "tool_start":
            delta: dict[str, Any] = {"type": "input_json_delta", "partial_json": ""}
        elif kind == "tool_args":
            delta = {"type": "input_json_delta", "partial_json": text}
        elif kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": text}
        else:
            delta = {"type": "text_delta", "text": text}
        await resp.write(_event("content_block_delta", {"type": "content_block_delta", "index": block, "delta": delta}))
        record.chunks += 1
        sent += counted
    else:
        outcome = await delivery.faults_after(sent)
        if outcome == FILTERED:
            stop = "refusal"
        elif outcome != GO_ON:
            return resp
    if block >= 0:
        await close_block()
    if choice.units and choice.units[0][0] == "refusal":
        stop = "refusal"
    final = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": record.chunks},
    }
    await resp.write(_event("message_delta", final))
    if faults.usage_delay:  # (stop reason and usage travel together here: the end comes late)
        await delivery.silence(faults.usage_delay)
    await resp.write(_event("message_stop", {"type": "message_stop"}))
    await resp.write_eof()
    record.outcome = "complete"
    return resp


def _blocks(choice: Choice) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = choice.text("reasoning")
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": _signature(choice)})
    text = choice.text("content") + choice.text("refusal")
    if text:
        blocks.append({"type": "text", "text": text})
    started = {u[2] for u in choice.units if u[0] == "tool_start"}
    for k, call in enumerate(choice.calls):
        if k in started:
            try:
                arguments = json.loads(choice.arguments(k))
            except ValueError:  # cut by max_tokens
                arguments = {}
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return blocks


async def complete_messages(
    request: web.Request, answer: AnswerRequest, record: RequestRecord, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Non-streamed answer; stream faults map to their nearest equivalents, as for chat."""
    faults = answer.faults
    choices = plan_answer(answer)
    choice = choices[0]
    record.continuation = choice.continuation
    counted = counted_units(choices, faults)
    fault, response = await non_stream_faults(request, record, faults, counted, b'{"id": "msg_sim", not json')
    if response is not None:
        return response
    if fault == "error":
        record.outcome, record.status = "status", 529
        return status_error(529)
    if fault == "content_filter":
        cut_for_filter(choices, faults)
    stop = "refusal" if choice.units and choice.units[0][0] == "refusal" else _STOP_REASONS[choice.finish]
    body = {
        "id": f"msg_sim{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": _blocks(choice),
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _usage_in(answer.messages),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": len(choice.units),
        },
    }
    record.outcome, record.status, record.chunks = "complete", 200, len(choice.units)
    record.first_chunk = record.headers_sent = time.monotonic()
    return web.Response(body=dumps(body), content_type="application/json", headers=headers)
