"""What an answer contains, independent of the wire format: the plan both APIs stream.

Contract
--------
:func:`plan_answer` turns an :class:`AnswerRequest` (an API-neutral view of a Chat Completions or a
Messages request) into one :class:`Choice` per requested choice. A choice is a flat list of
:data:`Unit` s in the order a real model emits them, and a finish reason:

* ``("reasoning", text, -1)`` -- reasoning ("thinking") text, before anything else;
* ``("content", text, -1)`` -- answer text: one word, or one fragment of a JSON answer;
* ``("refusal", text, -1)`` -- a refusal's text, instead of content;
* ``("tool_start", name, i)`` -- tool call ``i`` begins (its id is ``Choice.calls[i].id``);
* ``("tool_args", fragment, i)`` -- a piece of tool call ``i``'s arguments JSON.

Every unit is one streamed chunk and one completion token (``max_tokens`` cuts the list and makes
the finish reason ``length``), and every unit counts for the "after N" faults, except that
``count=args`` counts only ``tool_args`` units.

Everything is a pure function of the request (conversation, seed, salt, variant), so a retry
or a restart of the same request streams the same units, tool-call ids included:

* text: :func:`~chatproxy.simulator.text.answer_tokens`;
* a tool call is made when ``tools`` are given, ``tool_choice`` is not ``none``, and either the
  choice forces one (``required`` or a named function) or the last message is not a tool result.
  The tool is the named one, else the one whose name's words (``get_weather``: "weather") occur
  most in the last user message, the first on a tie. ``parallel_tool_calls: true`` (explicitly)
  makes two calls, the ``tool_calls=N`` directive N (the next tools in order, wrapping around);
* arguments and JSON answers are generated from the JSON schema (:func:`schema_value`);
* after tool results the answer first names each result (``"get_weather returned {...}."``),
  then goes on with generated text.

This module is pure: no I/O, stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .faults import Faults
from .text import WORDS, answer_tokens, content_text, continuation_tokens, rng_for, word_tokens

__all__ = [
    "REFUSAL_TEXT",
    "AnswerRequest",
    "Choice",
    "ToolCall",
    "ToolSpec",
    "Unit",
    "counted_units",
    "cut_for_filter",
    "fragments",
    "interleave",
    "plan_answer",
    "reasoning_default",
    "schema_value",
]

#: (kind, text, tool-call index or -1). See the module contract.
Unit = tuple[str, str, int]

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
_FRAGMENT_RE = re.compile(r"\s*(?:\w+|[^\w\s]+)")
_MAX_DEPTH = 8
_REASONING_MODEL_RE = re.compile(r"(reason|^o\d)", re.IGNORECASE)
_EFFORT_TOKENS = {"minimal": 2, "low": 4, "medium": 8, "high": 16}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the client offered: its name and its parameters' JSON schema."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class AnswerRequest:
    """An API-neutral request. ``messages`` are OpenAI-shaped (``role``, ``content``,
    ``tool_calls``, ``tool_call_id``); the Messages API is converted to that shape first."""

    model: str
    messages: list[dict[str, Any]]
    faults: Faults
    seed: Any = None
    salt: int = 0
    max_tokens: int | None = None
    n: int = 1
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # "none" | "auto" | "required" | "function"
    forced_tool: str | None = None  # with tool_choice="function"
    parallel: bool = False
    response_format: str = "text"  # "text" | "json_object" | "json_schema"
    schema: Mapping[str, Any] | None = None
    reasoning: int = 0  # reasoning units before the answer
    id_prefix: str = "call_"


@dataclass(slots=True)
class Choice:
    index: int
    units: list[Unit]
    finish: str  # "stop" | "length" | "tool_calls"
    calls: list[ToolCall] = field(default_factory=list)
    continuation: bool = False

    def text(self, kind: str) -> str:
        return "".join(u[1] for u in self.units if u[0] == kind)

    def arguments(self, call: int) -> str:
        """Tool call ``call``'s arguments as sent (shorter than planned if ``max_tokens`` cut)."""
        return "".join(u[1] for u in self.units if u[0] == "tool_args" and u[2] == call)


