"""``POST /v1/chat/completions``: OpenAI's Chat Completions API, validated and answered.

Contract
--------
Requests are validated the way api.openai.com validates them (400 with OpenAI's error body,
``{"error": {"message", "type", "param", "code"}}``): messages of every role (``tool`` messages
must answer a preceding assistant message's ``tool_calls``, and those must all be answered),
``tools`` / ``tool_choice`` / ``parallel_tool_calls``, ``response_format`` (``json_object`` needs
the word "json" in the messages, ``json_schema`` a name and an object schema), ``n``,
``logprobs`` / ``top_logprobs``, ``max_tokens`` / ``max_completion_tokens``, ``stream_options``
(only with ``stream``). Other parameters (``stop``, ``temperature``, ``user``, ...) are accepted
and ignored, as a model that ignores them would.

The answer (:mod:`.answers`) streams in OpenAI's wire format: per choice a role chunk, then one
chunk per unit -- ``delta.reasoning_content`` (the field DeepSeek and vLLM use), ``delta.content``,
``delta.refusal``, or ``delta.tool_calls`` (a first chunk with ``index``, ``id``, ``type``,
``function.name`` and empty ``arguments``, then argument fragments) -- then per choice a finish
chunk (``stop``, ``length``, ``tool_calls``, ``content_filter``), with ``include_usage`` a usage
chunk with ``choices: []``, and ``data: [DONE]``. ``logprobs`` adds per-token logprobs to content
chunks. Choices of ``n > 1`` are interleaved.
"""

from __future__ import annotations

import re
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .answers import (
    AnswerRequest,
    Choice,
    ToolSpec,
    counted_units,
    cut_for_filter,
    interleave,
    plan_answer,
    reasoning_default,
)
from .faults import ERRORS, DirectiveError, Faults
from .text import WORDS, content_text
from .wire import (
    FILTERED,
    GO_ON,
    Delivery,
    RequestRecord,
    dumps,
    non_stream_faults,
    select_faults,
    start_stream,
)

SYSTEM_FINGERPRINT = "fp_sim0001"
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_JSON_WORD_RE = re.compile(r"json", re.IGNORECASE)
_MAX_N = 128
_MAX_TOP_LOGPROBS = 20

# status -> (type, code, message). Shapes follow what api.openai.com sends; messages say
# "(simulated)" so that nobody mistakes them for a real outage while debugging.
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden (simulated)."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it (simulated).",
    ),
    408: ("timeout", None, "Request timed out (simulated)."),
    409: ("invalid_request_error", None, "Conflict (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (simulated)."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that! (simulated)",
    ),
    502: ("server_error", None, "Bad gateway (simulated)."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later (simulated)."),
    504: ("server_error", None, "Gateway timeout (simulated)."),
    529: ("overloaded_error", None, "Overloaded (simulated)."),
}


_UNSET: Any = object()


