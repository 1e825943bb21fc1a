"""The Responses API way in (``/chat/v1/responses``), driven by the official (current) openai client,
unmodified, against the live server and the simulator; and the OpenAI-shaped 404 of the prefix."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import aiohttp
import pytest

from chatproxy.simulator.text import answer_tokens
from tests.fixtures_servers import LIVE_RESUME

openai = pytest.importorskip("openai")
if not hasattr(openai, "AsyncOpenAI"):  # the legacy virtualenv has openai 0.27.x, without Responses
    pytest.skip("needs the current openai client", allow_module_level=True)

_unique = itertools.count()
#: A function tool in the Responses API's flat shape, and the same tool as Chat Completions has it.
WEATHER = {
    "type": "function", "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]},
    "strict": True,
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
#: Generous bound on any one exchange here: a hang fails the test instead of blocking the suite.
BOUND = 10.0


@pytest.fixture(scope="module")
def api_key(daphne: Any) -> str:
    daphne.manage("createsuperuser", "--noinput", "--username", "rita", "--email", "rita@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "rita-pass-123"})
    return str(daphne.manage("chatproxy_key", "create", "rita", "--name", "responses").strip())


@pytest.fixture
async def oai(daphne: Any, api_key: str) -> Any:
    client = openai.AsyncOpenAI(base_url=f"{daphne.url}/chat/v1", api_key=api_key, max_retries=0, timeout=15)
    yield client
    await client.close()


def ask(directive: str = "", chunks: int = 12) -> tuple[str, str]:
    """(a unique question with the fault, the exact answer the clean question gets)."""
    base = f"Describe a lighthouse #{next(_unique)}"
    question = f"{base} [[sim chunks={chunks} {directive}]]"
    return question, "".join(answer_tokens([{"role": "user", "content": question}], None, 0, chunks))


async def collect(stream: Any, stop_after: int | None = None) -> list[Any]:
    """The events of a Responses stream (until ``stop_after``'s sequence number, then close it)."""
    events = []
    async with asyncio.timeout(BOUND):
        async for event in stream:
            events.append(event)
            if stop_after is not None and event.sequence_number >= stop_after:
                break
    await stream.close()
    return events


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def assert_numbered(events: list[Any], first: int = 1) -> None:
    assert [e.sequence_number for e in events] == list(range(first, first + len(events)))


async def test_unknown_paths_under_the_prefix_are_openai_json_404s(daphne: Any, oai: Any, sim: Any) -> None:
    async with aiohttp.ClientSession(daphne.url) as session:
        for method, path in [("GET", "/chat/v1/nope"), ("POST", "/chat/v1/completions"), ("DELETE", "/chat/v1"),
                             ("POST", "/chat/v1/chat/completions/extra")]:
            async with session.request(method, path, json={"model": "m", "prompt": "hi"}) as reply:
                assert reply.status == 404, (method, path)
                assert reply.content_type == "application/json"
                body = await reply.json()
                assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "not_found"
                assert f"{method} {path}" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        await oai.completions.create(model="gpt-4o-mini", prompt="hi")
    assert caught.value.body["code"] == "not_found"
    assert sim.stats()["total_requests"] == 0


async def test_streamed_response_has_exact_text_and_typed_numbered_events(oai: Any, sim: Any) -> None:
    question, expected = ask()
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True))
    assert text_of(events) == expected and expected.strip()
    assert_numbered(events)
    kinds = [e.type for e in events if e.type != "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    final = events[-1].response
    assert final.status == "completed" and final.output_text == expected
    assert final.id == events[0].response.id and final.id.startswith("resp_")
    assert final.usage.output_tokens > 0 and final.usage.total_tokens >= final.usage.output_tokens
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == expected


async def test_non_streamed_response_and_retrieval(oai: Any, sim: Any) -> None:
    question, _ = ask()
    response = await oai.responses.create(model="gpt-4o-mini", instructions="Be brief.",
                                          input=[{"role": "user", "content": [{"type": "input_text",
                                                                                "text": question}]}])
    instructed = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    # Output items sent back as input (a reasoning item is skipped) continue the conversation.
    follow_up = await oai.responses.create(model="gpt-4o-mini", input=[
        {"role": "user", "content": question}, {"type": "reasoning", "id": "rs_1", "summary": []},
        *[item.model_dump() for item in response.output], {"role": "user", "content": "And then?"}])
    assert follow_up.output_text == "".join(answer_tokens(
        [{"role": "user", "content": question}, {"role": "assistant", "content": response.output_text},
         {"role": "user", "content": "And then?"}], None, 0, 20))
    assert response.output_text == "".join(answer_tokens(instructed, None, 0, 12))
    assert response.status == "completed" and response.object == "response"
    assert response.usage.input_tokens > 0
    again = await oai.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.status == "completed"
    assert again.created_at == response.created_at


async def test_max_output_tokens_gives_an_incomplete_response(oai: Any, sim: Any) -> None:
    question, _ = ask(chunks=30)
    response = await oai.responses.create(model="gpt-4o-mini", input=question, max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text


async def test_mid_stream_stall_is_invisible(oai: Any, sim: Any) -> None:
    question, expected = ask("stall_after=4 stall=30 times=1")
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True))
    assert text_of(events) == expected
    assert_numbered(events)
    assert events[-1].type == "response.completed"
    requests = sim.stats()["requests"]
    assert [r["attempt"] for r in requests] == [1, 2]


