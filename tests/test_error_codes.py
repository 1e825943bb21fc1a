"""Error codes as values (``chatproxy.codes``) and the one module that builds error responses.

The tables below are what the views, the message module and the request guard used before the
codes became values; the enum must reproduce them, and every error response and event must keep
its bytes on the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest
from channels.testing import WebsocketCommunicator
from django.utils import translation

from chatproxy import sse
from chatproxy.codes import STREAM_CODES, ErrorCode
from chatproxy.core import Event
from chatproxy.messages import friendly_message
from chatproxy.responses import error_event_data, openai_error, openai_stream_error
from project.asgi import application
from tests.asgi_calls import call

# code -> (HTTP status, OpenAI error type): the OpenAI view's table, plus the codes it spelled inline.
STATUS_AND_TYPE = {
    "bad_request": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "content_filter": (400, "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error"),
    "missing_api_key": (401, "authentication_error"),
    "permission_denied": (403, "permission_error"),
    "csrf_failed": (403, "permission_error"),
    "not_found": (404, "invalid_request_error"),
    "unavailable": (503, "api_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "upstream_timeout": (504, "timeout_error"),
    "deadline_exceeded": (504, "timeout_error"),
    "upstream_unavailable": (503, "api_error"),
    "cancelled": (499, "api_error"),
    "internal": (500, "api_error"),
}
# The friendly texts of the codes a stream ends with.
STREAM_MESSAGES = {
    "bad_request": "The request could not be processed. Please check your message and try again.",
    "model_not_found": "The model you asked for does not exist or is not available. Check the model name.",
    "context_length_exceeded": "The conversation is too long for this model. Shorten it or start a new one.",
    "content_filter": "The request was blocked by the provider's content filter. Please rephrase it.",
    "upstream_timeout": "The assistant took too long to respond. Please try again in a moment.",
    "upstream_unavailable": "The assistant is temporarily unavailable. Please try again in a moment.",
    "rate_limited": "The assistant is busy right now. Please wait a little and try again.",
    "deadline_exceeded": "The answer took too long to complete. Please try again.",
    "cancelled": "The answer was stopped.",
    "internal": "Something went wrong on our side. Please try again.",
}
# Refusals whose text used to be written where they were raised.
REFUSAL_MESSAGES = {
    "invalid_api_key": "Incorrect or revoked API key.",
    "missing_api_key": "Send 'Authorization: Bearer <key>'.",
    "permission_denied": "You do not have permission to use the chat.",
}
OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "rate_limit_error",
                "timeout_error", "api_error"}


# --------------------------------------------------------------------------- the enum


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_code_has_a_status_an_openai_type_and_a_message(code):
    assert 400 <= code.status < 600
    assert code.openai_type in OPENAI_TYPES
    assert code.msgid and code.msgid.endswith(".") and code.msgid[0].isupper()
    with translation.override("en"):
        assert friendly_message(code) == code.msgid


def test_status_and_type_are_the_table_the_openai_view_used():
    assert {code.value: (code.status, code.openai_type) for code in ErrorCode} == STATUS_AND_TYPE


def test_friendly_messages_are_the_ones_users_saw():
    with translation.override("en"):
        assert {code: friendly_message(code) for code in STREAM_MESSAGES} == STREAM_MESSAGES
        assert {code: friendly_message(code) for code in REFUSAL_MESSAGES} == REFUSAL_MESSAGES


def test_stream_codes_are_the_error_event_codes():
    assert set(STREAM_CODES) == set(STREAM_MESSAGES)


def test_codes_are_their_strings():
    assert ErrorCode.RATE_LIMITED == "rate_limited" and {"rate_limited": 1}[ErrorCode.RATE_LIMITED] == 1
    assert orjson.dumps({"code": ErrorCode.CANCELLED}) == b'{"code":"cancelled"}'
    assert json.dumps({"code": ErrorCode.CANCELLED}) == '{"code": "cancelled"}'
    assert f"{ErrorCode.NOT_FOUND}" == "not_found"


def test_of_finds_the_member_or_falls_back_to_internal():
    assert all(ErrorCode.of(code.value) is code for code in ErrorCode)
    for stranger in ("bogus", "", "INTERNAL", None, 500, ["bad_request"]):
        assert ErrorCode.of(stranger) is ErrorCode.INTERNAL


def test_the_stream_core_and_the_codes_import_without_django():
    probe = ("import sys, chatproxy.core, chatproxy.codes;"
             "print(sorted(m for m in sys.modules if m.startswith('django')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- stream errors, every code


@pytest.mark.parametrize("code", sorted(STREAM_MESSAGES))
def test_stream_error_events_keep_their_bytes(code):
    text = STREAM_MESSAGES[code]
    status, type_ = STATUS_AND_TYPE[code]
    assert sse.encode(Event(9, "error", {"code": code})) == (
        f'id: 9\nevent: error\ndata: {{"code":"{code}","message":"{text}"}}\n\n'.encode())
    assert error_event_data(ErrorCode.of(code)) == {"code": code, "message": text}
    openai_object = f'{{"error":{{"message":"{text}","type":"{type_}","param":null,"code":"{code}"}}}}'
    assert openai_stream_error(ErrorCode.of(code)) == f"data: {openai_object}\n\n".encode()
    final = openai_error(ErrorCode.of(code))
    assert final.status_code == status and list(final.items()) == [("Content-Type", "application/json")]
    assert final.content == (f'{{"error": {{"message": "{text}", "type": "{type_}", "param": null, '
                             f'"code": "{code}"}}}}').encode()


# --------------------------------------------------------------------------- refusals, through the ASGI app


@pytest.fixture
def open_settings(settings):
    settings.CHATPROXY = {"PERMISSION": "chatproxy.permissions.allow_any", "LIMITS": {"MAX_INPUT_CHARS": 1000},
                          "RECORDS": {"ENABLED": False}}
    return settings


@pytest.fixture
def closed_settings(settings):
    settings.CHATPROXY = {"PERMISSION": "chatproxy.permissions.authenticated", "RECORDS": {"ENABLED": False}}
    return settings


HTTP_REFUSALS = [
    # (method, path, body, headers, status, extra header, body bytes)
    ("GET", "/chat/stream/", b"", (), 405, ("allow", "POST"),
     b'{"error": {"code": "bad_request", "message": "Use POST with a JSON body."}}'),
    ("GET", "/chat/v1/chat/completions", b"", (), 405, ("allow", "POST"),
     b'{"error": {"message": "Use POST.", "type": "invalid_request_error", "param": null, '
     b'"code": "method_not_allowed"}}'),
    ("POST", "/chat/stream/", b"{}", ((b"content-type", b"text/plain"),), 415, None,
     b'{"error": {"code": "bad_request", "message": '
     b'"Send the request as JSON with \'Content-Type: application/json\'."}}'),
    ("POST", "/chat/v1/chat/completions", b'{"model": "m", "n": 0}', (), 400, None,
     b'{"error": {"message": "\'n\' must be between 1 and 128.", "type": "invalid_request_error", "param": "n", '
     b'"code": "bad_request"}}'),
    ("GET", "/chat/stream/abc/", b"", ((b"last-event-id", b"x"),), 400, None,
     b'{"error": {"code": "bad_request", "message": '
     b'"Last-Event-ID must be a whole number (the last \'id\' you received)."}}'),
    ("GET", "/chat/stream/abc/", b"", (), 404, None,
     b'{"error": {"code": "not_found", "message": '
     b'"No such stream: it ended more than RESUME.TTL ago, or never existed."}}'),
    ("POST", "/chat/stream/abc/cancel/", b"", (), 404, None,
     b'{"error": {"code": "not_found", "message": "No such stream."}}'),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "header", "expected"), HTTP_REFUSALS,
                         ids=[f"{r[0]} {r[1]} {r[4]}" for r in HTTP_REFUSALS])
async def test_http_refusals_keep_their_bytes(open_settings, method, path, body, headers, status, header, expected):
    content_type = dict(headers).get(b"content-type", b"application/json")
    headers = tuple(h for h in headers if h[0] != b"content-type")
    reply = await call(application, method, path, body, headers=headers, content_type=content_type)
    assert (reply.status, reply.body) == (status, expected)
    assert reply.headers["content-type"] == "application/json"
    if header is not None:
        assert reply.headers[header[0]] == header[1]


async def test_the_guards_refusals_keep_their_bytes(open_settings):
    limit = 1000 * 4 + 64 * 1024
    too_large = f"The request body is too large (limit {limit} bytes).".encode()
    reply = await call(application, "POST", "/chat/stream/", b"x" * (limit + 1))
    assert (reply.status, reply.body) == (413, b'{"error":{"code":"bad_request","message":"' + too_large + b'"}}')
    assert reply.headers["connection"] == "close" and reply.headers["content-length"] == str(len(reply.body))
    reply = await call(application, "POST", "/chat/v1/chat/completions", b"x" * (limit + 1))
    assert (reply.status, reply.body) == (
        413, b'{"error":{"message":"' + too_large + b'","type":"invalid_request_error","param":null,'
             b'"code":"bad_request"}}')


async def test_authorization_refusals_keep_their_bytes(closed_settings):
    reply = await call(application, "POST", "/chat/stream/", b"{}")
    assert (reply.status, reply.body) == (
        403, b'{"error": {"code": "permission_denied", "message": "You do not have permission to use the chat."}}')
    reply = await call(application, "POST", "/chat/v1/chat/completions", b"{}")
    assert (reply.status, reply.body) == (
        401, b'{"error": {"message": "Send \'Authorization: Bearer <key>\'.", "type": "authentication_error", '
             b'"param": null, "code": "missing_api_key"}}')
    reply = await call(application, "GET", "/chat/v1/models", headers=((b"authorization", b"Bearer nonsense"),))
    assert (reply.status, reply.body) == (
        401, b'{"error": {"message": "Incorrect or revoked API key.", "type": "authentication_error", '
             b'"param": null, "code": "invalid_api_key"}}')


async def test_an_upstream_that_cannot_be_built_is_one_friendly_json_error(open_settings, caplog):
    """A bad configuration (an SDK that is not installed): the HTTP ways in answer the friendly
    ``internal`` error in their JSON shape (not Django's HTML 500 page), and the cause is logged."""
    from chatproxy.upstream import detect_sdk

    missing = "current" if detect_sdk() == "legacy" else "legacy"
    open_settings.CHATPROXY = {**open_settings.CHATPROXY,
                               "UPSTREAM": {"SDK": missing, "BASE_URL": "http://127.0.0.1:9/v1", "API_KEY": "sk-x"}}
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    reply = await call(application, "POST", "/chat/stream/", body)
    assert (reply.status, reply.body) == (
        500, b'{"error": {"code": "internal", "message": "Something went wrong on our side. Please try again."}}')
    reply = await call(application, "POST", "/chat/v1/chat/completions", b'{"model": "m", ' + body[1:])
    assert (reply.status, reply.body) == (
        500, b'{"error": {"message": "Something went wrong on our side. Please try again.", "type": "api_error", '
             b'"param": null, "code": "internal"}}')
    causes = [r for r in caplog.records if r.name == "chatproxy.service"]
    assert len(causes) == 2 and all(f'UPSTREAM.SDK is "{missing}"' in r.getMessage() for r in causes)
    assert all("sk-x" not in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- WebSocket error frames


async def test_websocket_error_frames_keep_their_bytes(no_stale_connections, open_settings):
    ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                  (b"host", b"localhost")])
    connected, _ = await ws.connect()
    assert connected
    try:
        await ws.send_to(text_data="{")
        assert await ws.receive_from(timeout=2) == (
            '{"type":"error","code":"bad_request","message":"The frame is not valid JSON."}')
        await ws.send_to(text_data='{"type": "hello", "request_id": "r9"}')
        assert await ws.receive_from(timeout=2) == (
            '{"type":"error","code":"bad_request","message":'
            '"Unknown frame \'type\': use \'chat\', \'cancel\' or \'resume\'.","request_id":"r9"}')
        await ws.send_to(text_data='{"type": "resume", "stream_id": "gone", "last_event_id": 3, "request_id": "q"}')
        assert await ws.receive_from(timeout=2) == (
            '{"type":"error","code":"not_found","request_id":"q","stream_id":"gone",'
            '"message":"That answer can no longer be resumed."}')
    finally:
        await ws.disconnect()
