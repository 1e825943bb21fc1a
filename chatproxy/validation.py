"""Validation of chat requests, shared by every way in.

Each failure is a :class:`InvalidRequest` carrying the HTTP status and a message that names the
problem (which field, what was expected); transports render it in their own error shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config
from chatproxy.core import ChatRequest

ROLES = frozenset({"system", "user", "assistant"})
NATIVE_FIELDS = frozenset({"messages", "model", "temperature", "max_tokens", "seed"})


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


def _text_of_parts(parts: list[Any], where: str) -> str:
    """OpenAI's content-part list (text parts only) as one string."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}.content parts must be {{'type': 'text', 'text': str}}.", param=where)
        texts.append(part["text"])
    return "".join(texts)


def validate_messages(messages: Any, *, openai_shape: bool = False) -> list[dict[str, str]]:
    """The ``messages`` list, checked against roles, types and the ``LIMITS`` caps.

    ``openai_shape`` also accepts what the OpenAI API does: the ``developer`` role (sent as
    ``system``) and content as a list of text parts.
    """
    limits = get_config()["LIMITS"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > limits["MAX_MESSAGES"]:
        raise InvalidRequest(
            f"Too many messages: {len(messages)}; at most {limits['MAX_MESSAGES']} are allowed.",
            status=413,
            param="messages",
        )
    cleaned = []
    total = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with 'role' and 'content'.", param=where)
        role = message.get("role")
        content = message.get("content")
        if openai_shape:
            if role == "developer":
                role = "system"
            if isinstance(content, list):
                content = _text_of_parts(content, where)
        if not isinstance(role, str) or role not in ROLES:  # (a list or object is unhashable)
            raise InvalidRequest(f"{where}.role must be one of: system, user, assistant.", param=where)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string.", param=where)
        total += len(content)
        cleaned.append({"role": role, "content": content})
    if total > limits["MAX_INPUT_CHARS"]:
        raise InvalidRequest(
            f"The conversation is too long: {total} characters; at most {limits['MAX_INPUT_CHARS']} are allowed.",
            status=413,
            param="messages",
        )
    if cleaned[-1]["role"] == "assistant":
        raise InvalidRequest("The last message must come from the user or the system.", param="messages")
    return cleaned


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
    unknown = sorted(set(body) - NATIVE_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"Unknown field(s): {', '.join(map(str, unknown))}. Allowed: {', '.join(sorted(NATIVE_FIELDS))}.",
            param=str(unknown[0]),
        )
    return ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_messages(body.get("messages")),
        params=validate_params(body),
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )


# Fields of the OpenAI request body that change the answer's shape and so cannot be honoured here.
OPENAI_REFUSED = ("tools", "tool_choice", "functions", "function_call", "response_format", "audio", "modalities")


def parse_openai_request(body: Any) -> tuple[ChatRequest, bool, bool]:
    """``(request, stream, include_usage)`` from an OpenAI chat-completions body."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name in OPENAI_REFUSED:
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this endpoint.", param=name)
    if body.get("n") not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if "model" not in body:
        raise InvalidRequest("'model' is required.", param="model")
    fields = dict(body)
    if fields.get("max_tokens") is None and fields.get("max_completion_tokens") is not None:
        fields["max_tokens"] = fields["max_completion_tokens"]
    params = validate_params(fields)
    if body.get("top_p") is not None:
        params["top_p"] = _number(body, "top_p", 0, 1, integer=False)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            params[name] = _number(body, name, -2, 2, integer=False)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or a list of at most 4 strings.", param="stop")
        params["stop"] = stop
    request = ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_messages(body.get("messages"), openai_shape=True),
        params=params,
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )
    return request, stream, bool(options.get("include_usage"))


# --- the Responses API (``POST /chat/v1/responses``) ---------------------------------------------

#: Accepted and not sent on: they change neither the answer nor its shape here.
RESPONSES_IGNORED = frozenset({
    "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
    "parallel_tool_calls", "truncation", "include", "stream_options", "reasoning", "max_tool_calls",
})
#: Known parameters this endpoint cannot honour yet: a 400 naming them.
RESPONSES_REFUSED = frozenset({"previous_response_id", "conversation", "prompt", "top_logprobs"})
RESPONSES_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "background",
    "store", "text", "tools", "tool_choice",
}) | RESPONSES_IGNORED | RESPONSES_REFUSED
#: Content part types that carry plain text, in input messages.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses API request: the chat request it becomes, and how to answer it."""

    chat: ChatRequest
    stream: bool
    background: bool
    store: bool


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.", param=name)
    return value


def _item_text(content: Any, where: str) -> str:
    """An input message's content (a string, or a list of text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts.", param=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"{where}.content[{index}] must be a text part ({{'type': 'input_text', 'text': str}}); "
                "other part types are not supported here.",
                param=where,
            )
        texts.append(part["text"])
    return "".join(texts)


def _input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages (roles and caps are checked afterwards)."""
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
        if kind != "message":
            raise InvalidRequest(f"{where}: items of type {str(kind)[:40]!r} are not supported here; "
                                 "send messages ({'role', 'content'}).", param=where)
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(f"{where}.role must be one of: user, system, developer, assistant.", param=where)
        messages.append({"role": role, "content": _item_text(item.get("content"), where)})
    return messages


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
    if body.get("tools"):
        raise InvalidRequest("'tools' is not supported by this endpoint yet.", param="tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise InvalidRequest("'tool_choice' must be 'auto' or 'none' without tools.", param="tool_choice")
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
    background = _flag(body, "background", False)
    store = _flag(body, "store", True)
    if background and not store:
        raise InvalidRequest("'background' needs 'store' (a background response is kept to be read later).",
                             param="background")
    chat = ChatRequest(
        model=validate_model(body.get("model")),
        messages=validate_messages(_input_messages(body), openai_shape=True),
        params=params,
        extra_body=get_config()["UPSTREAM"]["EXTRA_BODY"] or {},
    )
    return ResponsesRequest(chat=chat, stream=_flag(body, "stream", False), background=background, store=store)
