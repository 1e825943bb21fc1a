"""ASGI entry point: plain Django for HTTP, chatproxy's consumer for WebSocket.

Run with ``python manage.py runserver`` (daphne's runserver, which also serves static files when
DEBUG) or ``daphne project.asgi:application``.
"""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# Set up Django (apps, settings) before anything that imports models, such as the routing below.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

import chatproxy.routing  # noqa: E402
import chatproxy.upstream  # noqa: E402
from chatproxy.asgi import DirectStreams, Lifespan  # noqa: E402

# Import the openai SDK now, at server start: left to a worker's first stream, the import (slow: a
# large package) would block that worker's event loop while a gateway's idle deadline runs (docs/deploy.md).
chatproxy.upstream.preload()

application = ProtocolTypeRouter(
    {
        "http": DirectStreams(django_asgi_app),  # chatproxy: body caps, and its streams served directly
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(chatproxy.routing.websocket_urlpatterns))
        ),
        # uvicorn & co.: the upstream sessions close at shutdown (Daphne: chatproxy.service does it)
        "lifespan": Lifespan(),
    }
)

# What is loaded by now lives as long as the process: keep it out of the cyclic GC's full
# collections, which would otherwise walk all those objects each time and pause every stream on
# this worker meanwhile (the pause is measured in bench/README.md, "Where the CPU goes").
gc.collect()
gc.freeze()
# Python's collection thresholds are kept: raising them (e.g. 10,000 / 50 / 100) saves CPU per
# chunk, but cyclic garbage then waits far longer for a full collection, and memory (and the
# sockets such garbage still holds) grows with it; both are measured in docs/deploy.md.
