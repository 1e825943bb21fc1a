"""The error codes chatproxy answers with, as values.

Every failure a client sees carries one :class:`ErrorCode`: the ``code`` of the native
``{"error": {"code", "message"}}`` body, of the SSE and WebSocket ``error`` event, and of OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Each member carries what every way in needs
to answer it: the HTTP ``status`` (a response may override it, e.g. ``bad_request`` with 413 for a
body that is too large), the OpenAI error ``openai_type``, and ``msgid``, the friendly English text
used when no more specific message is given.

The codes in :data:`STREAM_CODES` may end a stream (the core's and the journal's ``error``
events); the others refuse a request before any stream starts.

This module imports nothing from Django, so the stream core may use it. ``msgid`` is therefore
only marked for translation here; :func:`chatproxy.messages.friendly_message` translates it into
the active language where a response is built. Members are ``str``: they compare equal to the
plain strings the core puts in its events and serialise as them.
"""

from __future__ import annotations

from enum import StrEnum


def gettext_noop(message: str) -> str:
    """Mark ``message`` for ``makemessages`` (which looks for this name) without translating it."""
    return message


class ErrorCode(StrEnum):
    """An error code with its HTTP status, OpenAI error type and friendly message (see the module)."""

    status: int
    openai_type: str
    msgid: str

    def __new__(cls, value: str, status: int, openai_type: str, msgid: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.openai_type = openai_type
        member.msgid = msgid
        return member

    # Stream outcomes.
    BAD_REQUEST = (
        "bad_request", 400, "invalid_request_error",
        gettext_noop("The request could not be processed. Please check your message and try again."),
    )
    UPSTREAM_TIMEOUT = (
        "upstream_timeout", 504, "timeout_error",
        gettext_noop("The assistant took too long to respond. Please try again in a moment."),
    )
    UPSTREAM_UNAVAILABLE = (
        "upstream_unavailable", 503, "api_error",
        gettext_noop("The assistant is temporarily unavailable. Please try again in a moment."),
    )
    RATE_LIMITED = (
        "rate_limited", 429, "rate_limit_error",
        gettext_noop("The assistant is busy right now. Please wait a little and try again."),
    )
    DEADLINE_EXCEEDED = (
        "deadline_exceeded", 504, "timeout_error",
        gettext_noop("The answer took too long to complete. Please try again."),
    )
    # The upstream refused the request for a cause the user can act on (its OpenAI code, kept).
    MODEL_NOT_FOUND = (
        "model_not_found", 404, "invalid_request_error",
        gettext_noop("The model you asked for does not exist or is not available. Check the model name."),
    )
    CONTEXT_LENGTH_EXCEEDED = (
        "context_length_exceeded", 400, "invalid_request_error",
        gettext_noop("The conversation is too long for this model. Shorten it or start a new one."),
    )
    CONTENT_FILTER = (
        "content_filter", 400, "invalid_request_error",
        gettext_noop("The request was blocked by the provider's content filter. Please rephrase it."),
    )
    CANCELLED = "cancelled", 499, "api_error", gettext_noop("The answer was stopped.")
    INTERNAL = "internal", 500, "api_error", gettext_noop("Something went wrong on our side. Please try again.")

    # Refusals before a stream starts.
    UNAVAILABLE = (
        "unavailable", 503, "api_error",
        gettext_noop("This is briefly unavailable. Please try again in a moment."),
    )
    NOT_FOUND = "not_found", 404, "invalid_request_error", gettext_noop("That answer is no longer available.")
    METHOD_NOT_ALLOWED = (
        "method_not_allowed", 405, "invalid_request_error",
        gettext_noop("This method is not allowed here."),
    )
    MISSING_API_KEY = (
        "missing_api_key", 401, "authentication_error", gettext_noop("Send 'Authorization: Bearer <key>'."),
    )
    INVALID_API_KEY = "invalid_api_key", 401, "authentication_error", gettext_noop("Incorrect or revoked API key.")
    CSRF_FAILED = (
        "csrf_failed", 403, "permission_error",
        gettext_noop("The page is out of date or its security token is missing. Reload it and try again."),
    )
    PERMISSION_DENIED = (
        "permission_denied", 403, "permission_error",
        gettext_noop("You do not have permission to use the chat."),
    )

    @classmethod
    def of(cls, value: object) -> ErrorCode:
        """The member for ``value`` (a code string from an event, say); ``INTERNAL`` if it names none."""
        return _BY_VALUE.get(value, cls.INTERNAL) if isinstance(value, str) else cls.INTERNAL


# (``ErrorCode(value)`` looks a member up too, but type checkers read it as a call of ``__new__``.)
_BY_VALUE: dict[str, ErrorCode] = {member.value: member for member in ErrorCode}


#: The upstream's own error codes (OpenAI's ``error.code``) that are passed on as what they are.
UPSTREAM_REQUEST_CODES: dict[str, ErrorCode] = {
    "model_not_found": ErrorCode.MODEL_NOT_FOUND,
    "context_length_exceeded": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "string_above_max_length": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "content_filter": ErrorCode.CONTENT_FILTER,
    "content_policy_violation": ErrorCode.CONTENT_FILTER,
}

#: The codes that may end a stream (the ``error`` event's ``code``).
STREAM_CODES = frozenset({
    ErrorCode.BAD_REQUEST,
    ErrorCode.MODEL_NOT_FOUND,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    ErrorCode.CONTENT_FILTER,
    ErrorCode.UPSTREAM_TIMEOUT,
    ErrorCode.UPSTREAM_UNAVAILABLE,
    ErrorCode.RATE_LIMITED,
    ErrorCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED,
    ErrorCode.INTERNAL,
})
