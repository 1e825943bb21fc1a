"""The stream core with more than text: tool calls, reasoning, refusals, logprobs, several choices.

Virtual clock and scripted upstream, as in ``test_core_unit.py``: an attempt's items are what an
adapter yields, a ``str`` for a choice-0 text delta and the chunk's ``choices`` list otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from chatproxy.core import ChatStream
from chatproxy.errors import StallTimeout, UpstreamDisconnected
from tests.scripted import Attempt, Opened, ScriptedStream, ScriptedUpstream, say
from tests.test_core_unit import REQUEST, P, at, play
from tests.vclock import on_virtual_clock


def head(call_id: str, name: str, index: int = 0, choice: int = 0) -> list[dict[str, Any]]:
    """A chunk's choices opening tool call ``index`` (as OpenAI streams it: empty arguments)."""
    call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    return [{"index": choice, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}]


def args(text: str, index: int = 0) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": text}}]},
             "logprobs": None, "finish_reason": None}]


def delta(**fields: Any) -> list[dict[str, Any]]:
    return [{"index": fields.pop("index", 0), "delta": fields, "logprobs": fields.pop("logprobs", None),
             "finish_reason": None}]


CALL = [head("call_1", "get_weather"), args('{"city"'), args(': "Paris"'), args("}")]


def calls(run: Any) -> list[dict[str, Any]]:
    return [e.data for e in run.named("tool_call")]


@on_virtual_clock
async def test_a_streamed_tool_call_is_one_event_per_delta() -> None:
    run = await play([say(*CALL, gap=0.1, finish_reason="tool_calls", usage={"total_tokens": 9})])
    assert run.names == ["start", "tool_call", "tool_call", "tool_call", "tool_call", "done"]
    assert calls(run) == [
        {"index": 0, "id": "call_1", "name": "get_weather", "arguments": ""},
        {"index": 0, "id": None, "name": None, "arguments": '{"city"'},
        {"index": 0, "id": None, "name": None, "arguments": ': "Paris"'},
        {"index": 0, "id": None, "name": None, "arguments": "}"},
    ]
    assert run.last.data == {"finish_reason": "tool_calls", "attempts": 1, "usage": {"total_tokens": 9},
                             "model": "gpt-4o-mini"}
    assert run.stream.stats.time_to_first_token == at(0.1)


@on_virtual_clock
async def test_tool_call_and_reasoning_deltas_are_progress_for_first_token_and_stall() -> None:
    # P.first_token is 2 s and P.stall 0.5 s: text only at 3 s, but something arrives every 0.4 s.
    items = [delta(reasoning_content="Let me think."), *[args(str(i)) for i in range(6)], "Done"]
    run = await play([say(head("call_1", "f"), *items, gap=0.4)])
    assert "retry" not in run.names
    assert run.named("reasoning")[0].data == {"text": "Let me think.", "field": "reasoning_content"}
    assert run.deltas() == ["Done"]


@on_virtual_clock
async def test_a_stall_in_the_middle_of_tool_call_arguments_restarts_the_call_seamlessly() -> None:
    first = say(*CALL[:2], gap=0.1, hang=True)
    run = await play([first, say(*CALL, gap=0.1, finish_reason="tool_calls")], allow_reset=False)
    assert run.names == ["start", "tool_call", "tool_call", "retry", "tool_call", "tool_call", "done"]
    assert run.named("retry")[0].data["reason"] == "stall"
    assert "".join(c["arguments"] for c in calls(run)) == '{"city": "Paris"}'
    assert [c["id"] for c in calls(run)] == ["call_1", None, None, None]


@on_virtual_clock
async def test_a_restart_whose_call_differs_resets_and_sends_the_new_call_whole() -> None:
    other = [head("call_2", "get_weather"), args('{"city": "Rome"}')]
    run = await play([say(*CALL[:3], gap=0.1, error=UpstreamDisconnected()), say(*other, finish_reason="tool_calls")])
    after = run.names[run.names.index("reset") + 1 :]
    assert after == ["tool_call", "tool_call", "done"]
    assert calls(run)[-2:] == [{"index": 0, "id": "call_2", "name": "get_weather", "arguments": ""},
                               {"index": 0, "id": None, "name": None, "arguments": '{"city": "Rome"}'}]


