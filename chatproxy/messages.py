"""Friendly, translatable texts for the ``error`` event's ``code`` (SPEC 6.1).

These are the only words about a failure that reach a user: never an upstream body, a status
line, an exception text or a key.
"""

from __future__ import annotations

from django.utils.translation import gettext_lazy as _

ERROR_MESSAGES = {
    "bad_request": _("The request could not be processed. Please check your message and try again."),
    "upstream_timeout": _("The assistant took too long to respond. Please try again in a moment."),
    "upstream_unavailable": _("The assistant is temporarily unavailable. Please try again in a moment."),
    "rate_limited": _("The assistant is busy right now. Please wait a little and try again."),
    "deadline_exceeded": _("The answer took too long to complete. Please try again."),
    "cancelled": _("The answer was stopped."),
    "internal": _("Something went wrong on our side. Please try again."),
}


def friendly_message(code: str) -> str:
    """The user-facing text for an error ``code`` (falls back to the ``internal`` text)."""
    return str(ERROR_MESSAGES.get(code, ERROR_MESSAGES["internal"]))
