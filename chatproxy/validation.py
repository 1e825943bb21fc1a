"""Validation of chat requests, shared by every way in.

Each failure is a :class:`InvalidRequest` carrying the HTTP status and a message that names the
problem (which field, what was expected); transports render it in their own error shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config
from chatproxy.core import ChatRequest

ROLES = frozenset({"system", "user", "assistant"})
NATIVE_FIELDS = frozenset({"messages", "model", "temperature", "max_tokens", "seed"})
#: Fields of the native request that shape the answer beyond text, passed on as the OpenAI way in
#: passes them (the answer's tool calls arrive as ``tool_call`` events).
NATIVE_PASSED = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


class InvalidRequest(Exception):
    """A request chatproxy refuses; ``status`` is 400, 413 or 415 (``code`` stays ``bad_request``)."""

    def __init__(
        self, message: str, *, status: int = 400, code: ErrorCode = ErrorCode.BAD_REQUEST, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


def max_body_bytes() -> int:
    """Largest request body accepted: the input cap (UTF-8, worst case 4 bytes/char) plus JSON room."""
    limits = get_config()["LIMITS"]
    return int(limits["MAX_INPUT_CHARS"]) * 4 + 64 * 1024


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, integer: bool) -> Any:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{name}' must be a number.", param=name)
    if integer and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise InvalidRequest(f"'{name}' must be a whole number.", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a finite number.", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}.", param=name)
    return int(value) if integer else float(value)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """The native ``messages`` list (text turns of system, user and assistant), checked against
    roles, types and the ``LIMITS`` caps."""
    cleaned = []
    total = 0
    for index, message in enumerate(_message_list(messages)):
        where = f"messages[{index}]"
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str) or role not in ROLES:  # (a list or object is unhashable)
            raise InvalidRequest(f"{where}.role must be one of: system, user, assistant.", param=where)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string.", param=where)
        total += len(content)
        cleaned.append({"role": role, "content": content})
    _check_total(total)
    if cleaned[-1]["role"] == "assistant":
        raise InvalidRequest("The last message must come from the user or the system.", param="messages")
    return cleaned


def _message_list(messages: Any) -> list[dict[str, Any]]:
    limits = get_config()["LIMITS"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > limits["MAX_MESSAGES"]:
        raise InvalidRequest(
            f"Too many messages: {len(messages)}; at most {limits['MAX_MESSAGES']} are allowed.",
            status=413,
            param="messages",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}] must be an object with 'role' and 'content'.",
                                 param=f"messages[{index}]")
    return messages


def _check_total(total: int) -> None:
    limit = get_config()["LIMITS"]["MAX_INPUT_CHARS"]
    if total > limit:
        raise InvalidRequest(
            f"The conversation is too long: {total} characters; at most {limit} are allowed.",
            status=413,
            param="messages",
        )


# The OpenAI message fields each role may have (besides ``role``), and the content part types.
_OPENAI_MESSAGE_FIELDS = {
    "system": frozenset({"content", "name"}),
    "developer": frozenset({"content", "name"}),
    "user": frozenset({"content", "name"}),
    "assistant": frozenset({"content", "name", "tool_calls", "refusal", "audio", "reasoning_content"}),
    "tool": frozenset({"content", "tool_call_id", "name"}),
}
_PART_TYPES = {
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
}
_TEXT_PARTS = frozenset({"text"})


def validate_openai_messages(messages: Any) -> list[dict[str, Any]]:
    """The OpenAI ``messages`` list, checked for shape and size and passed on as given.

    Every role the API knows: ``system``, ``developer`` (sent as ``system``, which every
    OpenAI-compatible server understands), ``user`` (content a string or a list of ``text``,
    ``image_url``, ``input_audio`` and ``file`` parts), ``assistant`` (content may be null when it
    has ``tool_calls``) and ``tool`` (a ``tool_call_id`` and the result). A field a role does not
    have is refused, never dropped; fields whose value is null are left out. Text, image URLs and
    tool-call arguments count against ``MAX_INPUT_CHARS``.
    """
    cleaned: list[dict[str, Any]] = []
    total = 0
    for index, message in enumerate(_message_list(messages)):
        where = f"messages[{index}]"
        role = message.get("role")
        if not isinstance(role, str) or role not in _OPENAI_MESSAGE_FIELDS:
            raise InvalidRequest(f"{where}.role must be one of: {', '.join(_OPENAI_MESSAGE_FIELDS)}.", param=where)
        fields = {key: value for key, value in message.items() if key != "role" and value is not None}
        unknown = sorted(set(fields) - _OPENAI_MESSAGE_FIELDS[role])
        if unknown:
            raise InvalidRequest(f"{where}: unknown field '{unknown[0]}' for a {role} message.", param=where)
        content = fields.get("content")
        if content is None:
            if role != "assistant" or "tool_calls" not in fields:
                raise InvalidRequest(f"{where}.content is required.", param=where)
        else:
            total += _content_size(content, _PART_TYPES.get(role, _TEXT_PARTS), where)
        if "name" in fields and (not isinstance(fields["name"], str) or len(fields["name"]) > 256):
            raise InvalidRequest(f"{where}.name must be a string.", param=where)
        if role == "tool" and not isinstance(fields.get("tool_call_id"), str):
            raise InvalidRequest(f"{where}.tool_call_id must be the id of the tool call it answers.", param=where)
        if "tool_calls" in fields:
            total += _tool_calls_size(fields["tool_calls"], f"{where}.tool_calls")
        if "refusal" in fields and not isinstance(fields["refusal"], str):
            raise InvalidRequest(f"{where}.refusal must be a string.", param=where)
        cleaned.append({"role": "system" if role == "developer" else role, **fields})
    _check_total(total)
    if cleaned[-1]["role"] == "assistant":
        raise InvalidRequest("The last message must come from the user, the system or a tool.", param="messages")
    return cleaned


def _content_size(content: Any, part_types: frozenset[str], where: str) -> int:
    """Characters in a message's content (a string or a list of parts), checking each part."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts.", param=where)
    size = 0
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in part_types:
            raise InvalidRequest(
                f"{where}.content[{number}] must be a part of type {' or '.join(sorted(part_types))}.", param=where
            )
        value = part.get(kind)
        if kind in ("text", "refusal"):
            if not isinstance(value, str):
                raise InvalidRequest(f"{where}.content[{number}].{kind} must be a string.", param=where)
            size += len(value)
        elif kind == "image_url":
            if not isinstance(value, dict) or not isinstance(value.get("url"), str):
                raise InvalidRequest(f"{where}.content[{number}].image_url.url must be a string.", param=where)
            size += len(value["url"])
        else:
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}.content[{number}].{kind} must be an object.", param=where)
            size += sum(len(v) for v in value.values() if isinstance(v, str))
    return size


