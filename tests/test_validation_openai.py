"""What the OpenAI-compatible endpoint accepts and passes on: every field checked for shape,
passed to the upstream as given, or refused with a 400 that names it (never dropped silently)."""

from __future__ import annotations

from typing import Any

import pytest

from chatproxy.validation import InvalidRequest, parse_native_request, parse_openai_request

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
USER = {"role": "user", "content": "What is the weather in Paris?"}


def parse(**fields: Any) -> Any:
    body = {"model": "gpt-4o-mini", "messages": [USER], **fields}
    return parse_openai_request(body)[0]


def refused(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(**fields)
    assert caught.value.status == 400
    return caught.value


def test_fields_pass_on_as_given() -> None:
    fields = {
        "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "n": 2, "logprobs": True, "top_logprobs": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u-1", "seed": 7, "max_completion_tokens": 50,
        "reasoning_effort": "low", "logit_bias": {"50256": -100}, "temperature": 0.2, "top_p": 0.9,
    }
    assert parse(**fields, stop="END").params == {**fields, "stop": ["END"]}


def test_nulls_are_absent_and_unknown_fields_are_refused() -> None:
    assert parse(tools=None, logprobs=None, user=None).params == {}
    error = refused(best_of=2)
    assert (error.message, error.param) == ("Unknown parameter 'best_of'.", "best_of")


@pytest.mark.parametrize(("fields", "message"), [
    ({"functions": [{"name": "f"}]}, "'functions' is deprecated: send 'tools' instead."),
    ({"tools": []}, "'tools' must be a list of 1 to 128 tools."),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name must be 1 to 64 letters, digits, '_' or '-'."),
    ({"tool_choice": "auto"}, "'tool_choice' needs 'tools'."),
    ({"tools": [WEATHER], "tool_choice": "sometimes"},
     "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': str}}."),
    ({"response_format": {"type": "yaml"}},
     "'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}."),
    ({"n": 0}, "'n' must be between 1 and 128."),
    ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true."),
    ({"logprobs": 1}, "'logprobs' must be true or false."),
    ({"user": 5}, "'user' must be a string of at most 256 characters."),
])
def test_bad_shapes_are_refused_by_name(fields: dict[str, Any], message: str) -> None:
    assert refused(**fields).message == message


def test_every_message_role_passes_unchanged() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    image = {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    messages = [
        {"role": "developer", "content": "Be brief."},
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": '{"temp": 21}'}]},
        image,
    ]
    request = parse_openai_request({"model": "gpt-4o-mini", "messages": messages})[0]
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        USER,
        {"role": "assistant", "tool_calls": [call]},
        messages[3],
        image,
    ]


@pytest.mark.parametrize(("message", "text"), [
    ({"role": "tool", "content": "21"}, "messages[1].tool_call_id must be the id of the tool call it answers."),
    ({"role": "user", "content": "x", "audio": {}}, "messages[1]: unknown field 'audio' for a user message."),
    ({"role": "assistant", "content": None}, "messages[1].content is required."),
    ({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
     "messages[1].content[0].image_url.url must be a string."),
    ({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "messages[1].content[0] must be a part of type text."),
    ({"role": "function", "content": "x"},
     "messages[1].role must be one of: system, developer, user, assistant, tool."),
])
def test_bad_messages_are_refused_by_name(message: dict[str, Any], text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_openai_request({"model": "gpt-4o-mini", "messages": [USER, message, USER]})
    assert caught.value.message == text


def test_native_requests_take_the_tool_fields_too() -> None:
    request = parse_native_request({"messages": [USER], "tools": [WEATHER], "tool_choice": "required"})
    assert request.params == {"tools": [WEATHER], "tool_choice": "required"}
    with pytest.raises(InvalidRequest, match="Unknown field"):
        parse_native_request({"messages": [USER], "logprobs": True})
