"""Part 2, stall recovery: the user-visible gap of a mid-stream stall, chatproxy versus the SDKs alone.

Times are scaled down by ``scale`` (default 60: 600 s -> 10 s) so a run takes seconds:

* baseline (:mod:`bench.stall_sdk`, the real SDKs against the chatproxy simulator): openai 0.27.6
  with its default timeout and with ``request_timeout=(10, 300)``, and openai 3.57's default;
* chatproxy: Daphne serving ``POST /chat/stream/`` (one server per upstream adapter: current SDK
  over httpx2, over aiohttp, legacy SDK under the legacy virtualenv), every ``TIMEOUTS`` value
  scaled the same way (``STALL`` 10 s -> 0.167 s, ``DEADLINE`` 300 s -> 5 s, ...) except the retry
  backoff (0.25 s initial, full jitter), which is a real delay, not a timeout. A second admin
  timeout profile, ``*-long``, raises ``DEADLINE`` to 1800 s (-> 30 s) for models named so.

Scenarios: ``stall`` (40 chunks at 20/s, silent for an hour after chunk 10, only on the first
attempt), and a healthy ``long`` answer (120 chunks at 20/s: 6 s, i.e. 6 min at scale 60).

Per stall run (timestamps of SSE events as the client reads them):
gap = first new delta after the retry - last delta before it;
detection = retry event - last delta (STALL plus the watchdog's lateness);
new attempt = first new delta - retry event - backoff delay (with ``ON_PARTIAL=restart`` this
includes regenerating the 10 chunks the user already has, held back while they match);
overhead = gap - STALL - new attempt = (detection - STALL) + backoff. Target: overhead <= 0.5 s.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench import procs

STALL_DIRECTIVE = "[[sim chunks=40 gap=0.05 stall_after=10 stall=3600 times=1]]"
LONG_DIRECTIVE = "[[sim chunks=120 gap=0.05]]"
STALL_AFTER, CHUNKS, LONG_CHUNKS = 10, 40, 120

LONG_PROFILE = (
    "from chatproxy.models import TimeoutProfile as T\n"
    "p = T.objects.get(name='default'); p.pk = None; p.name = 'long-answers'; p.model_pattern = '*-long'\n"
    "p.deadline = {deadline}; p.save()\n"
)


def scaled_timeouts(scale: float) -> dict[str, float]:
    return {
        "CONNECT": 1.0,
        "FIRST_TOKEN": 30 / scale,
        "STALL": 10 / scale,
        "DEADLINE": 300 / scale,
        "KEEPALIVE": 10 / scale,
        "GATEWAY": 60 / scale,
        "BACKOFF_INITIAL": 0.25,
        "BACKOFF_MAX": 4.0,
    }


async def _sse(session: aiohttp.ClientSession, url: str, headers: dict[str, str], prompt: str,
               model: str | None = None) -> list[tuple[float, str, Any]]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if model:
        body["model"] = model
    events: list[tuple[float, str, Any]] = []
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            return [(time.monotonic(), f"http {response.status}", await response.text())]
        pending = b""
        async for data in response.content.iter_any():
            now = time.monotonic()
            pending += data
            *blocks, pending = pending.split(b"\n\n")
            for block in blocks:
                name, payload = None, None
                for line in block.split(b"\n"):
                    if line.startswith(b"event: "):
                        name = line[7:].decode()
                    elif line.startswith(b"data: "):
                        payload = json.loads(line[6:])
                if name:
                    events.append((now, name, payload))
    return events


def _stall_metrics(events: list[tuple[float, str, Any]], stall: float) -> dict[str, Any]:
    names = [name for _, name, _ in events]
    deltas = names.count("delta")
    result: dict[str, Any] = {"outcome": names[-1] if names else "nothing", "deltas": deltas,
                              "resets": names.count("reset"), "retries": names.count("retry")}
    if "retry" not in names:
        return result
    r = names.index("retry")
    before = [t for t, name, _ in events[:r] if name == "delta"]
    after = [t for t, name, _ in events[r:] if name == "delta"]
    if not before or not after:
        return result
    t_retry, _, retry = events[r]
    delay = float(retry["delay"])
    gap = after[0] - before[-1]
    new_attempt = after[0] - t_retry - delay
    result.update(gap=gap, detection=t_retry - before[-1], delay=delay, new_attempt=new_attempt,
                  overhead=gap - stall - new_attempt, reason=retry["reason"])
    return result


def _long_metrics(events: list[tuple[float, str, Any]]) -> dict[str, Any]:
    names = [name for _, name, _ in events]
    end = events[-1] if events else (0.0, "nothing", None)
    return {"outcome": end[1] if end[1] != "error" else f"error {end[2]['code']}", "deltas": names.count("delta"),
            "duration": end[0] - events[0][0] if events else None}


async def _chatproxy_runs(server: procs.Server, runs: int, label: str, stall: float) -> dict[str, Any]:
    headers = server.stream_headers()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        jobs = [_sse(session, server.stream_url, headers, f"cp {label} {i} {STALL_DIRECTIVE}") for i in range(runs)]
        jobs.append(_sse(session, server.stream_url, headers, f"cp {label} long {LONG_DIRECTIVE}"))
        jobs.append(_sse(session, server.stream_url, headers, f"cp {label} long {LONG_DIRECTIVE}",
                         model="gpt-4o-mini-long"))
        results = await asyncio.gather(*jobs)
    return {
        "stall": [_stall_metrics(events, stall) for events in results[:runs]],
        "long": _long_metrics(results[runs]),
        "long_raised_deadline": _long_metrics(results[runs + 1]),
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "max": ordered[-1], "n": len(ordered)}


def run(*, runs: int, scale: float, legacy_python: str | None, databases: procs.Databases,
        log: Any = print) -> dict[str, Any]:
    from chatproxy.simulator.process import SimulatorProcess

    timeouts = scaled_timeouts(scale)
    stall = timeouts["STALL"]
    out: dict[str, Any] = {"scale": scale, "timeouts": timeouts, "runs": runs, "baseline": [], "chatproxy": []}
    with SimulatorProcess(quiet=True) as sim:
        # The baselines only wait for their timeouts: they run in the background meanwhile.
        pythons = [p for p in (legacy_python, sys.executable) if p]
        baselines = []
        for python in pythons:
            log(f"  stall baseline: {python} -m bench.stall_sdk (in the background)")
            baselines.append((python, subprocess.Popen(
                [python, "-m", "bench.stall_sdk", "--base-url", sim.base_url, "--scale", str(scale),
                 "--runs", str(max(2, runs // 3))], cwd=procs.ROOT, env=procs._child_env(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        adapters = [("no SDK (aiohttp)", sys.executable, {"BENCH_SDK": "none"}),
                    ("current/httpx", sys.executable, {"BENCH_SDK": "current", "BENCH_HTTP_CLIENT": "httpx"}),
                    ("current/aiohttp", sys.executable, {"BENCH_SDK": "current", "BENCH_HTTP_CLIENT": "aiohttp"})]
        if legacy_python:
            adapters.append(("legacy 0.27.6", legacy_python, {"BENCH_SDK": "legacy"}))
        for label, python, env in adapters:
            log(f"  stall recovery through chatproxy ({label})")
            setup = LONG_PROFILE.format(deadline=1800 / scale)
            server = procs.Server("daphne", upstream=sim.base_url, python=python, env=env, databases=databases,
                                  timeouts=timeouts, setup=setup)
            try:
                server.warm_up(directive="[[sim chunks=3 gap=0.001]]")
                result = asyncio.run(_chatproxy_runs(server, runs, label, stall))
            finally:
                server.stop()
            stalls = result["stall"]
            out["chatproxy"].append({
                "adapter": label,
                "recovered": sum(1 for s in stalls if "gap" in s and s["outcome"] == "done" and s["deltas"] == CHUNKS),
                "runs": len(stalls),
                "resets": sum(s["resets"] for s in stalls),
                **{key: _summary([s[key] for s in stalls if key in s])
                   for key in ("gap", "detection", "delay", "new_attempt", "overhead")},
                "long": result["long"],
                "long_raised_deadline": result["long_raised_deadline"],
                "raw": stalls,
            })
        for python, proc in baselines:
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode != 0:
                out["baseline"].append({"error": stderr[-2000:], "python": python})
            else:
                out["baseline"].append(_baseline_summary(json.loads(stdout)))
    return out


def _baseline_summary(doc: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for key, label in doc["labels"].items():
        stalls = [run for name, run in doc["runs"].items() if name.startswith(f"{key}/stall/")]
        long = doc["runs"][f"{key}/long/0"]
        gaps = [run["ended"] - run["chunks"][-1] for run in stalls if run["chunks"]]
        rows.append({
            "sdk": doc["sdk"],
            "setting": label,
            "stall_outcome": sorted({run["outcome"] for run in stalls}),
            "stall_chunks": [len(run["chunks"]) for run in stalls],
            "gap": _summary(gaps),
            "long_outcome": long["outcome"],
            "long_chunks": len(long["chunks"]),
            "long_duration": long["ended"] - long["started"],
        })
    return {"sdk": doc["sdk"], "rows": rows}