def _tool_calls_size(calls: Any, where: str) -> int:
    if not isinstance(calls, list) or not calls:
        raise InvalidRequest(f"{where} must be a non-empty list of tool calls.", param=where)
    size = 0
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or not isinstance(call.get("id"), str)
                or call.get("type", "function") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)):
            raise InvalidRequest(
                f"{where}[{number}] must be {{'id': str, 'type': 'function', "
                "'function': {'name': str, 'arguments': str}}.", param=where,
            )
        size += len(function["arguments"])
    return size


def validate_model(model: Any) -> str:
    """The model name, defaulting to ``UPSTREAM.MODEL`` and checked against ``UPSTREAM.MODELS``."""
    upstream = get_config()["UPSTREAM"]
    if model is None:
        return str(upstream["MODEL"])
    if not isinstance(model, str) or not model.strip() or len(model) > 200 or not model.isprintable():
        raise InvalidRequest("'model' must be a non-empty string of printable characters (at most 200).",
                             param="model")
    allowed = upstream["MODELS"]
    if allowed is not None and model not in allowed:
        raise InvalidRequest(f"Model '{model}' is not available. Choose one of: {', '.join(allowed)}.", param="model")
    return model


def validate_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """Optional sampling parameters, range-checked; only those present are returned."""
    params: dict[str, Any] = {}
    if body.get("temperature") is not None:
        params["temperature"] = _number(body, "temperature", 0, 2, integer=False)
    if body.get("max_tokens") is not None:
        params["max_tokens"] = _number(body, "max_tokens", 1, 1_000_000, integer=True)
    if body.get("seed") is not None:
        params["seed"] = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    return params