def error_body(
    status: int, message: str | None = None, *, code: str | None = _UNSET, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    default_type = "invalid_request_error" if status < 500 else "server_error"
    etype, ecode, emessage = _STATUS_ERRORS.get(status, (default_type, None, f"Error {status} (simulated)."))
    return {
        "error": {
            "message": message or emessage,
            "type": etype,
            "param": param,
            "code": ecode if code is _UNSET else code,
        }
    }


def error_response(
    status: int, message: str | None = None, *, headers: Mapping[str, str] | None = None, **kw: Any
) -> web.Response:
    return web.Response(
        status=status,
        body=dumps(error_body(status, message, **kw)),
        content_type="application/json",
        headers=headers,
    )


def preset_error(name: str, model: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """The response of ``error=NAME`` (:data:`~chatproxy.simulator.faults.ERRORS`)."""
    preset = ERRORS[name]
    body = {
        "error": {
            "message": preset.message.format(model=model),
            "type": preset.type,
            "param": preset.param,
            "code": preset.code,
        }
    }
    return web.Response(status=preset.status, body=dumps(body), content_type="application/json", headers=headers)


def retry_headers(faults: Faults) -> dict[str, str]:
    headers = {}
    if faults.retry_after_header is not None:
        headers["Retry-After"] = faults.retry_after_header
    if faults.retry_after_ms is not None:
        headers["retry-after-ms"] = str(faults.retry_after_ms)
    return headers


# --------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _expect(value: Any, kind: type | tuple[type, ...], param: str, expected: str) -> None:
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise BadRequest(
            f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
            param,
            "invalid_type",
        )


def _int_param(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    _expect(value, int, name, "an integer")
    if value < low:
        raise BadRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if high is not None and value > high:
        raise BadRequest(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return int(value)


def _missing(param: str) -> BadRequest:
    return BadRequest(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects with a 'role'.", "messages")
    pending: dict[str, int] = {}  # tool_call_id -> index of the assistant message that made it
    answered_any = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _missing(f"messages[{i}].role")
        role = message["role"]
        if role not in _ROLES:
            raise BadRequest(
                f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', "
                "'function', 'tool', and 'developer'.",
                f"messages[{i}].role",
                "invalid_value",
            )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _missing(f"messages[{i}].tool_call_id")
            if call_id not in pending:
                raise BadRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    "message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            del pending[call_id]
            answered_any = True
            continue
        if pending:
            _unanswered(pending)
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            _expect(calls, list, f"messages[{i}].tool_calls", "an array")
            for k, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{k}]"
                if not isinstance(call, dict):
                    raise BadRequest(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
                for key in ("id", "type", "function"):
                    if key not in call:
                        raise _missing(f"{where}.{key}")
                function = call["function"]
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise _missing(f"{where}.function.name")
                if not isinstance(function.get("arguments"), str):
                    raise _missing(f"{where}.function.arguments")
                pending[str(call["id"])] = i
    if pending and (answered_any or messages[-1].get("role") != "assistant"):
        _unanswered(pending)
    return messages


def _unanswered(pending: Mapping[str, int]) -> None:
    index = min(pending.values())
    raise BadRequest(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}",
        f"messages.[{index}].role",
    )


def _validate_tools(body: Mapping[str, Any]) -> tuple[tuple[ToolSpec, ...], str, str | None]:
    tools_raw = body.get("tools")
    choice_raw = body.get("tool_choice")
    if tools_raw is None:
        if choice_raw is not None:
            raise BadRequest(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            )
        if body.get("parallel_tool_calls") is not None:
            raise BadRequest(
                "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when "
                "'tools' are specified.",
                "parallel_tool_calls",
            )
        return (), "auto", None
    _expect(tools_raw, list, "tools", "an array")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools_raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRequest(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        if tool.get("type") != "function":
            raise BadRequest(
                f"Invalid value: '{tool.get('type')}'. Supported values are: 'function' and 'custom'.",
                f"{where}.type",
                "invalid_value",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _missing(f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str):
            raise _missing(f"{where}.function.name")
        if not _NAME_RE.match(name):
            raise BadRequest(
                f"Invalid '{where}.function.name': string does not match pattern. Expected a string "
                "that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                f"{where}.function.name",
                "invalid_value",
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            got = parameters.get("type") if isinstance(parameters, dict) else _type_name(parameters)
            raise BadRequest(
                f"Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \"object\"', "
                f"got 'type: \"{got}\"'.",
                f"{where}.function.parameters",
                "invalid_function_parameters",
            )
        specs.append(ToolSpec(name=name, parameters=parameters))
    if body.get("parallel_tool_calls") is not None:
        _expect(body["parallel_tool_calls"], bool, "parallel_tool_calls", "a boolean")
    if choice_raw is None:
        return tuple(specs), ("auto" if specs else "none"), None
    if isinstance(choice_raw, str):
        if choice_raw not in ("none", "auto", "required"):
            raise BadRequest(
                f"Invalid value: '{choice_raw}'. Supported values are: 'none', 'auto', and 'required'.",
                "tool_choice",
                "invalid_value",
            )
        return tuple(specs), choice_raw, None
    function = choice_raw.get("function") if isinstance(choice_raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice_raw.get("type") != "function":
        raise _missing("tool_choice.function.name")
    if name not in {s.name for s in specs}:
        raise BadRequest(
            f"Invalid value for 'tool_choice': no function named '{name}' was specified in the 'tools' parameter.",
            "tool_choice",
        )
    return tuple(specs), "function", name


def _validate_response_format(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> tuple[str, Any]:
    fmt = body.get("response_format")
    if fmt is None:
        return "text", None
    _expect(fmt, dict, "response_format", "an object")
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "json_object":
        if not any(_JSON_WORD_RE.search(content_text(m.get("content"))) for m in messages):
            raise BadRequest(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
                "messages",
            )
        return kind, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _missing("response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str):
            raise _missing("response_format.json_schema.name")
        if not _NAME_RE.match(name):
            raise BadRequest(
                "Invalid 'response_format.json_schema.name': string does not match pattern. Expected a "
                "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                "response_format.json_schema.name",
                "invalid_value",
            )
        schema = spec.get("schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise BadRequest(
                f"Invalid schema for response_format '{name}': schema must be a JSON Schema of 'type: \"object\"'.",
                "response_format",
                "invalid_json_schema",
            )
        return kind, schema
    return "text", None


@dataclass(slots=True)
class ChatRequest:
    answer: AnswerRequest
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def parse_chat(body: Any, record: RequestRecord, state: Any, header: str | None) -> tuple[ChatRequest, str]:
    """Validate a Chat Completions body and choose its faults; the request and the raw text of
    the last user message. Raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    messages = _validate_messages(body.get("messages"))
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _int_param(body, name, 1)
        if value is not None:
            max_tokens = value if max_tokens is None else min(max_tokens, value)
    n = _int_param(body, "n", 1, _MAX_N) or 1
    stream = body.get("stream")
    if stream is not None:
        _expect(stream, bool, "stream", "a boolean")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        _expect(options, dict, "stream_options", "an object")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _expect(logprobs, bool, "logprobs", "a boolean")
    top = _int_param(body, "top_logprobs", 0, _MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise BadRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is specified.",
            "top_logprobs",
        )
    tools, tool_choice, forced = _validate_tools(body)
    response_format, schema = _validate_response_format(body, messages)
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    last_user_raw = content_text(last_user.get("content")) if last_user else ""
    try:
        faults = select_faults(state, record, model, last_user_raw, header)
    except DirectiveError as exc:
        raise BadRequest(f"Simulator directive error: {exc}", "messages") from None
    effort = body.get("reasoning_effort")
    answer = AnswerRequest(
        model=model,
        messages=messages,
        faults=faults,
        seed=body.get("seed"),
        salt=(record.attempt or 0) if faults.diverge else 0,
        max_tokens=max_tokens,
        n=n,
        tools=tools,
        tool_choice=tool_choice,
        forced_tool=forced,
        parallel=body.get("parallel_tool_calls") is True,
        response_format=response_format,
        schema=schema,
        reasoning=faults.reasoning
        if faults.reasoning is not None
        else reasoning_default(model, effort if isinstance(effort, str) else None),
    )
    chat = ChatRequest(
        answer=answer,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        logprobs=bool(logprobs),
        top_logprobs=top or 0,
    )
    return chat, last_user_raw


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def usage(messages: Sequence[Mapping[str, Any]], choices: Sequence[Choice]) -> dict[str, Any]:
    """Plausible, stable numbers: a word count stands in for a tokenizer, one unit is one token."""
    prompt = sum(len(content_text(m.get("content")).split()) + 4 for m in messages)
    completion = sum(len(c.units) for c in choices)
    reasoning = sum(1 for c in choices for u in c.units if u[0] == "reasoning")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _logprob(token: str, top: int) -> dict[str, Any]:
    """A stable, plausible logprob entry: the token itself first, then ``top - 1`` alternatives."""
    crc = zlib.crc32(token.encode("utf-8"))
    logprob = -round((crc % 2000) / 1000.0, 4)
    alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}]
    for k in range(1, top):
        alt = " " + WORDS[(crc + 31 * k) % len(WORDS)]
        alternatives.append({"token": alt, "logprob": round(logprob - k * 0.75, 4), "bytes": list(alt.encode("utf-8"))})
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": alternatives[:top],
    }


def _delta(choice: Choice, kind: str, text: str, call: int) -> dict[str, Any]:
    if kind == "content":
        return {"content": text}
    if kind == "reasoning":
        return {"reasoning_content": text}
    if kind == "refusal":
        return {"refusal": text}
    if kind == "tool_start":
        tool = choice.calls[call]
        return {
            "tool_calls": [
                {"index": call, "id": tool.id, "type": "function", "function": {"name": text, "arguments": ""}}
            ]
        }
    return {"tool_calls": [{"index": call, "function": {"arguments": text}}]}


def _role_delta(choice: Choice) -> dict[str, Any]:
    text_answer = any(u[0] == "content" for u in choice.units) or not choice.units
    return {"role": "assistant", "content": "" if text_answer else None, "refusal": None}


async def stream_chat(
    request: web.Request, req: ChatRequest, record: RequestRecord, headers: Mapping[str, str]
) -> web.StreamResponse:
    answer, faults = req.answer, req.answer.faults
    choices = plan_answer(answer)
    record.continuation = choices[0].continuation
    head = {
        "id": f"chatcmpl-sim{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": answer.model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    tail: dict[str, Any] = {"usage": None} if req.include_usage else {}
    top = req.top_logprobs

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        payload = {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            **tail,
        }
        return b"data: " + dumps(payload) + b"\n\n"

    resp, body = await start_stream(
        request, {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **headers}, faults
    )
    record.status, record.headers_sent = 200, time.monotonic()
    error = error_body(500, "The server had an error while processing your request (simulated in-stream error).")
    delivery = Delivery(
        request, body, record, faults, keepalive=b": keepalive\n\n", error_frame=b"data: " + dumps(error) + b"\n\n"
    )
    await delivery.silence(faults.first_delay)
    for choice in choices:
        await body.write(chunk(choice.index, _role_delta(choice)))
    record.first_chunk = time.monotonic()
    count_all = faults.count == "all"
    sent = 0
    finish_override: str | None = None
    for index, (kind, text, call) in interleave(choices):
        counted = count_all or kind == "tool_args"
        if counted:
            outcome = await delivery.faults_after(sent)
            if outcome != GO_ON:
                if outcome != FILTERED:
                    return resp
                finish_override = "content_filter"
                break
        await delivery.silence(faults.gap)
        logprobs = None
        if req.logprobs and kind in ("content", "refusal"):
            entry = [_logprob(text, top)]
            logprobs = {"content": entry, "refusal": None} if kind == "content" else {"content": None, "refusal": entry}
        await body.write(chunk(index, _delta(choices[index], kind, text, call), None, logprobs))
        record.chunks += 1
        sent += counted
    else:
        outcome = await delivery.faults_after(sent)
        if outcome == FILTERED:
            finish_override = "content_filter"
        elif outcome != GO_ON:
            return resp
    for choice in choices:
        await body.write(chunk(choice.index, {}, finish_override or choice.finish))
    if faults.usage_delay:
        await delivery.silence(faults.usage_delay)
    if req.include_usage:
        usage_chunk = {**head, "choices": [], "usage": usage(answer.messages, choices)}
        await body.write(b"data: " + dumps(usage_chunk) + b"\n\n")
    await body.write(b"data: [DONE]\n\n")
    await body.write_eof()
    record.outcome = "complete"
    return resp


async def complete_chat(
    request: web.Request, req: ChatRequest, record: RequestRecord, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Non-streamed answer. Stream faults are mapped to their nearest non-stream equivalent."""
    answer, faults = req.answer, req.answer.faults
    choices = plan_answer(answer)
    record.continuation = choices[0].continuation
    counted = counted_units(choices, faults)
    fault, response = await non_stream_faults(request, record, faults, counted, b'{"id": "chatcmpl-sim", not json')
    if response is not None:
        return response
    if fault == "error":
        record.outcome, record.status = "status", 500
        return error_response(500)
    if fault == "content_filter":
        cut_for_filter(choices, faults)
    body = {
        "id": f"chatcmpl-sim{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [_message_choice(c, req) for c in choices],
        "usage": usage(answer.messages, choices),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    record.outcome, record.status, record.chunks = "complete", 200, sum(len(c.units) for c in choices)
    record.first_chunk = record.headers_sent = time.monotonic()
    return web.Response(body=dumps(body), content_type="application/json", headers=headers)


def _message_choice(choice: Choice, req: ChatRequest) -> dict[str, Any]:
    refusal = choice.text("refusal")
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if choice.calls or refusal else choice.text("content"),
        "refusal": refusal or None,
        "annotations": [],
    }
    reasoning = choice.text("reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    started = {u[2] for u in choice.units if u[0] == "tool_start"}
    if started:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": choice.arguments(k)}}
            for k, call in enumerate(choice.calls)
            if k in started
        ]
    logprobs = None
    if req.logprobs:
        entries = [_logprob(u[1], req.top_logprobs) for u in choice.units if u[0] in ("content", "refusal")]
        logprobs = {"content": None, "refusal": entries} if refusal else {"content": entries, "refusal": None}
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish}