def reasoning_default(model: str, effort: str | None = None) -> int:
    """Reasoning units for a model that did not ask with the ``reasoning`` directive: models
    named like reasoning models (``*reason*``, ``o1``/``o3``/``o4-mini``...) think first."""
    if not _REASONING_MODEL_RE.search(model):
        return 0
    return _EFFORT_TOKENS.get(effort or "medium", 8)


def fragments(text: str) -> list[str]:
    """Split JSON text into token-like pieces (``{"``, ``location``, ``":"``, ...)."""
    return _FRAGMENT_RE.findall(text) or [text]


def schema_value(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value matching a simple JSON schema: objects (every property, in order), arrays,
    strings, numbers, integers, booleans, null, ``enum``, ``const`` and the first branch of
    ``anyOf`` / ``oneOf`` / ``allOf``. Unknown shapes give a short string."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    for branch in ("anyOf", "oneOf", "allOf"):
        options = schema.get(branch)
        if isinstance(options, list):
            non_null = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
            if non_null:
                return schema_value(non_null[0], rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, Mapping):
            return {}
        return {str(k): schema_value(v, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        low = _int(schema.get("minItems"), 1)
        high = _int(schema.get("maxItems"), max(low, 2))
        return [schema_value(schema.get("items"), rng, depth + 1) for _ in range(max(low, min(2, high)))]
    if kind == "integer":
        low = _int(schema.get("minimum"), 1)
        return rng.randint(low, max(low, _int(schema.get("maximum"), low + 99)))
    if kind == "number":
        floor = _num(schema.get("minimum"), 0.0)
        return round(rng.uniform(floor, max(floor, _num(schema.get("maximum"), floor + 100.0))), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return " ".join(rng.choice(WORDS) for _ in range(2))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _dump(value: Any, compact: bool) -> str:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, ensure_ascii=False, separators=separators)


def _pick_tools(req: AnswerRequest, last_user: str, count: int) -> list[ToolSpec]:
    names = [t.name for t in req.tools]
    if req.forced_tool in names:
        start = names.index(req.forced_tool)
    else:
        words = set(re.findall(r"[a-z0-9]+", last_user.lower()))
        scores = [sum(part in words for part in _name_parts(name)) for name in names]
        start = scores.index(max(scores))
    return [req.tools[(start + k) % len(req.tools)] for k in range(count)]


def _name_parts(name: str) -> list[str]:
    """``get_weather`` -> ``["weather"]``: the words of a tool name that say what it is about."""
    parts = (p.lower() for p in re.split(r"[_\-]+|(?<=[a-z])(?=[A-Z])", name))
    return [p for p in parts if len(p) > 2 and p not in _VERBS]


_VERBS = {"get", "set", "fetch", "list", "find", "search", "lookup", "run", "call", "tool"}


def _tool_results(messages: Sequence[Mapping[str, Any]]) -> str:
    """``"name returned RESULT."`` for each tool message at the end of the conversation."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
                names[str(call.get("id"))] = str(call["function"].get("name", "the tool"))
    tail: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        name = names.get(str(message.get("tool_call_id")), "the tool")
        tail.append(f"{name} returned {content_text(message.get('content')).strip()}.")
    return " ".join(reversed(tail))


def _words(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def _choice_variant(req: AnswerRequest, index: int) -> Any:
    parts: list[Any] = []
    if req.faults.per_model:
        parts.append(req.model)
    if index:
        parts.append(index)
    return parts or None


def _plan_choice(req: AnswerRequest, index: int) -> Choice:
    messages = req.messages
    faults = req.faults
    variant = _choice_variant(req, index)
    units: list[Unit] = []
    calls: list[ToolCall] = []
    continuation = False
    if req.reasoning:
        thinking_rng = rng_for(messages, req.seed, req.salt, ["reasoning", variant])
        units += [("reasoning", t, -1) for t in word_tokens(thinking_rng, req.reasoning)]
    last_role = messages[-1].get("role")
    wants_tool = bool(req.tools) and (
        req.tool_choice in ("required", "function") or (req.tool_choice == "auto" and last_role != "tool")
    )
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    finish = "stop"
    if faults.refuse:
        units += [("refusal", w, -1) for w in _words(REFUSAL_TEXT)]
    elif wants_tool:
        count = faults.tool_calls or (2 if req.parallel else 1)
        for k, tool in enumerate(_pick_tools(req, content_text(last_user and last_user.get("content")), count)):
            rng = rng_for(messages, req.seed, req.salt, ["tool", variant, k, tool.name])
            arguments = _dump(schema_value(tool.parameters, rng), compact=True)
            digest = hashlib.sha256(f"{rng.random()}".encode()).hexdigest()[:24]
            calls.append(ToolCall(id=f"{req.id_prefix}{digest}", name=tool.name, arguments=arguments))
            units.append(("tool_start", tool.name, k))
            units += [("tool_args", piece, k) for piece in fragments(arguments)]
        finish = "tool_calls"
    elif req.response_format != "text":
        rng = rng_for(messages, req.seed, req.salt, ["json", variant])
        if req.response_format == "json_schema" and req.schema is not None:
            value = schema_value(req.schema, rng)
        else:
            value = {"answer": "".join(word_tokens(rng, 8))}
        units += [("content", piece, -1) for piece in fragments(_dump(value, compact=False))]
    else:
        partial: str | None = None
        if last_role == "assistant" and not messages[-1].get("tool_calls"):
            partial = content_text(messages[-1].get("content"))
            messages = messages[:-1]
        tokens = answer_tokens(messages, req.seed, req.salt, faults.chunks, variant=variant)
        if partial is not None:
            rest = continuation_tokens(tokens, partial)
            continuation = rest is not None
            if rest is not None:
                tokens = rest
        results = _tool_results(messages) if messages[-1].get("role") == "tool" else ""
        if results:
            tokens = [*_words(results), *(" " + t.lstrip() for t in tokens)]
        units += [("content", t, -1) for t in tokens]
    if req.max_tokens is not None and req.max_tokens < len(units):
        del units[req.max_tokens :]
        finish = "length"
    return Choice(index=index, units=units, finish=finish, calls=calls, continuation=continuation)


def plan_answer(req: AnswerRequest) -> list[Choice]:
    """One :class:`Choice` per requested choice (see the module contract)."""
    return [_plan_choice(req, i) for i in range(req.n)]


def interleave(choices: Sequence[Choice]) -> list[tuple[int, Unit]]:
    """``(choice index, unit)`` in streaming order: round-robin across choices, as OpenAI does."""
    if len(choices) == 1:
        return [(0, u) for u in choices[0].units]
    out: list[tuple[int, Unit]] = []
    longest = max(len(c.units) for c in choices)
    for step in range(longest):
        out += [(c.index, c.units[step]) for c in choices if step < len(c.units)]
    return out


def counted_units(choices: Sequence[Choice], faults: Faults) -> int:
    if faults.count == "all":
        return sum(len(c.units) for c in choices)
    return sum(1 for c in choices for u in c.units if u[0] == "tool_args")


def cut_for_filter(choices: Sequence[Choice], faults: Faults) -> None:
    """Truncate the plan where ``content_filter_after`` fires (non-streamed answers)."""
    limit = faults.content_filter_after or 0
    seen = 0
    for choice in choices:
        kept = []
        for unit in choice.units:
            counted = faults.count == "all" or unit[0] == "tool_args"
            if counted and seen >= limit:
                break
            seen += counted
            kept.append(unit)
        choice.units, choice.finish = kept, "content_filter"
