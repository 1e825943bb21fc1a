"""Validation of chat requests, shared by every way in.

Each failure is a :class:`InvalidRequest` carrying the HTTP status and a message that names the
problem (which field, what was expected); transports render it in their own error shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
