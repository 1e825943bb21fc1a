"""Who is asking, and may they: shared by every HTTP way in.

* Session users: the user is loaded asynchronously; CSRF is enforced for the POSTs of a
  signed-in user (the views are ``csrf_exempt`` so that a failure is answered in the endpoint's
  own JSON error shape). An anonymous request (only possible with a permissive ``PERMISSION``)
  needs no token, as in Django REST framework: it carries no credential a forged request could
  ride on, and a cross-site JSON POST needs a CORS preflight anyway.
* ``Authorization: Bearer <key>`` (OpenAI-compatible endpoint): an :class:`AccessKey`; no CSRF,
  since no cookie is involved.
* Then ``CHATPROXY["PERMISSION"]`` decides.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.http import HttpRequest, HttpResponse, QueryDict
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.utils.datastructures import MultiValueDict
from django.utils.module_loading import import_string

from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config


class AuthFailure(Exception):
    """Refused: ``code`` says why (its ``status`` is 401 for bad credentials, 403 for not permitted
    or CSRF); ``message`` names the problem, or is None for the code's own friendly text."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        super().__init__(message or code.msgid)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return self.code.status


def _no_response(request: HttpRequest) -> HttpResponse:  # pragma: no cover - never called
    raise AssertionError


_csrf = CsrfViewMiddleware(_no_response)


def csrf_failure(request: HttpRequest) -> str | None:
    """Why ``request`` fails Django's CSRF check (None when it passes)."""
    if not hasattr(request, "_post"):
        # chatproxy's endpoints take JSON, so the token can only come in the header: keep the check
        # from parsing a form body as it would look for a form field (a malformed multipart body
        # raises there, a valid one would be spooled to disk for nothing).
        request._post, request._files = QueryDict(), MultiValueDict()  # type: ignore[attr-defined]
    rejected = _csrf.process_view(request, None, (), {})  # type: ignore[arg-type]
    if rejected is None:
        return None
    return "CSRF verification failed: send the 'X-CSRFToken' header with the value of the 'csrftoken' cookie."


async def permitted(request_or_scope: Any) -> bool:
    """Apply ``CHATPROXY["PERMISSION"]`` (sync or async callable)."""
    check = import_string(get_config()["PERMISSION"])
    allowed = check(request_or_scope)
    if inspect.isawaitable(allowed):
        allowed = await allowed
    return bool(allowed)


def bearer_token(request: HttpRequest) -> str | None:
    header: str = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


async def user_from_key(plain: str) -> Any:
    """The owner of a valid, unrevoked key; raises AuthFailure(401) otherwise."""
    from chatproxy.models import AccessKey

    invalid = AuthFailure(ErrorCode.INVALID_API_KEY)
    prefix = AccessKey.split(plain)
    if prefix is None:
        raise invalid
    key = await AccessKey.objects.active().select_related("owner").filter(prefix=prefix).afirst()
    if key is None or not key.matches(plain):
        raise invalid
    if key.needs_touch():
        await AccessKey.objects.filter(pk=key.pk).aupdate(last_used=timezone.now())
    return key.owner


async def authorize(request: HttpRequest, *, allow_bearer: bool = False) -> None:
    """Load the user (session or key), check CSRF for a signed-in session user, apply PERMISSION.

    Raises :class:`AuthFailure`; on success ``request.user`` is the loaded user.
    """
    token = bearer_token(request) if allow_bearer else None
    if token is not None:
        request.user = await user_from_key(token)
    else:
        request.user = await request.auser()
        if request.method == "POST" and request.user.is_authenticated:
            reason = csrf_failure(request)
            if reason:
                raise AuthFailure(ErrorCode.CSRF_FAILED, reason)
    if not await permitted(request):
        raise AuthFailure(ErrorCode.PERMISSION_DENIED)
