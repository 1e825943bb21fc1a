"""Test settings: the sample project's, with the upstream pointed at the test simulator.

pytest-django loads settings before any fixture runs, so tests that stream through Django use the
`chatproxy_settings` fixture (tests/conftest.py), which overrides CHATPROXY with the live
simulator's URL and tiny timeouts.
"""

import os

os.environ.pop("OPENAI_API_KEY", None)  # tests never reach the real API
os.environ.setdefault("DJANGO_DEBUG", "1")
os.environ.setdefault("CHATPROXY_FALLBACKS", "{}")  # not the demo's fallback: tests that want one configure it

from project.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast user creation
