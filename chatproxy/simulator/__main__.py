"""``python -m chatproxy.simulator [--host 127.0.0.1] [--port 8001] [--quiet] [--fault MODEL DIRECTIVES]``.

Prints ``chatproxy simulator listening on http://HOST:PORT/v1`` on stdout once it accepts
connections, logs one line per completion request on stderr (unless ``--quiet``), and exits
cleanly on SIGINT/SIGTERM.
"""

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