def parse_native_request(body: Any) -> ChatRequest:
    """A :class:`ChatRequest` from the JSON body of ``POST /chat/stream/`` (or a WebSocket frame)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - NATIVE_FIELDS - set(NATIVE_PASSED))
    if unknown:
        allowed = sorted(NATIVE_FIELDS | set(NATIVE_PASSED))
        raise InvalidRequest(
            f"Unknown field(s): {', '.join(map(str, unknown))}. Allowed: {', '.join(allowed)}.",
            param=str(unknown[0]),
        )
    params = validate_params(body)
    params.update(_passed(body, NATIVE_PASSED))
    return ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_messages(body.get("messages")),
        params=params,
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_CHOICES = ("none", "auto", "required")
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_MAX_TOOLS = 128

#: Fields of the OpenAI body that cannot be honoured through a streamed text-and-tools proxy.
OPENAI_REFUSED = {
    "functions": "'functions' is deprecated: send 'tools' instead.",
    "function_call": "'function_call' is deprecated: send 'tool_choice' instead.",
    "audio": "Audio output is not supported by this endpoint.",
    "modalities": "'modalities' is not supported by this endpoint: answers are text and tool calls.",
}


def _tools(value: Any) -> list[Any]:
    if not isinstance(value, list) or not 1 <= len(value) <= _MAX_TOOLS:
        raise InvalidRequest(f"'tools' must be a list of 1 to {_MAX_TOOLS} tools.", param="tools")
    for number, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequest(f"tools[{number}] must be {{'type': 'function', 'function': {{...}}}}.",
                                 param=f"tools[{number}]")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise InvalidRequest(f"tools[{number}].function.name must be 1 to 64 letters, digits, '_' or '-'.",
                                 param=f"tools[{number}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidRequest(f"tools[{number}].function.parameters must be a JSON schema object.",
                                 param=f"tools[{number}].function.parameters")
        if not isinstance(function.get("description", ""), str):
            raise InvalidRequest(f"tools[{number}].function.description must be a string.",
                                 param=f"tools[{number}].function.description")
    return value


def _tool_choice(value: Any) -> Any:
    if value in _TOOL_CHOICES:
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(function, dict) \
            or not isinstance(function.get("name"), str):
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': str}}.", param="tool_choice")
    return value


def _response_format(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _RESPONSE_FORMATS:
        raise InvalidRequest("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}.",
                             param="response_format")
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) \
                or not isinstance(schema.get("schema", {}), dict):
            raise InvalidRequest("'response_format.json_schema' must be {'name': str, 'schema': {...}}.",
                                 param="response_format")
    return value


def _of_type(name: str, kind: type, what: str, max_length: int = 0) -> Callable[[Any], Any]:
    """A check that a value is a ``kind`` (a bool is not a number here) of at most ``max_length``."""

    def check(value: Any) -> Any:
        if (type(value) is bool) != (kind is bool) or not isinstance(value, kind) \
                or (max_length and len(value) > max_length):  # type: ignore[arg-type]  # a str or dict
            raise InvalidRequest(f"'{name}' must be {what}.", param=name)
        return value

    return check


def _logit_bias(value: Any) -> Any:
    if not isinstance(value, dict) or len(value) > 300 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100 for v in value.values()
    ):
        raise InvalidRequest("'logit_bias' must map at most 300 token ids to numbers from -100 to 100.",
                             param="logit_bias")
    return value


def _ranged(name: str, low: float, high: float, *, integer: bool) -> Callable[[Any], Any]:
    return lambda value: _number({name: value}, name, low, high, integer=integer)


#: The optional fields of the OpenAI body passed to the upstream as given once their shape is
#: checked. Any other field is refused with a 400 naming it (a null value counts as absent).
OPENAI_PASSED: dict[str, Callable[[Any], Any]] = {
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _of_type("parallel_tool_calls", bool, "true or false"),
    "response_format": _response_format,
    "n": _ranged("n", 1, 128, integer=True),
    "logprobs": _of_type("logprobs", bool, "true or false"),
    "top_logprobs": _ranged("top_logprobs", 0, 20, integer=True),
    "top_p": _ranged("top_p", 0, 1, integer=False),
    "presence_penalty": _ranged("presence_penalty", -2, 2, integer=False),
    "frequency_penalty": _ranged("frequency_penalty", -2, 2, integer=False),
    "max_completion_tokens": _ranged("max_completion_tokens", 1, 1_000_000, integer=True),
    "logit_bias": _logit_bias,
    "user": _of_type("user", str, "a string of at most 256 characters", 256),
    "reasoning_effort": _of_type("reasoning_effort", str, "a string such as 'low', 'medium' or 'high'", 32),
    "verbosity": _of_type("verbosity", str, "a string such as 'low', 'medium' or 'high'", 32),
    "service_tier": _of_type("service_tier", str, "a string such as 'auto' or 'default'", 32),
    "store": _of_type("store", bool, "true or false"),
    "metadata": _of_type("metadata", dict, "an object of at most 16 entries", 16),
    "prompt_cache_key": _of_type("prompt_cache_key", str, "a string of at most 256 characters", 256),
    "safety_identifier": _of_type("safety_identifier", str, "a string of at most 256 characters", 256),
    "prediction": _of_type("prediction", dict, "an object"),
}
#: Fields this endpoint reads itself (the rest of validate_params' are passed on too).
OPENAI_OWN = frozenset({"model", "messages", "stream", "stream_options", "temperature", "max_tokens", "seed", "stop"})


def _passed(body: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The fields of ``names`` present (not null) in ``body``, each checked (:data:`OPENAI_PASSED`)."""
    params = {name: OPENAI_PASSED[name](body[name]) for name in names if body.get(name) is not None}
    if ("tool_choice" in params or "parallel_tool_calls" in params) and "tools" not in params:
        name = "tool_choice" if "tool_choice" in params else "parallel_tool_calls"
        raise InvalidRequest(f"'{name}' needs 'tools'.", param=name)
    return params


