"""`make run`: the sample project on http://HOST:PORT/, with the simulator as upstream when no
OPENAI_API_KEY is set (started alongside on SIM_PORT, stopped when the server stops)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--simulator-port", type=int, default=8001)
    args = parser.parse_args()

    env = dict(os.environ)
    simulator = None
    if not env.get("OPENAI_API_KEY"):
        from chatproxy.simulator.process import SimulatorProcess

        simulator = SimulatorProcess(port=args.simulator_port).start()
        env["CHATPROXY_SIMULATOR_URL"] = simulator.base_url
        print(f"No OPENAI_API_KEY: using the built-in simulator at {simulator.base_url}", flush=True)
    else:
        print("OPENAI_API_KEY is set: using the real API", flush=True)
    print(f"chatproxy demo: http://{args.host}:{args.port}/", flush=True)
    try:
        return subprocess.call(
            [sys.executable, "manage.py", "runserver", "--noreload", f"{args.host}:{args.port}"], env=env
        )
    except KeyboardInterrupt:
        return 0
    finally:
        if simulator is not None:
            simulator.stop()


if __name__ == "__main__":
    sys.exit(main())
