"""``make bench`` / ``python -m bench``: every chatproxy benchmark in one run on this machine.

Parts (``--parts``, default all):

* ``relay``    -- CPU per relayed chunk, added latency and memory under paced load, for the floor
                  relay and chatproxy under Daphne and uvicorn, journal on and off (bench/relay.py);
* ``idle``     -- memory per idle stream (bench/relay.py);
* ``stall``    -- user-visible gap of a mid-stream stall, chatproxy versus the SDKs (bench/stall.py);
* ``adapters`` -- CPU per chunk of each upstream path (bench/adapters.py);
* ``profile``  -- py-spy on chatproxy under the 200-stream load, and the GC's share (bench/profile.py);
* ``memprofile`` -- what an idle stream holds, by library (tracemalloc; bench/memprofile.py);
* ``admission`` -- time to take and give back a per-user lease at limits 4 and 100000, LocMem and
                  Redis (bench/admission.py);
* ``workers``  -- nginx + 2 workers + Redis, paced streams: delivery, added latency, and the Redis
                  commands per stream-second (bench/workers.py; not in the default parts);
* ``soak``     -- one worker, paced streams for ``--soak-minutes`` (default 30): RSS, open fds,
                  threads and asyncio tasks over time and idle before/after (bench/soak.py; not in the
                  default parts);
* ``open``     -- what opening a stream costs: CPU per new stream and OS threads per open stream,
                  DirectStreams versus Django's handler (bench/relay.py; not in the default parts).
* ``ttfb``     -- the latency a new stream adds (time to first byte, to first token) at 50 new streams/s,
                  open loop, and the CPU per new stream: floor, Daphne and uvicorn interleaved
                  (bench/ttfb.py).
* ``redisops`` -- the Redis commands a stream costs (journal, admission, circuit, channel layer), by
                  command, quiet and resumed on another worker (bench/redisops.py; not in the default parts).
* ``fallback`` -- what fallbacks cost: the stream core's CPU per chunk and per stream with none,
                  with fallbacks configured, and answered by a fallback (bench/fallback.py). The
                  relay part's ``uvicorn, fallbacks`` row is the same under a real server.

Writes ``bench/results/<name>.md`` (the tables), ``<name>.png`` (the plot) and, git-ignored,
``bench/results/raw/<name>.json`` (every number) and py-spy's raw stacks. ``--quick`` is a
~2-minute smoke run with shorter windows and fewer levels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import procs

RESULTS = Path(__file__).resolve().parent / "results"


def _default_legacy_python() -> str | None:
    for candidate in (os.environ.get("BENCH_LEGACY_PYTHON"), str(procs.ROOT / ".venv-legacy" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    parser.add_argument("--parts", help="comma-separated (default relay,idle,stall,adapters,admission,ttfb,"
                                        "profile,memprofile; quick: the first six; also: workers, soak, open, "
                                        "fallback, redisops)")
    parser.add_argument("--levels", help="concurrent streams, comma-separated (default 100,200,400; quick: 100)")
    parser.add_argument("--configs", type=lambda text: [c.strip() for c in text.split(";")],
                        help="relay configurations, ';'-separated, e.g. 'floor;uvicorn;uvicorn, gc.freeze' "
                             "(names: CONFIGS in bench/relay.py; default: DEFAULT_CONFIGS there)")
    parser.add_argument("--warmup", type=float, help="seconds of load before the window (default 3; quick 2)")
    parser.add_argument("--measure", type=float, help="seconds in the measured window (default 10; quick 3)")
    parser.add_argument("--chunks", type=int, default=200, help="chunks per stream (default 200)")
    parser.add_argument("--rate", type=float, default=20.0, help="chunks per second per stream (default 20)")
    parser.add_argument("--probes", type=int, default=10, help="direct streams for the latency baseline")
    parser.add_argument("--idle-streams", type=int, help="streams for the idle-memory test (default 400; quick 100)")
    parser.add_argument("--stall-runs", type=int, help="stall runs per adapter (default 12; quick 3)")
    parser.add_argument("--scale", type=float, default=60.0, help="time scale of the stall part (default 60)")
    parser.add_argument("--setup-chunks", type=int, default=50,
                        help="chunks per stream of the extra per-stream-cost runs (0: skip them; quick: skipped)")
    parser.add_argument("--setup-streams", type=int, default=100)
    parser.add_argument("--open-streams", type=int, default=20,
                        help="concurrent one-chunk streams of the open part (default 20)")
    parser.add_argument("--open-idle-streams", type=int, default=50,
                        help="idle streams held to count threads per open stream in the open part (default 50)")
    parser.add_argument("--open-repeats", type=int, default=2, help="runs of each configuration in the open part")
    parser.add_argument("--workers-streams", default="600",
                        help="concurrent streams of the workers part, comma-separated (default 600)")
    parser.add_argument("--workers-kinds", default="daphne,uvicorn", help="server kinds of the workers part")
    parser.add_argument("--redisops-streams", type=int, default=50, help="concurrent streams of the redisops part")
    parser.add_argument("--redisops-chunks", type=int, default=100, help="chunks per stream of the redisops part")
    parser.add_argument("--ttfb-rate", type=float, default=50.0, help="new streams per second of the ttfb part")
    parser.add_argument("--ttfb-direct-rate", type=float, default=10.0,
                        help="new streams per second straight to the pacer in the ttfb part (its baseline)")
    parser.add_argument("--ttfb-arrivals", choices=("even", "poisson"), default="even",
                        help="ttfb arrivals: evenly spaced (default) or a Poisson process")
    parser.add_argument("--ttfb-chunks", type=int, default=20, help="chunks per stream of the ttfb part (at --rate)")
    parser.add_argument("--ttfb-measure", type=float, help="seconds per ttfb window (default 5; quick 3)")
    parser.add_argument("--ttfb-repeats", type=int, help="ttfb windows per configuration, interleaved (default 2; "
                                                         "quick 1)")
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument("--soak-streams", type=int, default=200)
    parser.add_argument("--soak-config", default="daphne", help="server configuration of the soak (default daphne)")
    parser.add_argument("--soak-grace", type=float, default=30.0,
                        help="the servers' RESUME.GRACE: how long cut streams may still run after the load")
    parser.add_argument("--profile-streams", type=int, default=200)
    parser.add_argument("--memprofile-streams", type=int, default=50)
    parser.add_argument("--legacy-python", default=_default_legacy_python(),
                        help="python of a virtualenv with openai 0.27.x (default .venv-legacy/bin/python)")
    parser.add_argument("--name", help="results file name (default: full, or quick)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the server to the last core and the load to the others (best on an idle machine)")
    parser.add_argument("--wait-quiet", type=float, default=8.0,
                        help="before each measured run wait up to this many seconds for other processes to "
                             "use < 0.25 cores (default 8; 0: never wait)")
    parser.add_argument("--quiet-budget", type=float, default=60.0,
                        help="total seconds all those waits may take in one run (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report-only", metavar="RAW_JSON",
                        help="only rewrite <name>.md and <name>.png from a raw JSON of an earlier run")
    args = parser.parse_args(argv)
    quick = args.quick
    args.levels = [int(x) for x in (args.levels or ("100" if quick else "100,200,400")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 3.0)
    args.measure = args.measure if args.measure is not None else (3.0 if quick else 10.0)
    if quick:
        args.setup_chunks = 0
    args.idle_streams = args.idle_streams or (100 if quick else 400)
    args.stall_runs = args.stall_runs or (3 if quick else 12)
    args.ttfb_measure = args.ttfb_measure or (3.0 if quick else 5.0)
    args.ttfb_repeats = args.ttfb_repeats or (1 if quick else 2)
    default_parts = "relay,idle,stall,adapters,admission,ttfb" + ("" if quick else ",profile,memprofile")
    args.parts = [x.strip() for x in (args.parts or default_parts).split(",")]
    args.gap = 1.0 / args.rate
    args.spread = 2.0
    args.name = args.name or ("quick" if quick else "full")
    if args.legacy_python:
        args.legacy_python = str(Path(args.legacy_python).absolute())
    return args


def machine() -> dict[str, Any]:
    import psutil

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("django", "channels", "daphne", "uvicorn", "aiohttp", "openai", "orjson", "httpx2"):
        try:
            import importlib.metadata

            versions[package] = importlib.metadata.version(package)
        except Exception:
            versions[package] = None
    return {"cpu": cpu, "cores": psutil.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "versions": versions}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _quiet(args: argparse.Namespace, ours: list[int]) -> None:
    """On a shared machine, wait a little for other processes' load to drop before measuring."""
    budget = min(args.wait_quiet, args.quiet_budget)
    if budget <= 0:
        return
    started = time.monotonic()
    load = procs.wait_for_quiet(budget, ours=ours)
    args.quiet_budget -= time.monotonic() - started
    if load >= 0.25:
        log(f"  other processes use {load:.2f} cores: measuring anyway")


