"""WebSocket routes; mount them in your ASGI app:

``URLRouter(chatproxy.routing.websocket_urlpatterns)`` inside ``AuthMiddlewareStack`` and
``AllowedHostsOriginValidator``.
"""

from django.urls import path

from chatproxy.consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi(), name="chatproxy-ws"),
]
