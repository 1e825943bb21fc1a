"""Friendly, translatable texts for error codes.

These are the only words about a failure that reach a user: never an upstream body, a status
line, an exception text or a key. The English texts live with the codes
(:class:`chatproxy.codes.ErrorCode`, which stays free of Django); they are translated here, into
the language active when a response is built.
"""

from __future__ import annotations

from django.utils.translation import gettext

from chatproxy.codes import ErrorCode


def friendly_message(code: str) -> str:
    """The user-facing text for an error ``code`` (the ``internal`` text for a code that names none)."""
    return str(gettext(ErrorCode.of(code).msgid))