def parse_openai_request(body: Any) -> tuple[ChatRequest, bool, bool]:
    """``(request, stream, include_usage)`` from an OpenAI chat-completions body."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name, message in OPENAI_REFUSED.items():
        if body.get(name) is not None:
            raise InvalidRequest(message, param=name)
    unknown = sorted(str(name) for name, value in body.items()
                     if value is not None and name not in OPENAI_PASSED and name not in OPENAI_OWN)
    if unknown:
        raise InvalidRequest(f"Unknown parameter '{unknown[0]}'.", param=unknown[0])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if "model" not in body:
        raise InvalidRequest("'model' is required.", param="model")
    params = validate_params(body)
    params.update(_passed(body, OPENAI_PASSED))
    if "top_logprobs" in params and not params.get("logprobs"):
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or a list of at most 4 strings.", param="stop")
        params["stop"] = stop
    request = ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_openai_messages(body.get("messages")),
        params=params,
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )
    return request, stream, bool(options.get("include_usage"))


# --- the Responses API (``POST /chat/v1/responses``) ---------------------------------------------

#: Accepted and not sent on: they change neither the answer nor its shape here.
RESPONSES_IGNORED = frozenset({
    "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
    "truncation", "include", "stream_options", "reasoning", "max_tool_calls",
})
#: Known parameters this endpoint cannot honour yet: a 400 naming them.
RESPONSES_REFUSED = frozenset({"previous_response_id", "conversation", "prompt", "top_logprobs"})
RESPONSES_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "background",
    "store", "text", "tools", "tool_choice", "parallel_tool_calls",
}) | RESPONSES_IGNORED | RESPONSES_REFUSED
#: Content part types that carry plain text, in input messages.
_RESPONSES_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
#: The fields of a Responses function tool.
_RESPONSES_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses API request: the chat request it becomes, and how to answer it."""

    chat: ChatRequest
    stream: bool
    background: bool
    store: bool
    #: The request's settings the response object repeats (``tools``, ``metadata`` ...), as given
    #: or their defaults, in the Responses API's shapes.
    echo: dict[str, Any]


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.", param=name)
    return value


