"""The answer as the consumer has it: everything sent since the last reset.

Text and the rest. Most chunks are a text delta of choice 0 (an adapter yields it as a plain
``str``): :meth:`Answer.add` sends it as a ``delta`` event and keeps it in a list of strings, which
is all a text-only answer ever costs. Anything else arrives as the chunk's ``choices`` list and is
cut into *units* (:func:`units_of`), each a ``(channel, text, logprobs)`` triple:

=============================  ===============================  =========================================
channel                        text                             event (``data``)
=============================  ===============================  =========================================
``("content", c)``             a piece of choice ``c``'s text   ``delta`` ``{"text"}``
``("reasoning_content", c)``   a piece of reasoning             ``reasoning`` ``{"text", "field"}``
``("reasoning", c)``           the same, in that field          ``reasoning`` ``{"text", "field"}``
``("refusal", c)``             a piece of a refusal             ``refusal`` ``{"text"}``
``("call", c, i)``             tool call ``i`` begins:          ``tool_call`` ``{"index", "id", "name",
                               ``id + "\\0" + name``             "arguments": ""}``
``("args", c, i)``             a piece of its JSON arguments    ``tool_call`` ``{"index", "id": None,
                                                                "name": None, "arguments"}``
=============================  ===============================  =========================================

``field`` is the delta field the upstream used (``reasoning_content``, as DeepSeek and vLLM send,
or ``reasoning``), so a transport can write it back the same way. Every event of a choice other
than 0 also has ``"choice": c``; a unit that came with ``logprobs`` carries them as
``"logprobs"``. A transport rebuilds the upstream's deltas from these events one for one. The
``finish_reason`` of a choice other than 0 is kept in ``StreamStats.finish_reasons`` (choice 0's
is the ``done`` event's).

Once a unit that is not plain choice-0 text was sent, the answer is *structured*: it also keeps
every unit in order (:attr:`Answer.units`), which is what a restart is matched against
(:mod:`chatproxy.stream.joiner`) and why a partial tool call is never continued, only restarted.
``length`` counts the characters of every unit sent, so any output, not only text, is partial
output for the retry policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from chatproxy.stream.events import EventLog
from chatproxy.stream.values import StreamStats

Channel = tuple[Any, ...]
Unit = tuple[Channel, str, Any]

CONTENT = "content"
REFUSAL = "refusal"
CALL = "call"
ARGS = "args"
#: The delta fields reasoning arrives in, by provider.
REASONING_FIELDS = ("reasoning_content", "reasoning")
#: Choice 0's text channel: what :meth:`Answer.add` sends.
TEXT: Channel = (CONTENT, 0)


def units_of(choices: list[Any], finish_reasons: dict[int, str]) -> Iterator[Unit]:
    """The units of one chunk's ``choices``, in the order a reader would show them; the
    ``finish_reason`` of a choice other than 0 goes into ``finish_reasons``."""
    for choice in choices:
        index = choice.get("index") or 0
        if index and choice.get("finish_reason"):
            finish_reasons[index] = choice["finish_reason"]
        delta = choice.get("delta") or {}
        logprobs = choice.get("logprobs") or None
        for field in REASONING_FIELDS:
            text = delta.get(field)
            if text and isinstance(text, str):
                yield (field, index), text, None
        text = delta.get(CONTENT)
        if text and isinstance(text, str):
            yield (CONTENT, index), text, logprobs
            logprobs = None
        text = delta.get(REFUSAL)
        if text and isinstance(text, str):
            yield (REFUSAL, index), text, logprobs
            logprobs = None
        calls = delta.get("tool_calls")
        if not calls and isinstance(delta.get("function_call"), Mapping):
            calls = [{"index": 0, "function": delta["function_call"]}]  # the deprecated single-call form
        for call in calls or ():
            yield from _call_units(index, call)


def _call_units(choice: int, call: Mapping[str, Any]) -> Iterator[Unit]:
    number = call.get("index") or 0
    function = call.get("function") or {}
    call_id = call.get("id") or ""
    name = function.get("name") or ""
    if call_id or name:
        yield (CALL, choice, number), f"{call_id}\0{name}", None
    arguments = function.get("arguments")
    if arguments and isinstance(arguments, str):
        yield (ARGS, choice, number), arguments, None


def event_of(channel: Channel, text: str, logprobs: Any) -> tuple[str, dict[str, Any]]:
    """The event (name, data) that sends one unit."""
    kind = channel[0]
    data: dict[str, Any]
    if kind == CONTENT:
        name, data = "delta", {"text": text}
    elif kind == CALL or kind == ARGS:
        name = "tool_call"
        if kind == CALL:
            call_id, _, function = text.partition("\0")
            data = {"index": channel[2], "id": call_id or None, "name": function or None, "arguments": ""}
        else:
            data = {"index": channel[2], "id": None, "name": None, "arguments": text}
    elif kind == REFUSAL:
        name, data = "refusal", {"text": text}
    else:
        name, data = "reasoning", {"text": text, "field": kind}
    if channel[1]:
        data["choice"] = channel[1]
    if logprobs is not None:
        data["logprobs"] = logprobs
    return name, data


class Answer:
    """Sends the answer to the consumer (events) and remembers it, for joining a retry onto it."""

    __slots__ = ("_log", "_parts", "_started_at", "_stats", "length", "units")

    def __init__(self, log: EventLog, stats: StreamStats, started_at: float) -> None:
        self._log = log
        self._stats = stats
        self._started_at = started_at
        self._parts: list[str] = []
        #: Every unit sent, in order, once the answer is structured (None while it is plain text).
        self.units: list[Unit] | None = None
        self.length = 0  # characters sent since the last reset

    @property
    def finish_reasons(self) -> dict[int, str]:
        """The ``finish_reason`` of each choice other than 0 (the stream's stats keep them)."""
        return self._stats.finish_reasons

    @property
    def structured(self) -> bool:
        """Something other than choice 0's text was sent (a tool call, reasoning, ...)."""
        return self.units is not None

    def add(self, text: str) -> None:
        """Send a piece of choice 0's text on."""
        self._parts.append(text)
        self.length += len(text)
        if self.units is not None:
            self.units.append((TEXT, text, None))
        if self._stats.time_to_first_token is None:
            self._stats.time_to_first_token = self._log.loop.time() - self._started_at
        self._log.emit("delta", {"text": text})

    def add_choices(self, choices: list[Any]) -> None:
        """Send on everything one chunk's ``choices`` carry."""
        for channel, text, logprobs in units_of(choices, self.finish_reasons):
            self.put(channel, text, logprobs)

    def put(self, channel: Channel, text: str, logprobs: Any = None) -> None:
        """Send one unit on."""
        if channel == TEXT and logprobs is None:
            self.add(text)
            return
        units = self.units
        if units is None:
            text_so_far = "".join(self._parts)
            units = self.units = [(TEXT, text_so_far, None)] if text_so_far else []
        units.append((channel, text, logprobs))
        if channel == TEXT:
            self._parts.append(text)
        self.length += len(text)
        if self._stats.time_to_first_token is None:
            self._stats.time_to_first_token = self._log.loop.time() - self._started_at
        self._log.emit(*event_of(channel, text, logprobs))

    def text(self) -> str:
        """Choice 0's text sent since the last reset."""
        return "".join(self._parts)

    def reset(self, reason: str) -> None:
        """Tell the consumer to discard what it has (``reset`` event) and start over empty."""
        self._log.emit("reset", {"reason": reason})
        self._parts = []
        self.units = None
        self.length = 0