def part_relay(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import relay

    configs = args.configs or relay.DEFAULT_CONFIGS
    rows = out.setdefault("relay", [])
    # Without --configs, the secondary configurations (variants of one setting) run at one level.
    secondary_level = args.levels[len(args.levels) // 2]
    for users in args.levels:
        for name in configs:
            if not args.configs and name in relay.SECONDARY_CONFIGS and users != secondary_level:
                continue
            _quiet(args, [pacer.pid])
            log(f"relay: {name}, {users} streams ({args.warmup:g} s warm-up + {args.measure:g} s window)")
            row = relay.relay_run(name, users, pacer, dbs, args)
            rows.append(row)
            _log_relay(row)
    # Per-stream versus per-chunk cost: the same 200-stream load with 4x shorter streams (4x the
    # request rate); the two points give fixed cost per stream and marginal cost per chunk.
    if args.setup_chunks and args.setup_streams:
        short = argparse.Namespace(**{**vars(args), "chunks": args.setup_chunks})
        for name in ("floor", "daphne", "uvicorn"):
            if name not in configs:
                continue
            _quiet(args, [pacer.pid])
            log(f"relay: {name}, {args.setup_streams} streams of {args.setup_chunks} chunks (per-stream cost)")
            row = relay.relay_run(name, args.setup_streams, pacer, dbs, short)
            row["short_streams"] = True
            rows.append(row)
            _log_relay(row)


def _log_relay(row: dict[str, Any]) -> None:
    us = f"{row['us_per_chunk']:.0f}" if row["us_per_chunk"] else "-"
    log(f"  {us} us/chunk, delivered {row['delivered']:.1%}, added p50/p99 "
        f"{row['added_p50_ms'] or 0:.1f}/{row['added_p99_ms'] or 0:.1f} ms, "
        f"{row['peak_kib_per_stream']:.0f} KiB/stream, other load {row['other_load_cores']:.2f} cores"
        + (f", errors {row['errors']}" if row["errors"] else ""))


def part_idle(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import relay

    rows = out.setdefault("idle", [])
    for name in ("floor", "daphne", "uvicorn", "uvicorn, current SDK over httpx2"):
        if args.configs and name not in args.configs:
            continue
        log(f"idle memory: {name}, {args.idle_streams} stalled streams")
        row = relay.idle_memory(name, args.idle_streams, pacer, dbs, args)
        rows.append(row)
        log(f"  {row['kib_per_idle_stream']:.1f} KiB per idle stream ({row['held']} held)")


OPEN_CONFIGS = ["uvicorn", "uvicorn, Django path", "daphne", "daphne, Django path"]


def part_open(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    """Stream-opening cost, each configuration ``--open-repeats`` times, interleaved (a shared
    machine drifts: compare runs made close together)."""
    from bench import relay

    configs = args.configs or OPEN_CONFIGS
    rows = out.setdefault("open", [])
    for repeat in range(args.open_repeats):
        for name in configs:
            _quiet(args, [pacer.pid])
            log(f"open: {name}, {args.open_streams} one-chunk streams (run {repeat + 1})")
            row = relay.open_cost(name, args.open_streams, pacer, dbs, args)
            idle = relay.idle_memory(name, args.open_idle_streams, pacer, dbs, args)
            row["threads_per_open_stream"] = idle["threads_per_idle_stream"]
            row["idle_streams_held"] = idle["held"]
            rows.append(row)
            log(f"  {row['ms_per_stream'] or 0:.2f} ms CPU per new stream ({row['streams_per_s']:.0f} streams/s), "
                f"{row['threads_per_open_stream']:.2f} threads per open stream, other load "
                f"{row['other_load_cores']:.2f} cores" + (f", errors {row['errors']}" if row["errors"] else ""))


def part_ttfb(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import ttfb

    out["ttfb"] = ttfb.run(args, pacer, dbs, log, quiet=lambda ours: _quiet(args, ours))


def part_fallback(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from bench import fallback

    log("fallback: the stream core with and without fallbacks (in a child process)")
    out["fallback"] = fallback.run_child(repeats=3 if args.quick else 7)
    for line in fallback.table(out["fallback"])[4:]:
        log(f"  {line}")


def part_admission(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """In a process of its own: it configures Django for itself."""
    rounds = 300 if args.quick else 2000
    log(f"admission: {rounds} admissions per case")
    done = subprocess.run([sys.executable, "-m", "bench.admission", "--json", "--rounds", str(rounds)],
                          cwd=procs.ROOT, capture_output=True, text=True, timeout=300, check=True)
    out["admission"] = json.loads(done.stdout.strip().splitlines()[-1])


def part_workers(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import workers

    rows = out.setdefault("workers", [])
    for kind in args.workers_kinds.split(","):
        for users in (int(x) for x in args.workers_streams.split(",")):
            _quiet(args, [pacer.pid])
            log(f"workers: nginx + 2 {kind} workers + Redis, {users} streams")
            row = workers.run(kind, 2, users, pacer, dbs, args)
            rows.append(row)
            log(f"  delivered {row['delivered'] or 0:.1%}, added p99 {row['added_p99_ms'] or 0:.1f} ms, "
                f"{row['redis_calls_per_stream_s']:.2f} Redis calls per stream-second"
                + (f", errors {row['errors']}" if row["errors"] else ""))


def part_redisops(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import redisops

    log(f"redisops: {args.redisops_streams} streams of {args.redisops_chunks} chunks on Daphne workers + Redis")
    out["redisops"] = redisops.run(args.redisops_streams, args.redisops_chunks, args.gap, pacer, dbs)
    for row in out["redisops"]["rows"]:
        log(f"  {row['case']}: {row['per_stream']:.1f} Redis commands per stream, "
            f"{row['per_stream_s']:.2f} per stream-second")


def part_soak(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import soak

    log(f"soak: {args.soak_config}, {args.soak_streams} streams for {args.soak_minutes:g} min")
    row = soak.run(args.soak_config, args.soak_streams, args.soak_minutes, pacer, dbs, args, log=log)
    out.setdefault("soak", []).append(row)
    log(f"  idle before {row['idle_before']}, after {row['idle_after']}; RSS {row['rss_mib_per_hour']:+.1f} MiB/h")


def part_stall(args: argparse.Namespace, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import stall

    log(f"stall recovery (times scaled 1/{args.scale:g}, {args.stall_runs} runs per adapter)")
    out["stall"] = stall.run(runs=args.stall_runs, scale=args.scale, legacy_python=args.legacy_python,
                             databases=dbs, log=log)
    for row in out["stall"]["chatproxy"]:
        gap = row["gap"] or {}
        log(f"  {row['adapter']}: recovered {row['recovered']}/{row['runs']}, gap p50 {gap.get('p50', 0):.3f} s, "
            f"overhead max {(row['overhead'] or {}).get('max', 0):.3f} s")


ADAPTER_PATHS = [
    ("raw-aiohttp", False, "main"),
    ("none", False, "main"),
    ("current-aiohttp", False, "main"),
    ("current-httpx", False, "main"),
    ("legacy", False, "legacy"),
    ("sdk-aiohttp", False, "main"),
    ("sdk-httpx", False, "main"),
    ("none", True, "main"),
    ("current-aiohttp", True, "main"),
    ("current-httpx", True, "main"),
    ("legacy", True, "legacy"),
]


def part_adapters(args: argparse.Namespace, pacer: procs.Pacer, out: dict[str, Any]) -> None:
    import subprocess

    rows = out.setdefault("adapters", [])
    users = 200 if not args.quick else 100
    paths = ADAPTER_PATHS if not args.quick else [p for p in ADAPTER_PATHS if not p[0].startswith("sdk")][:5]
    for path, core, which in paths:
        python = sys.executable if which == "main" else args.legacy_python
        label = path + (" + core" if core else "")
        if python is None:
            log(f"adapters: {label}: skipped (no legacy python; pass --legacy-python)")
            continue
        _quiet(args, [pacer.pid])
        log(f"adapters: {label}, {users} streams")
        t0 = time.monotonic() + 1.5
        cfg = {"path": path, "core": core, "pacer": pacer.base_url, "users": users, "chunks": args.chunks,
               "gap": args.gap, "t0": t0, "spread": args.spread, "warmup": args.warmup,
               "measure": min(args.measure, 6.0), "seed": args.seed}
        proc = subprocess.Popen([python, "-m", "bench.adapters", json.dumps(cfg)], cwd=procs.ROOT,
                                env=procs._child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.pin(proc.pid, procs.SERVER_CPUS)
        foreign = procs.ForeignLoad([proc.pid, pacer.pid])
        procs.sleep_until(t0 + args.warmup)
        foreign.start()
        procs.sleep_until(t0 + args.warmup + cfg["measure"])
        other = foreign.stop()  # before the process exits, while its CPU time can still be read
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            log(f"  failed: {stderr[-1500:]}")
            rows.append({"path": path, "core": core, "error": stderr[-1500:]})
            continue
        row = json.loads(stdout)
        row["other_load_cores"] = other
        rows.append(row)
        log(f"  {row['us_per_chunk']:.0f} us/chunk ({row['chunks']} chunks, delivered "
            f"{row['chunks'] / row['offered']:.0%})" + (f", errors {row['errors']}" if row["errors"] else ""))


def part_profile(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import memprofile, profile, relay

    if profile.available() is None:
        log("profile: skipped (py-spy not installed)")
        return
    raw_dir = RESULTS / "raw"
    rows = out.setdefault("profile", [])
    for name in ("daphne", "uvicorn"):
        if args.configs and name not in args.configs:
            continue
        raw_path = raw_dir / f"{args.name}-pyspy-{name}.txt"
        state: dict[str, Any] = {}

        def probe(server: procs.Server, phase: str, state: dict[str, Any] = state, raw_path: Path = raw_path) -> Any:
            diag = memprofile._diag(server)
            if phase == "start":
                state["diag"] = diag
                state["spy"] = profile.record(server.pid, args.measure - 0.5, raw_path)
                return None
            return profile.gc_delta(state["diag"], diag)

        _quiet(args, [pacer.pid])
        log(f"profile: py-spy on {name}, {args.profile_streams} streams")
        run = relay.relay_run(name, args.profile_streams, pacer, dbs, args, probe=probe, extra_env={"BENCH_DIAG": "1"})
        spy = state.get("spy")
        if spy is not None:
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0 or not raw_path.exists():
                log(f"  py-spy failed: {err.decode(errors='replace')[-500:]}")
                continue
        analysis = profile.analyse(raw_path)
        rows.append({"config": name, "run": run, "gc": run.pop("probe"), **analysis})
        gc_cpu = rows[-1]["gc"]["cpu_s"] if rows[-1]["gc"] else 0.0
        log(f"  {run['us_per_chunk']:.0f} us/chunk, GC {gc_cpu / max(1, run['chunks']) * 1e6:.0f} us/chunk; "
            + ", ".join(f"{layer} {share:.0%}" for layer, share in analysis["layers"][:4]))


def part_memprofile(args: argparse.Namespace, pacer: procs.Pacer, dbs: procs.Databases, out: dict[str, Any]) -> None:
    from bench import memprofile

    rows = out.setdefault("memprofile", [])
    for name in ("daphne", "uvicorn"):
        if args.configs and name not in args.configs:
            continue
        log(f"memory profile: {name}, {args.memprofile_streams} idle streams under tracemalloc")
        row = memprofile.run(name, args.memprofile_streams, pacer, dbs, args)
        rows.append(row)
        log(f"  heap {row['heap_kib_per_stream']:.0f} KiB + native {row['native_kib_per_stream']:.0f} KiB per stream, "
            f"{row['threads_per_stream']:.2f} threads per stream")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench import report

    if args.report_only:
        from bench import profile

        raw_json = Path(args.report_only)
        out = json.loads(raw_json.read_text())
        for row in out.get("profile") or []:  # re-analyse py-spy's stacks if they are still there
            stacks = raw_json.parent / f"{out['name']}-pyspy-{row['config']}.txt"
            if stacks.exists():
                row.update(profile.analyse(stacks))
        md_path, png_path = RESULTS / f"{out['name']}.md", RESULTS / f"{out['name']}.png"
        md_path.write_text(report.markdown(out, png_path.name))
        report.plot(out, png_path)
        log(f"wrote {md_path}, {png_path}")
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "raw").mkdir(exist_ok=True)
    procs.set_pinning(args.pin)
    if args.pin:
        procs.pin_self()
    started = time.monotonic()
    out: dict[str, Any] = {
        "name": args.name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {k: v for k, v in vars(args).items()},
        "failures": [],
    }
    if not args.legacy_python:
        log("no legacy python (.venv-legacy/bin/python or --legacy-python): openai 0.27 parts are skipped")
    pacer = procs.Pacer()
    dbs = procs.Databases()
    try:
        for part in args.parts:
            try:
                if part == "relay":
                    part_relay(args, pacer, dbs, out)
                elif part == "idle":
                    part_idle(args, pacer, dbs, out)
                elif part == "stall":
                    part_stall(args, dbs, out)
                elif part == "adapters":
                    part_adapters(args, pacer, out)
                elif part == "profile":
                    part_profile(args, pacer, dbs, out)
                elif part == "memprofile":
                    part_memprofile(args, pacer, dbs, out)
                elif part == "workers":
                    part_workers(args, pacer, dbs, out)
                elif part == "redisops":
                    part_redisops(args, pacer, dbs, out)
                elif part == "soak":
                    part_soak(args, pacer, dbs, out)
                elif part == "admission":
                    part_admission(args, out)
                elif part == "open":
                    part_open(args, pacer, dbs, out)
                elif part == "fallback":
                    part_fallback(args, out)
                elif part == "ttfb":
                    part_ttfb(args, pacer, dbs, out)
                else:
                    raise SystemExit(f"unknown part {part!r}")
            except Exception:
                log(f"part {part} failed:\n{traceback.format_exc()}")
                out["failures"].append({"part": part, "error": traceback.format_exc()[-3000:]})
    finally:
        pacer.stop()
        dbs.cleanup()
    out["duration_s"] = time.monotonic() - started
    raw_json = RESULTS / "raw" / f"{args.name}.json"
    raw_json.write_text(json.dumps(out, indent=1, default=str))
    md_path, png_path = RESULTS / f"{args.name}.md", RESULTS / f"{args.name}.png"
    markdown = report.markdown(out, png_path.name)
    md_path.write_text(markdown)
    try:
        report.plot(out, png_path)
    except Exception:
        log(f"plot failed:\n{traceback.format_exc()}")
    print()
    print(markdown)
    log(f"wrote {md_path.relative_to(procs.ROOT)}, {png_path.relative_to(procs.ROOT)}, "
        f"{raw_json.relative_to(procs.ROOT)} in {out['duration_s'] / 60:.1f} min")
    if out["failures"]:
        sys.exit(1)