def _item_text(content: Any, where: str, field: str = "content") -> str:
    """An input message's content (a string, or a list of text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.{field} must be a string or a list of content parts.", param=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _RESPONSES_TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"{where}.{field}[{index}] must be a text part ({{'type': 'input_text', 'text': str}}); "
                "other part types are not supported here.",
                param=where,
            )
        texts.append(part["text"])
    return "".join(texts)


def _input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages (roles and caps are checked afterwards).

    ``function_call`` items become the ``tool_calls`` of an assistant message (the one just before
    them, when the previous item was the assistant's), ``function_call_output`` items ``tool``
    messages: the shapes a Chat Completions upstream knows."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("'input' must be a string or a non-empty list of message items.", param="input")
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be a message item ({{'role', 'content'}}).", param=where)
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # a reasoning item sent back: meant for the model that wrote it, not for a chat upstream
        if kind == "function_call":
            _add_call(messages, item, where)
            continue
        if kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"{where}.call_id must be the call_id of the function_call it answers.",
                                     param=where)
            output = item.get("output")
            text = output if isinstance(output, str) else _item_text(output, where, "output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            continue
        if kind != "message":
            raise InvalidRequest(f"{where}: items of type {str(kind)[:40]!r} are not supported here; send "
                                 "messages, function_call and function_call_output items.", param=where)
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(f"{where}.role must be one of: user, system, developer, assistant.", param=where)
        messages.append({"role": role, "content": _item_text(item.get("content"), where)})
    return messages


def _add_call(messages: list[dict[str, Any]], item: Mapping[str, Any], where: str) -> None:
    """A ``function_call`` input item as a tool call of the assistant message it belongs to."""
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not (isinstance(call_id, str) and call_id and isinstance(name, str) and isinstance(arguments, str)):
        raise InvalidRequest(f"{where} must be {{'type': 'function_call', 'call_id': str, 'name': str, "
                             "'arguments': str}.", param=where)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last["content"]:
            last["content"] = None  # an assistant message that only calls tools has no content
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _responses_tools(body: Mapping[str, Any]) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in Chat Completions' shapes.

    A Responses function tool is flat (``{"type": "function", "name", "description", "parameters",
    "strict"}``); Chat Completions nests the same fields under ``function``. Only function tools
    can be called through a chat upstream: the built-in tools (web search, file search ...) are a
    400. ``parallel_tool_calls`` without tools changes nothing and is not sent."""
    raw = body.get("tools")
    params: dict[str, Any] = {}
    if raw is not None and raw != []:
        if not isinstance(raw, list):
            raise InvalidRequest("'tools' must be a list of function tools.", param="tools")
        tools = []
        for number, tool in enumerate(raw):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise InvalidRequest(f"tools[{number}]: only function tools ({{'type': 'function', 'name', "
                                     f"'parameters'}}) are supported here, not {str(kind)[:40]!r}.",
                                     param=f"tools[{number}]")
            unknown = sorted(set(tool) - _RESPONSES_TOOL_FIELDS)
            if unknown:
                raise InvalidRequest(f"tools[{number}]: unknown field '{str(unknown[0])[:40]}'.",
                                     param=f"tools[{number}]")
            function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                        if tool.get(key) is not None}
            tools.append({"type": "function", "function": function})
        params["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        if "tools" not in params:
            if choice not in ("auto", "none"):
                raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
        else:
            try:
                params["tool_choice"] = _tool_choice(choice)
            except InvalidRequest:
                raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or "
                                     "{'type': 'function', 'name': str}.", param="tool_choice") from None
    parallel = _flag(body, "parallel_tool_calls", True)
    if "tools" in params and body.get("parallel_tool_calls") is not None:
        params["parallel_tool_calls"] = parallel
    return params


