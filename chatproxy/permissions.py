"""Built-in permission callables for ``CHATPROXY["PERMISSION"]``.

A permission is ``callable(request_or_scope) -> bool`` named by dotted path. It receives the Django
``HttpRequest`` (HTTP ways in) or the Channels ``scope`` dict (WebSocket). By the time it is
called, the user is already loaded (``request.user`` / ``scope["user"]``), so a plain function
needs no database access; a permission that must query the database should be an ``async def``
(chatproxy awaits coroutine functions).
"""

from __future__ import annotations

from typing import Any


def _user(request_or_scope: Any) -> Any:
    if isinstance(request_or_scope, dict):
        return request_or_scope.get("user")
    return getattr(request_or_scope, "user", None)


def authenticated(request_or_scope: Any) -> bool:
    """Allow signed-in, active users (the default)."""
    user = _user(request_or_scope)
    return bool(user is not None and user.is_authenticated and getattr(user, "is_active", True))


def allow_any(request_or_scope: Any) -> bool:
    """Allow everyone. For demos: anyone who can reach the URL spends your upstream budget."""
    return True
