"""Part 4, where the server's CPU goes: py-spy on a chatproxy server under the relay load.

``record(pid, seconds, raw_path)`` runs ``py-spy record --format raw`` (collapsed stacks, every
thread, idle samples excluded) on the server during a measured relay run. ``analyse`` turns the
stacks into tables: the share of active samples by layer (the frame closest to the leaf that
belongs to a known package decides), the functions with the most *self* samples, and the chatproxy
functions with the most *inclusive* samples. Multiplied by the run's CPU us per chunk, a share
is microseconds per chunk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (layer, path fragments): each frame belongs to the first layer with a fragment in its file name.
# Walking from the leaf towards the root, the first frame that belongs to a layer decides the
# sample's layer, so stdlib work (asyncio, selectors, threading...) is charged to the library that
# called it. h11 is used by both uvicorn and httpcore2, so it is transparent (its caller decides),
# and so is bench/asgi.py (the harness's diagnostics wrapper).
TRANSPARENT = ("/h11/", "bench/asgi.py")
# The servers' start-up frames sit at the root of every main-thread stack: they say nothing about who
# does the work, so they are transparent too (the event loop's own work then shows as such).
BOOTSTRAP = ("/uvicorn/main.py", "/uvicorn/server.py", "/uvicorn/_compat.py", "/uvicorn/__main__.py",
             "/daphne/cli.py", "/daphne/__main__.py", "/daphne/server.py")
BOOTSTRAP_FUNCS = {("AsyncioSelectorReactor.run", "/twisted/internet/asyncioreactor.py")}
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("chatproxy: upstream adapter", ("chatproxy/upstream/",)),
    ("chatproxy: journal (resume.py)", ("chatproxy/resume.py",)),
    ("chatproxy: core (core.py, stream/)", ("chatproxy/core.py", "chatproxy/stream/")),
    ("chatproxy: SSE view (views.py, sse.py)", ("chatproxy/views.py", "chatproxy/sse.py")),
    ("chatproxy: stream records (records.py)", ("chatproxy/records.py",)),
    ("chatproxy: other (asgi guard, service, auth, profiles, limits)", ("chatproxy/",)),
    ("openai SDK + pydantic", ("/openai/", "/pydantic", "/jiter/")),
    ("httpx2 / httpcore2 / anyio (upstream HTTP)", ("/httpx2/", "/httpcore2/", "/httpx/", "/httpcore/", "/anyio/",
                                                   "/sniffio/")),
    ("aiohttp (upstream HTTP)", ("/aiohttp/", "/multidict/", "/yarl/")),
    ("Django", ("/django/",)),
    ("asgiref", ("/asgiref/",)),
    ("Channels (routing)", ("/channels/",)),
    ("Daphne / Twisted", ("/daphne/", "/twisted/", "/autobahn/", "/txaio/")),
    ("uvicorn", ("/uvicorn/",)),
]


def _frame_layer(file: str, func: str = "") -> str | None:
    file = "/" + file.lstrip("/")  # py-spy prints package-relative paths ("django/db/...")
    if any(fragment in file for fragment in TRANSPARENT) or any(fragment in file for fragment in BOOTSTRAP):
        return None
    if any(func == f and fragment in file for f, fragment in BOOTSTRAP_FUNCS):
        return None
    for layer, fragments in LAYERS:
        if any(fragment in file for fragment in fragments):
            return layer
    return None


def available() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


def record(pid: int, seconds: float, raw_path: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    exe = available()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -r requirements-bench.txt)")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate),
         "--format", "raw", "--output", str(raw_path), "--threads", "--gil", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _parse(raw_path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in raw_path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        stack_text, _, count = line.rpartition(" ")
        frames = []
        for frame in stack_text.split(";"):
            if frame.startswith("thread ("):
                continue
            match = FRAME.match(frame)
            if match:
                frames.append((match["func"], match["file"]))
            else:
                frames.append((frame, ""))
        stacks.append((frames, int(count)))
    return stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", f"{Path(__file__).resolve().parents[1]}/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file.rsplit("/", 2)[-1] if "/" in file else file


def _layer(frames: list[tuple[str, str]]) -> str:
    if frames and frames[-1][0] == "EpollSelector.select":
        # Waiting in epoll_wait: py-spy's --gil still reports some of these samples.
        return "event loop: epoll_wait (mostly idle)"
    for func, file in reversed(frames):
        layer = _frame_layer(file, func)
        if layer is not None:
            return layer
    leaf_file = "/" + (frames[-1][1] if frames else "")
    if "/asyncio/" in leaf_file or "selectors.py" in leaf_file:
        return "asyncio event loop (no library on the stack)"
    if "threading.py" in leaf_file or "/concurrent/" in leaf_file:
        return "thread pools (no library on the stack)"
    return "other stdlib (no library on the stack)"


def gc_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Collections and CPU seconds of the cyclic GC between two ``/_bench/diag`` answers."""
    gens = {g: [after["gc"][g][0] - before["gc"][g][0], after["gc"][g][1] - before["gc"][g][1]] for g in after["gc"]}
    return {"generations": gens, "cpu_s": sum(v[1] for v in gens.values()), "objects": after.get("gc_objects"),
            "longest_pause_s": {g: after["gc"][g][2] for g in after["gc"]}}


def analyse(raw_path: Path, top: int = 25) -> dict[str, Any]:
    stacks = _parse(raw_path)
    total = sum(count for _, count in stacks)
    layers: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        layers[_layer(frames)] += count
        if frames:
            func, file = frames[-1]
            self_time[f"{func} ({_short(file)})"] += count
        seen = set()
        for func, file in frames:
            if "chatproxy/" in file or "bench/" in file:
                key = f"{func} ({_short(file)})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count

    def share(count: int) -> float:
        return count / total if total else 0.0

    return {
        "samples": total,
        "layers": [(name, share(count)) for name, count in layers.most_common()],
        "self": [(name, share(count)) for name, count in self_time.most_common(top)],
        "chatproxy_inclusive": [(name, share(count)) for name, count in inclusive.most_common(top)],
    }
