"""chatproxy's OpenAI-compatible streaming simulator (demo upstream and test double).

Public API:

* :class:`~chatproxy.simulator.server.SimulatorServer` -- run it inside the current event loop.
* :class:`~chatproxy.simulator.process.SimulatorProcess` -- run it as a subprocess (tests,
  ``make run``); ``.base_url``, ``.stats()``, ``.reset()``, ``.wait_until()``.
* ``python -m chatproxy.simulator --host 127.0.0.1 --port 8001`` or ``python manage.py
  chatproxy_simulator --port 8001``.

The fault menu (``[[sim ...]]`` directives / ``X-Sim`` header) is documented in
``docs/simulator.md`` and parsed by :mod:`chatproxy.simulator.faults`.

Importing this package imports neither aiohttp nor Django: the names below load lazily, so the
subprocess runner can be used from a test process that never starts the server itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .process import SimulatorProcess
    from .server import SimulatorServer

__all__ = ["SimulatorProcess", "SimulatorServer"]


def __getattr__(name: str) -> Any:
    if name == "SimulatorProcess":
        from .process import SimulatorProcess

        return SimulatorProcess
    if name == "SimulatorServer":
        from .server import SimulatorServer

        return SimulatorServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
