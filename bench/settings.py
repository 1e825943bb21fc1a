"""Django settings for benchmark servers: the sample project's, with what a load test needs.

* ``LIMITS.MAX_STREAMS_PER_USER`` is off: every load-generator connection comes from 127.0.0.1,
  and anonymous users are limited per client address (all of them would share 4 slots); unless
  ``CHATPROXY_LIMITS`` sets it (``bench.redisops`` counts admission's Redis commands).
* ``PERMISSION`` is ``allow_any``: the load generator does not log in (the harness runs the
  server with ``DJANGO_DEBUG=0``, as in production; CSRF still applies).
* ``BENCH_SDK`` sets ``UPSTREAM.SDK`` (``none``: no SDK, the API over aiohttp).
* ``BENCH_HTTP_CLIENT`` (``httpx`` | ``aiohttp``) picks the current SDK's transport.
* ``BENCH_FALLBACKS=1``: every model has a fallback target (``FALLBACKS = {"*": [...]}``), so each
  stream also resolves its fallback chain and reads its circuit; otherwise no fallbacks (the sample
  project's demo fallback is off).
* Logging stays at ``DJANGO_LOG_LEVEL`` (the harness sets WARNING).

Everything else (``DJANGO_DEBUG``, ``DJANGO_SECRET_KEY``, ``CHATPROXY_TIMEOUTS``, ``CHATPROXY_RESUME``,
``CHATPROXY_SIMULATOR_URL``, ``DJANGO_DB_PATH``) is read by ``project.settings`` as usual.
"""

import json
import os

from project.settings import *  # noqa: F403
from project.settings import CHATPROXY

if "MAX_STREAMS_PER_USER" not in json.loads(os.environ.get("CHATPROXY_LIMITS") or "{}"):
    CHATPROXY["LIMITS"] = {**CHATPROXY.get("LIMITS", {}), "MAX_STREAMS_PER_USER": None}
CHATPROXY["PERMISSION"] = "chatproxy.permissions.allow_any"  # the load generator does not log in
if os.environ.get("BENCH_SDK"):
    CHATPROXY["UPSTREAM"] = {**CHATPROXY["UPSTREAM"], "SDK": os.environ["BENCH_SDK"]}
if os.environ.get("BENCH_HTTP_CLIENT"):
    CHATPROXY["UPSTREAM"] = {**CHATPROXY["UPSTREAM"], "HTTP_CLIENT": os.environ["BENCH_HTTP_CLIENT"]}
CHATPROXY["FALLBACKS"] = {"*": ["bench-fallback"]} if os.environ.get("BENCH_FALLBACKS") else {}