@on_virtual_clock
async def test_arguments_are_never_spliced_onto_another_call() -> None:
    # The same arguments under another id are another call: reset, never "call_1" + later pieces.
    other = [head("call_9", "get_weather"), *CALL[1:]]
    run = await play([say(*CALL[:2], error=UpstreamDisconnected()), say(*other)], allow_reset=False)
    assert run.last.data == {"code": "upstream_unavailable"}


@on_virtual_clock
async def test_a_restart_going_past_the_partial_arguments_joins_inside_a_piece() -> None:
    first = say(head("call_1", "f"), args('{"a": 1'), error=UpstreamDisconnected())
    run = await play([first, say(head("call_1", "f"), args('{"a": 1'), args('2, "b": 3}'))], allow_reset=False)
    assert "".join(c["arguments"] for c in calls(run)) == '{"a": 12, "b": 3}'


@on_virtual_clock
async def test_text_then_a_tool_call_after_a_restart_joins_at_the_text() -> None:
    first = say("I will", " check.", error=UpstreamDisconnected())
    run = await play([first, say("I will check.", head("call_1", "f"), args("{}"))], allow_reset=False)
    assert run.deltas() == ["I will", " check."]
    assert [c["arguments"] for c in calls(run)] == ["", "{}"]


@on_virtual_clock
async def test_continue_is_not_used_for_a_partial_tool_call() -> None:
    policy = P.with_options(on_partial="continue")
    run = await play([say(*CALL[:2], error=UpstreamDisconnected()), say(*CALL)], policy)
    retried = run.upstream.opened[1].request
    assert retried.messages == run.upstream.opened[0].request.messages  # no prefilled assistant message
    assert "".join(c["arguments"] for c in calls(run)) == '{"city": "Paris"}'


@on_virtual_clock
async def test_refusal_logprobs_and_other_choices_keep_their_fields() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    items = [delta(content="Hi", logprobs=logprobs), delta(content="Yo", index=1), delta(refusal="No."),
             delta(reasoning="Hm", index=1)]
    run = await play([say(*items)])
    assert [(e.name, e.data) for e in run.events[1:-1]] == [
        ("delta", {"text": "Hi", "logprobs": logprobs}),
        ("delta", {"text": "Yo", "choice": 1}),
        ("refusal", {"text": "No."}),
        ("reasoning", {"text": "Hm", "field": "reasoning", "choice": 1}),
    ]


@on_virtual_clock
async def test_the_finish_reason_of_each_other_choice_is_kept() -> None:
    cut = [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    run = await play([say(delta(content="A"), delta(content="B", index=1), cut)])
    assert run.last.data["finish_reason"] == "stop"
    assert run.stream.stats.finish_reasons == {1: "length"}


@on_virtual_clock
async def test_a_partial_tool_call_is_partial_output_for_on_partial_fail() -> None:
    run = await play([Attempt(chunks=[(0.1, CALL[0])], error=StallTimeout())], P.with_options(on_partial="fail"))
    assert run.names == ["start", "tool_call", "error"]


class FinishedThenSilent(ScriptedStream):
    """Sends its chunks and its finish chunk, then never the usage chunk nor the end of the body."""

    async def _iterate(self) -> AsyncGenerator[Any, None]:
        for delay, item in self.attempt.chunks:
            await asyncio.sleep(delay)
            yield item
        self.finish_reason = "tool_calls"
        await self.loop.create_future()


@on_virtual_clock
async def test_a_stall_after_the_finish_chunk_ends_the_answer_instead_of_retrying() -> None:
    upstream = ScriptedUpstream([say(*CALL, gap=0.1)])
    loop = asyncio.get_running_loop()

    async def open_silent(request: Any) -> ScriptedStream:
        upstream.opened.append(Opened(request, loop.time()))
        stream = upstream.opened[-1].stream = FinishedThenSilent(upstream.script[0], loop)
        return stream

    upstream.open = open_silent  # type: ignore[method-assign]
    stream = ChatStream(upstream, REQUEST, P).start()  # type: ignore[arg-type]
    events = [event async for event in stream]
    await stream.aclose()
    assert [e.name for e in events] == ["start", *["tool_call"] * 4, "done"]
    assert events[-1].data == {"finish_reason": "tool_calls", "attempts": 1, "usage": None, "model": "gpt-4o-mini"}
    assert upstream.unclosed() == []