async def test_always_stalling_upstream_ends_with_response_failed(oai: Any, sim: Any) -> None:
    question, _ = ask("stall_after=3 stall=30")  # every attempt stalls
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True))
    assert_numbered(events)
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "upstream_timeout"
    assert "took too long" in failed.error.message
    assert failed.output[0].status == "incomplete"  # the partial text, as it was sent
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)
    with pytest.raises(RuntimeError):  # the SDK's stream helper refuses a response that never completed
        async with oai.responses.stream(model="gpt-4o-mini", input=ask("stall_after=3 stall=30")[0]) as stream:
            async with asyncio.timeout(BOUND):
                await stream.get_final_response()


async def test_non_streamed_failure_raises_with_the_status(oai: Any, sim: Any) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.responses.create(model="gpt-4o-mini", input=ask("status=503")[0])
    assert caught.value.status_code == 503 and caught.value.body["code"] == "upstream_unavailable"


async def test_resume_replays_after_starting_after_then_continues_live(oai: Any, sim: Any) -> None:
    question, expected = ask("gap=0.02", chunks=40)
    first = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True),
                          stop_after=8)
    response_id = first[0].response.id
    rest = await collect(await oai.responses.retrieve(response_id, stream=True, starting_after=8))
    events = first + rest
    assert_numbered(events)
    assert events[-1].type == "response.completed" and text_of(events) == expected
    assert rest[0].sequence_number == 9
    # Replayed events are the same ones: a resume from the start gives the same stream.
    replay = await collect(await oai.responses.retrieve(response_id, stream=True))
    assert [(e.type, e.sequence_number) for e in replay] == [(e.type, e.sequence_number) for e in events]
    assert replay[0].response.created_at == first[0].response.created_at


async def test_background_response_goes_on_without_a_client(oai: Any, sim: Any) -> None:
    question, expected = ask("gap=0.03", chunks=40)
    first = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True,
                                                     background=True), stop_after=5)
    await asyncio.sleep(LIVE_RESUME["GRACE"] + 0.4)  # longer than a plain stream waits for a resume
    rest = await collect(await oai.responses.retrieve(first[0].response.id, stream=True, starting_after=5))
    assert text_of(first + rest) == expected and rest[-1].type == "response.completed"
    assert_numbered(first + rest)


async def test_plain_stream_stops_after_the_grace_period(oai: Any, sim: Any) -> None:
    question, _ = ask("gap=0.05", chunks=400)
    first = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True),
                          stop_after=5)
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=LIVE_RESUME["GRACE"] + 1.0)
    rest = await collect(await oai.responses.retrieve(first[0].response.id, stream=True, starting_after=5))
    assert rest[-1].type == "response.failed" and rest[-1].response.error.code == "cancelled"


async def test_background_without_stream_is_polled(oai: Any, sim: Any) -> None:
    question, expected = ask("gap=0.02", chunks=20)
    queued = await oai.responses.create(model="gpt-4o-mini", input=question, background=True)
    assert queued.status == "queued" and queued.output == []
    async with asyncio.timeout(BOUND):
        for _ in range(100):  # polled every 0.1 s, as a client of a background response does
            polled = await oai.responses.retrieve(queued.id)
            if polled.status not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.1)
    assert polled.status == "completed" and polled.output_text == expected


