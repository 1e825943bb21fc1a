"""The simulator for the end-to-end suite: ``python -m tests.e2e.simulator_main [simulator options]``.

The same server as ``python -m chatproxy.simulator``, with one difference: idle keep-alive
connections are closed after ``E2E_SIM_IDLE`` seconds (default 0.5) instead of aiohttp's hour.
A worker's HTTP client keeps finished connections in its pool, so with the default the
simulator's ``open_connections`` never returns to zero even when nothing leaks. With a short idle
timeout, ``open_connections == 0`` shortly after a stream ends proves that no connection is held
by a request still in flight: the idle timeout never closes a connection whose response is still
being written (a stalled stream keeps its socket open until chatproxy closes it).
"""

from __future__ import annotations

import functools
import os
import sys

from aiohttp import web

from chatproxy.simulator import server


def main() -> int:
    idle = float(os.environ.get("E2E_SIM_IDLE", "0.5"))
    # This process only: the simulator builds its AppRunner through this name.
    web.AppRunner = functools.partial(web.AppRunner, keepalive_timeout=idle)  # type: ignore[misc]
    return server.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
