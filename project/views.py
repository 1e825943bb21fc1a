"""The demo chat page."""

from __future__ import annotations

import inspect
import logging

from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.module_loading import import_string
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_safe

logger = logging.getLogger(__name__)

# chatproxy's public URLs (docs/reference.md); this project mounts chatproxy at "chat/" (project/urls.py).
STREAM_URL = "/chat/stream/"
WEBSOCKET_PATH = "/ws/chat/"


def _may_chat(request: HttpRequest) -> bool:
    """Whether chatproxy's PERMISSION lets this visitor stream, so the page can offer a login."""
    dotted_path = settings.CHATPROXY.get("PERMISSION", "chatproxy.permissions.authenticated")
    try:
        permission = import_string(dotted_path)
    except ImportError:
        # The page itself must still render; the stream endpoint reports the real problem.
        logger.warning("CHATPROXY['PERMISSION'] = %r cannot be imported", dotted_path)
        return True
    if inspect.iscoroutinefunction(permission):
        return bool(async_to_sync(permission)(request))
    return bool(permission(request))


@require_safe
@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    """The chat page. Sets the CSRF cookie that chatproxy.js sends back as ``X-CSRFToken``."""
    upstream = settings.CHATPROXY.get("UPSTREAM", {})
    context = {
        "stream_url": STREAM_URL,
        "websocket_path": WEBSOCKET_PATH,
        "uses_simulator": settings.CHATPROXY_USES_SIMULATOR,
        "model": upstream.get("MODEL") or "",
        "may_chat": _may_chat(request),
        "login_url": settings.LOGIN_URL,
    }
    return render(request, "index.html", context)