async def test_cancel(oai: Any, sim: Any) -> None:
    queued = await oai.responses.create(model="gpt-4o-mini", input=ask("gap=0.05", chunks=400)[0], background=True)
    await oai.responses.cancel(queued.id)
    events = await collect(await oai.responses.retrieve(queued.id, stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "cancelled"
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


async def test_only_the_owner_may_read_a_response(oai: Any, daphne: Any, sim: Any) -> None:
    response = await oai.responses.create(model="gpt-4o-mini", input=ask()[0])
    daphne.manage("createsuperuser", "--noinput", "--username", "oscar", "--email", "o@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "oscar-pass-123"})
    key = daphne.manage("chatproxy_key", "create", "oscar").strip()
    other = openai.AsyncOpenAI(base_url=f"{daphne.url}/chat/v1", api_key=key, max_retries=0, timeout=15)
    try:
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(response.id, stream=True)
    finally:
        await other.close()
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve("nope")


async def test_stored_false_is_not_kept(oai: Any, sim: Any) -> None:
    question, expected = ask()
    response = await oai.responses.create(model="gpt-4o-mini", input=question, store=False)
    assert response.output_text == expected
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(response.id)


@pytest.mark.parametrize(("fields", "param"), [
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "name": "f g", "parameters": {"type": "object"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0]"),  # the Chat Completions shape
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"previous_response_id": "resp_x"}, "previous_response_id"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0]"),
    ({"input": [{"type": "file_search_call", "id": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
    ({"input": []}, "input"),
    ({"temperature": 3}, "temperature"),
    ({"background": True, "store": False}, "background"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
    ({"user": 7}, "user"),
])
async def test_bad_requests_are_clear_400s(oai: Any, sim: Any, fields: dict[str, Any], param: str) -> None:
    body = {"model": "gpt-4o-mini", "input": "hello", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.post("/responses", body=body, cast_to=object)
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"
    assert sim.stats()["total_requests"] == 0


async def test_retrieval_from_the_store_after_the_stream_ended(oai: Any, sim: Any) -> None:
    question, expected = ask()
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True))
    await asyncio.sleep(0.3)  # the journal wrote the last batch and forgot the stream: the store answers
    replay = await collect(await oai.responses.retrieve(events[0].response.id, stream=True, starting_after=3))
    assert [(e.type, e.sequence_number) for e in replay] == [(e.type, e.sequence_number) for e in events[3:]]
    assert (await oai.responses.retrieve(events[0].response.id)).output_text == expected


async def test_the_response_object_repeats_what_the_request_set(oai: Any, sim: Any) -> None:
    """As OpenAI's: instructions, tools, tool_choice, metadata, sampling settings and flags are
    shown again, in the object of a non-streamed answer, of the stream's events and of a retrieval."""
    question, _ = ask()
    asked: dict[str, Any] = dict(
        model="gpt-4o-mini", input=question, instructions="Answer briefly.", tools=[WEATHER, TIME],
        tool_choice="none", parallel_tool_calls=False, metadata={"ticket": "T-1", "team": "ops"},
        temperature=0.4, top_p=0.9, max_output_tokens=500, user="u-42",
    )

    def assert_repeats(response: Any) -> None:
        assert response.instructions == "Answer briefly." and response.tool_choice == "none"
        assert [tool.model_dump(exclude_none=True) for tool in response.tools] == [WEATHER, TIME]
        assert response.metadata == {"ticket": "T-1", "team": "ops"} and response.user == "u-42"
        assert (response.temperature, response.top_p, response.max_output_tokens) == (0.4, 0.9, 500)
        assert response.parallel_tool_calls is False and response.store is True and response.background is False

    answered = await oai.responses.create(**asked)
    assert_repeats(answered)
    assert_repeats(await oai.responses.retrieve(answered.id))
    events = await collect(await oai.responses.create(**asked, stream=True))
    assert_repeats(events[0].response)
    assert_repeats(events[-1].response)
    plain = await oai.responses.create(model="gpt-4o-mini", input=ask()[0])
    assert (plain.tools, plain.tool_choice, plain.metadata, plain.temperature, plain.instructions) == \
        ([], "auto", {}, 1.0, None)


@pytest.fixture(scope="module")
def two_workers(simulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two Daphne processes sharing one database and one (file) cache, and a key valid on both."""
    from tests.fixtures_servers import LIVE_LIMITS, LIVE_TIMEOUTS
    from tests.servers import AppServer, simulator_env

    shared = tmp_path_factory.mktemp("responses-two-workers")
    env = {**simulator_env(simulator.base_url, timeouts=LIVE_TIMEOUTS, resume=LIVE_RESUME, limits=LIVE_LIMITS),
           "DJANGO_DB_PATH": str(shared / "db.sqlite3"), "DJANGO_CACHE_DIR": str(shared / "cache")}
    first = AppServer(env).start()
    second = AppServer(env).start()
    first.manage("createsuperuser", "--noinput", "--username", "wendy", "--email", "w@example.com",
                 env={"DJANGO_SUPERUSER_PASSWORD": "wendy-pass-123"})
    key = first.manage("chatproxy_key", "create", "wendy").strip()
    yield first, second, key
    second.stop()
    first.stop()


async def test_resume_on_another_worker_continues_live(two_workers: Any, sim: Any) -> None:
    first, second, key = two_workers
    question, expected = ask("gap=0.03", chunks=60)
    one = openai.AsyncOpenAI(base_url=f"{first.url}/chat/v1", api_key=key, max_retries=0, timeout=15)
    two = openai.AsyncOpenAI(base_url=f"{second.url}/chat/v1", api_key=key, max_retries=0, timeout=15)
    try:
        # A plain stream: it runs longer than RESUME.GRACE after its client left the first worker,
        # which counts the client the second worker relays it to as its own.
        head = await collect(await one.responses.create(model="gpt-4o-mini", input=question, stream=True),
                             stop_after=6)
        rest = await collect(await two.responses.retrieve(head[0].response.id, stream=True, starting_after=6))
    finally:
        await one.close()
        await two.close()
    assert_numbered(head + rest)
    assert rest[-1].type == "response.completed" and text_of(head + rest) == expected
    (record,) = [r for r in sim.stats()["requests"] if r["status"] is not None]
    assert record["outcome"] == "complete"  # one generation, carried on while the client moved


async def test_a_stream_relayed_elsewhere_stops_after_its_relayed_client_leaves(two_workers: Any, sim: Any) -> None:
    first, second, key = two_workers
    one = openai.AsyncOpenAI(base_url=f"{first.url}/chat/v1", api_key=key, max_retries=0, timeout=15)
    two = openai.AsyncOpenAI(base_url=f"{second.url}/chat/v1", api_key=key, max_retries=0, timeout=15)
    try:
        head = await collect(await one.responses.create(model="gpt-4o-mini", input=ask("gap=0.05", chunks=400)[0],
                                                        stream=True), stop_after=4)
        rest = await collect(await two.responses.retrieve(head[0].response.id, stream=True, starting_after=4),
                             stop_after=12)
        assert_numbered(head + rest)
    finally:
        await one.close()
        await two.close()
    # Within a flag read (0.5 s) and RESUME.GRACE the first worker stops generating.
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=LIVE_RESUME["GRACE"] + 2.0)
    (record,) = [r for r in sim.stats()["requests"] if r["status"] is not None]
    assert record["outcome"] == "client_disconnected"


# ---------------------------------------------------------------------------------- tool calls

def weather_question(directive: str = "") -> tuple[str, str]:
    """(a unique weather question with the fault, the same question without it)."""
    base = f"What is the weather in Paris today? #{next(_unique)}"
    return (f"{base} [[sim {directive}]]" if directive else base), base


async def direct_calls(sim: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                       **params: Any) -> list[dict[str, str]]:
    """The tool calls the simulator itself makes for ``messages`` (asked over Chat Completions)."""
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-direct", max_retries=0) as direct:
        completion = await direct.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                          tools=[chat_tool(t) for t in tools], **params)
    return [{"call_id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in completion.choices[0].message.tool_calls]


def calls_of(output: list[Any]) -> list[dict[str, str]]:
    return [{"call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            for item in output if item.type == "function_call"]


def streamed_calls(events: list[Any]) -> list[dict[str, str]]:
    """The function calls put together from the events alone (added + argument deltas)."""
    items: dict[str, dict[str, str]] = {}
    for event in events:
        if event.type == "response.output_item.added" and event.item.type == "function_call":
            assert event.item.arguments == "" and event.item.status == "in_progress"
            items[event.item.id] = {"call_id": event.item.call_id, "name": event.item.name, "arguments": ""}
        elif event.type == "response.function_call_arguments.delta":
            items[event.item_id]["arguments"] += event.delta
        elif event.type == "response.function_call_arguments.done":
            assert event.arguments == items[event.item_id]["arguments"]
    return list(items.values())


async def test_a_streamed_tool_call_is_a_function_call_item(oai: Any, sim: Any) -> None:
    question, clean = weather_question()
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True,
                                                      tools=[WEATHER, TIME]))
    expected = await direct_calls(sim, [{"role": "user", "content": clean}], [WEATHER, TIME])
    assert streamed_calls(events) == expected and expected[0]["name"] == "get_weather"
    assert_numbered(events)
    kinds = [e.type for e in events if e.type != "response.function_call_arguments.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert sum(e.type == "response.function_call_arguments.delta" for e in events) > 3
    final = events[-1].response
    assert final.status == "completed" and calls_of(final.output) == expected
    assert final.output[0].status == "completed" and final.output[0].id == events[2].item.id


async def test_parallel_calls_and_text_take_their_own_output_items(oai: Any, sim: Any) -> None:
    question, clean = weather_question()
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True,
                                                      tools=[WEATHER, TIME], parallel_tool_calls=True))
    expected = await direct_calls(sim, [{"role": "user", "content": clean}], [WEATHER, TIME],
                                  parallel_tool_calls=True)
    assert streamed_calls(events) == expected and [c["name"] for c in expected] == ["get_weather", "get_time"]
    assert_numbered(events)
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    done = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
    assert added == done == [(0, "function_call"), (1, "function_call")]
    # Each item is done before the next one is added.
    order = [e.type for e in events if e.type.startswith("response.output_item.")]
    assert order == ["response.output_item.added", "response.output_item.done"] * 2


async def test_a_tool_round_trip_non_streamed_and_retrieved(oai: Any, sim: Any) -> None:
    question, _ = weather_question()
    first = await oai.responses.create(model="gpt-4o-mini", input=question, tools=[WEATHER])
    (call,) = calls_of(first.output)
    assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city", "unit"}
    assert calls_of((await oai.responses.retrieve(first.id)).output) == [call]
    follow_up = [{"role": "user", "content": question}, *[item.model_dump() for item in first.output],
                 {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp": 21}'}]
    second = await oai.responses.create(model="gpt-4o-mini", input=follow_up, tools=[WEATHER])
    assert second.output_text.startswith('get_weather returned {"temp": 21}.')
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-direct", max_retries=0) as direct:
        expected = await direct.chat.completions.create(model="gpt-4o-mini", tools=[chat_tool(WEATHER)], messages=[
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call["call_id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["call_id"], "content": '{"temp": 21}'}])
    assert second.output_text == expected.choices[0].message.content


async def test_the_stream_helper_with_tools_and_a_forced_choice(oai: Any, sim: Any) -> None:
    question, clean = weather_question()
    choice = {"type": "function", "name": "get_time"}
    async with oai.responses.stream(model="gpt-4o-mini", input=question, tools=[WEATHER, TIME],
                                    tool_choice=choice) as stream:
        async with asyncio.timeout(BOUND):
            done = [e async for e in stream if e.type == "response.function_call_arguments.done"]
            final = await stream.get_final_response()
    expected = await direct_calls(sim, [{"role": "user", "content": clean}], [WEATHER, TIME],
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert calls_of(final.output) == expected and expected[0]["name"] == "get_time"
    assert [e.arguments for e in done] == [expected[0]["arguments"]]


async def test_a_stall_inside_tool_call_arguments_stays_invisible(oai: Any, sim: Any) -> None:
    question, clean = weather_question("count=args stall_after=2 stall=30 times=1")
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True,
                                                      tools=[WEATHER]))
    attempts = [r for r in sim.requests() if r["faults"]]
    assert [r["attempt"] for r in attempts] == [1, 2] and attempts[0]["outcome"] == "client_disconnected"
    assert streamed_calls(events) == await direct_calls(sim, [{"role": "user", "content": clean}], [WEATHER])
    assert_numbered(events)
    assert events[-1].type == "response.completed"
    assert [e.type for e in events].count("response.output_item.added") == 1  # the call was not opened twice


async def test_a_resumed_tool_call_stream_replays_the_same_events(oai: Any, sim: Any) -> None:
    question, _ = weather_question("gap=0.02")
    first = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True,
                                                     tools=[WEATHER, TIME], parallel_tool_calls=True), stop_after=6)
    rest = await collect(await oai.responses.retrieve(first[0].response.id, stream=True, starting_after=6))
    events = first + rest
    assert_numbered(events)
    assert events[-1].type == "response.completed"
    replay = await collect(await oai.responses.retrieve(first[0].response.id, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in events]
    assert len(streamed_calls(events)) == 2


# ------------------------------------------------------------ the fold alone (no server)

def fold(*stream: tuple[str, dict[str, Any] | None]) -> tuple[list[dict[str, Any]], Any]:
    """The typed events (parsed) that ``stream``'s events become, and the fold."""
    from chatproxy.core import Event
    from chatproxy.openai_responses import ResponseEvents

    wire = ResponseEvents("resp_abc", model="m", created_at=1.0)
    body = b"".join(wire.encode(Event(seq, name, data)) for seq, (name, data) in enumerate(stream, 1))
    events = [json.loads(block.split(b"\ndata: ", 1)[1]) for block in body.split(b"\n\n") if b"\ndata: " in block]
    return events, wire


def head(index: int, call_id: str, name: str) -> tuple[str, dict[str, Any]]:
    return "tool_call", {"index": index, "id": call_id, "name": name, "arguments": ""}


def args(index: int, piece: str) -> tuple[str, dict[str, Any]]:
    return "tool_call", {"index": index, "id": None, "name": None, "arguments": piece}


def test_text_then_a_call_then_text_are_three_items_in_order() -> None:
    events, wire = fold(("start", {}), ("delta", {"text": "Let me look."}), head(0, "call_1", "get_weather"),
                        args(0, '{"city":'), args(0, '"Oslo"}'), ("delta", {"text": "Done."}),
                        ("done", {"finish_reason": "stop"}))
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    items = [(e["type"], e["output_index"], e["item"]["type"]) for e in events
             if e["type"].startswith("response.output_item")]
    assert items == [("response.output_item.added", 0, "message"), ("response.output_item.done", 0, "message"),
                     ("response.output_item.added", 1, "function_call"),
                     ("response.output_item.done", 1, "function_call"),
                     ("response.output_item.added", 2, "message"), ("response.output_item.done", 2, "message")]
    output = wire.response()["output"]
    assert [o["id"] for o in output] == ["msg_abc", "fc_abc_1", "msg_abc_2"]
    assert output[1] == {"id": "fc_abc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
                         "name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert output[0]["content"][0]["text"] == "Let me look." and output[2]["content"][0]["text"] == "Done."
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [(d["item_id"], d["output_index"]) for d in deltas] == [("msg_abc", 0), ("msg_abc_2", 2)]


def test_a_failure_inside_a_call_leaves_it_incomplete() -> None:
    events, wire = fold(("start", {}), head(0, "call_1", "f"), args(0, '{"a"'), ("error", {"code": "upstream_timeout"}))
    assert [e["type"] for e in events[-4:]] == ["response.function_call_arguments.done", "response.output_item.done",
                                                "error", "response.failed"]
    (item,) = wire.response()["output"]
    assert item["status"] == "incomplete" and item["arguments"] == '{"a"'


def test_a_head_in_two_pieces_and_late_arguments_of_a_closed_call() -> None:
    events, wire = fold(("start", {}), ("tool_call", {"index": 0, "id": "call_1", "name": None, "arguments": ""}),
                        ("tool_call", {"index": 0, "id": None, "name": "f", "arguments": ""}), args(0, "{"),
                        head(1, "call_2", "g"), args(0, "}"), args(1, "{}"), ("done", {"finish_reason": "tool_calls"}))
    assert [e["type"] for e in events].count("response.output_item.added") == 2
    first, second = wire.response()["output"]
    assert (first["call_id"], first["name"], first["arguments"]) == ("call_1", "f", "{}")
    assert (second["call_id"], second["name"], second["arguments"]) == ("call_2", "g", "{}")
    assert wire.status == "completed"


async def test_a_refusal_is_a_message_with_a_refusal_part(oai: Any, sim: Any) -> None:
    from chatproxy.simulator.answers import REFUSAL_TEXT

    question, _ = ask("refuse")
    events = await collect(await oai.responses.create(model="gpt-4o-mini", input=question, stream=True))
    assert_numbered(events)
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == REFUSAL_TEXT
    kinds = [e.type for e in events if e.type != "response.refusal.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.refusal.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    (item,) = events[-1].response.output
    assert item.type == "message" and [(c.type, c.refusal) for c in item.content] == [("refusal", REFUSAL_TEXT)]
    whole = await oai.responses.create(model="gpt-4o-mini", input=question)
    assert [c.refusal for c in whole.output[0].content] == [REFUSAL_TEXT] and whole.output_text == ""
