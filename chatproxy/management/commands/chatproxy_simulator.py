"""``python manage.py chatproxy_simulator [--host 127.0.0.1] [--port 8001] [--quiet] [--fault MODEL DIRECTIVES]``.

Runs chatproxy's OpenAI-compatible simulator (the demo upstream and the tests' test double) in the
foreground until Ctrl-C / SIGTERM. It is the same server as ``python -m chatproxy.simulator``; the
fault menu is in ``docs/simulator.md``.

The command touches neither the database nor the system checks: it only needs the app to be
importable, so it works before ``migrate`` and with any settings.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run the OpenAI-compatible streaming simulator with its fault menu (see docs/simulator.md)."
    requires_system_checks: list[str] = []  # no checks, no DB: it is a standalone HTTP server
    requires_migrations_checks = False

    def add_arguments(self, parser: ArgumentParser) -> None:
        from chatproxy.simulator.server import add_arguments

        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        from chatproxy.simulator.server import rules_from_args, run

        run(options["host"], options["port"], quiet=options["quiet"], faults=rules_from_args(options["fault"]))