def parse_responses_request(body: Any) -> ResponsesRequest:
    """A :class:`ResponsesRequest` from a Responses API body. Unknown parameters are a 400, as on
    OpenAI's own API; :data:`RESPONSES_REFUSED` ones too; :data:`RESPONSES_IGNORED` ones are accepted."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(str(name) for name in set(body) - RESPONSES_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0][:60]}'.", param=unknown[0][:60])
    for name in sorted(RESPONSES_REFUSED):
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this endpoint.", param=name)
    text = body.get("text")
    if text is not None:
        form = text.get("format") if isinstance(text, dict) else None
        if not isinstance(text, dict) or (form is not None and form != {"type": "text"}):
            raise InvalidRequest("Only plain text output is supported: 'text' may only be "
                                 "{'format': {'type': 'text'}}.", param="text")
    params = validate_params({"temperature": body.get("temperature")})
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = _number(body, "max_output_tokens", 1, 1_000_000, integer=True)
    if body.get("top_p") is not None:
        params["top_p"] = _number(body, "top_p", 0, 1, integer=False)
    params.update(_responses_tools(body))
    background = _flag(body, "background", False)
    store = _flag(body, "store", True)
    if background and not store:
        raise InvalidRequest("'background' needs 'store' (a background response is kept to be read later).",
                             param="background")
    chat = ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_openai_messages(_input_messages(body)),
        params=params,
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )
    echo = _responses_echo(body, params, background=background, store=store)
    return ResponsesRequest(chat=chat, stream=_flag(body, "stream", False), background=background, store=store,
                            echo=echo)


def _responses_echo(body: Mapping[str, Any], params: Mapping[str, Any], *, background: bool,
                    store: bool) -> dict[str, Any]:
    """What a response object says of its request (checked already, or checked here: ``metadata``
    and ``user`` are not sent on, but they are kept and shown again)."""
    metadata = body.get("metadata")
    if metadata is not None:
        _metadata(metadata)
    user = body.get("user")
    if user is not None:
        OPENAI_PASSED["user"](user)
    choice = body.get("tool_choice")
    return {
        "background": background,
        "instructions": body.get("instructions"),
        "max_output_tokens": params.get("max_tokens"),
        "metadata": metadata or {},
        "parallel_tool_calls": _flag(body, "parallel_tool_calls", True),
        "store": store,
        "temperature": params.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": choice if choice is not None else "auto",
        "tools": [{"type": "function", "name": tool["function"]["name"],
                   "description": tool["function"].get("description"),
                   "parameters": tool["function"].get("parameters"),
                   "strict": tool["function"].get("strict")} for tool in params.get("tools", ())],
        "top_p": params.get("top_p", 1.0),
        "user": user,
    }


def _metadata(value: Any) -> None:
    """Up to 16 string pairs, keys of at most 64 characters and values of at most 512."""
    if not isinstance(value, dict) or len(value) > 16 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
    ):
        raise InvalidRequest("'metadata' must be an object of at most 16 string pairs (keys of at most 64 "
                             "characters, values of at most 512).", param="metadata")
