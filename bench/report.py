"""Markdown tables and the plot of one benchmark run (the dict :mod:`bench.run` builds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

TARGET_US = 125.0
TARGET_RATIO = 1.8
TARGET_P99_MS = 50.0
TARGET_IDLE_KIB = 64.0
TARGET_STALL_OVERHEAD = 0.5
HELD_DELIVERED = 0.98
# The path users get (Daphne, SDK "auto", journal on) and uvicorn: tighter ratios to the floor, and
# the peak memory per concurrent stream of the default path; across workers, p99 added at 600 streams.
TARGET_RATIO_BY_CONFIG = {"daphne": 1.6, "uvicorn": 1.3}
TARGET_PEAK_KIB = {"daphne": 48.0}
TARGET_WORKERS_P99_MS = 100.0
TARGET_WORKERS_STREAMS = 600


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✅" if ok else "❌")


def _main_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The relay runs of the main grid (not the short-stream runs for the per-stream cost)."""
    return [row for row in out.get("relay") or [] if not row.get("short_streams")]


def _is_floor(config: str) -> bool:
    return config.startswith("floor")


def _floor_of(config: str) -> str:
    """The floor a configuration is compared with: the one on the same event loop."""
    return "floor, uvloop" if "uvloop" in config else "floor"


def _floor_by_level(relay: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    return {(row["config"], row["users"]): row["us_per_chunk"] for row in relay
            if _is_floor(row["config"]) and row["us_per_chunk"]}


def _held(row: dict[str, Any]) -> bool:
    return (row["delivered"] or 0) >= HELD_DELIVERED and not row["errors"] and row["added_p99_ms"] is not None \
        and row["added_p99_ms"] < TARGET_P99_MS


def targets(out: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    relay = _main_rows(out)
    floor = _floor_by_level(relay)
    chatproxy = [r for r in relay if not _is_floor(r["config"])]
    configs = list(dict.fromkeys(r["config"] for r in chatproxy))
    for config in configs:
        mine = [r for r in chatproxy if r["config"] == config and r["us_per_chunk"]]
        if not mine:
            continue
        cells = ", ".join(f"{_f(r['us_per_chunk'])} ({r['users']})" for r in mine)
        rows.append((f"≤ {TARGET_US:g} µs CPU per relayed chunk: **{config}** (streams)", cells,
                     all(r["us_per_chunk"] <= TARGET_US for r in mine)))
        base = _floor_of(config)
        ratios = [(r, r["us_per_chunk"] / floor[base, r["users"]]) for r in mine if (base, r["users"]) in floor]
        if ratios:
            rows.append((f"≤ {TARGET_RATIO:g}× the floor ({base}), same run: **{config}**",
                         ", ".join(f"{ratio:.2f}× ({r['users']})" for r, ratio in ratios),
                         all(ratio <= TARGET_RATIO for _, ratio in ratios)))
        tight = TARGET_RATIO_BY_CONFIG.get(config)
        wide = [(r, ratio) for r, ratio in ratios if r["users"] >= 200]
        if tight is not None and wide:
            rows.append((f"≤ {tight:g}× the floor at 200 and 400 streams: **{config}**",
                         ", ".join(f"{ratio:.2f}× ({r['users']})" for r, ratio in wide),
                         all(ratio <= tight for _, ratio in wide)))
        peak = TARGET_PEAK_KIB.get(config)
        judged = [r["peak_kib_per_stream"] <= peak for r in mine if r["users"] >= 200] if peak is not None else []
        if peak is not None:
            rows.append((f"≤ {peak:g} KiB peak per concurrent stream: **{config}**",
                         ", ".join(f"{_f(r['peak_kib_per_stream'])} ({r['users']})" for r in mine),
                         all(judged) if judged else None))
    top = max((r["users"] for r in chatproxy), default=None)
    if top is not None:
        for config in configs:
            for r in chatproxy:
                if r["config"] == config and r["users"] == top:
                    rows.append((f"{top} streams × 20 chunks/s held, p99 added < {TARGET_P99_MS:g} ms: **{config}**",
                                 f"delivered {r['delivered']:.1%}, p99 added {_f(r['added_p99_ms'], 1)} ms"
                                 + (f", errors {sum(r['errors'].values())}" if r["errors"] else ""),
                                 _held(r) if top >= 400 else None))
    for r in out.get("idle") or []:
        if _is_floor(r["config"]):
            continue
        rows.append((f"≤ {TARGET_IDLE_KIB:g} KiB per idle stream: **{r['config']}**",
                     f"{_f(r['kib_per_idle_stream'], 1)} KiB ({r['held']} streams)",
                     r["kib_per_idle_stream"] <= TARGET_IDLE_KIB))
    for r in out.get("workers") or []:
        if r["users"] >= TARGET_WORKERS_STREAMS:
            rows.append((f"{r['users']} streams across workers, all delivered, p99 added < "
                         f"{TARGET_WORKERS_P99_MS:g} ms: **{r['config']}**",
                         f"delivered {(r['delivered'] or 0):.1%}, p99 added {_f(r['added_p99_ms'], 1)} ms, "
                         f"errors {sum(r['errors'].values())}",
                         (r["delivered"] or 0) >= HELD_DELIVERED and not r["errors"]
                         and r["added_p99_ms"] is not None and r["added_p99_ms"] < TARGET_WORKERS_P99_MS))
    stall = out.get("stall") or {}
    for r in stall.get("chatproxy", []):
        over = (r.get("overhead") or {}).get("max")
        ok = over is not None and over <= TARGET_STALL_OVERHEAD and r["recovered"] == r["runs"]
        rows.append((f"stall recovery ≤ STALL + 0.5 s + new attempt's first chunk: **{r['adapter']}**",
                     f"overhead max {_f(over, 3)} s, recovered {r['recovered']}/{r['runs']}", ok))
    return rows


def _relay_table(out: dict[str, Any]) -> list[str]:
    relay = _main_rows(out)
    if not relay:
        return []
    floor = _floor_by_level(relay)
    lines = [
        "| configuration | upstream | journal | streams | CPU µs/chunk | × floor | server CPU (cores) | delivered | "
        "added latency p50 / p99 (ms) | latency through, p99 (ms) | peak KiB/stream | other load (cores) |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(relay, key=lambda r: r["users"]):  # stable: the run order within a level
        key = (_floor_of(r["config"]), r["users"])
        ratio = r["us_per_chunk"] / floor[key] if key in floor and r["us_per_chunk"] else None
        if _is_floor(r["config"]):
            server = r["config"].replace("floor", "floor (bare aiohttp relay)")
        else:
            server = r["config"].replace(", no journal", "")
        journal = "–" if _is_floor(r["config"]) else ("on" if r["journal"] else "off")
        through = r["latency_ms"]["through"].get("p99")
        lines.append(
            f"| {server} | {r.get('upstream', '?')} | {journal} | {r['users']} | **{_f(r['us_per_chunk'])}** | "
            f"{_f(ratio, 2)} | "
            f"{_f(r['server_cpu_share'], 2)} | {r['delivered']:.1%} | {_f(r['added_p50_ms'], 1)} / "
            f"{_f(r['added_p99_ms'], 1)} | {_f(through, 1)} | {_f(r['peak_kib_per_stream'])} | "
            f"{_f(r['other_load_cores'], 2)} |")
    errors = [r for r in relay if r["errors"]]
    for r in errors:
        lines.append(f"\nErrors, {r['config']} {r['users']}: {r['errors']}")
    return lines


def _setup_table(out: dict[str, Any]) -> list[str]:
    """Fixed cost per stream and marginal cost per chunk from two stream lengths (same streams)."""
    relay = out.get("relay") or []
    lines = []
    for short in (r for r in relay if r.get("short_streams") and r["us_per_chunk"]):
        long = next((r for r in _main_rows(out) if r["config"] == short["config"] and r["users"] == short["users"]
                     and r["us_per_chunk"]), None)
        if long is None:
            continue
        n_long, n_short = long["chunks_per_stream"], short["chunks_per_stream"]
        per_stream = (short["us_per_chunk"] - long["us_per_chunk"]) / (1 / n_short - 1 / n_long)
        per_chunk = long["us_per_chunk"] - per_stream / n_long
        if not lines:
            lines = [f"| server | µs/chunk, {n_long}-chunk streams | µs/chunk, {n_short}-chunk streams | "
                     f"fixed cost per stream (ms) | marginal cost per chunk (µs) | share of the {n_long}-chunk "
                     f"cost that is per-stream |", "|---|--:|--:|--:|--:|--:|"]
        lines.append(f"| {short['config']} | {_f(long['us_per_chunk'])} | {_f(short['us_per_chunk'])} | "
                     f"{_f(per_stream / 1000, 2)} | {_f(per_chunk)} | "
                     f"{per_stream / n_long / long['us_per_chunk']:.0%} |")
    return lines


def _stall_tables(out: dict[str, Any]) -> list[str]:
    stall = out.get("stall")
    if not stall:
        return []
    scale = stall["scale"]
    t = stall["timeouts"]
    lines = [
        f"Times scaled 1/{scale:g} (measured seconds; ≙ real time in brackets). Stall: 40 chunks at 20/s, the "
        f"upstream goes silent after chunk 10 (first attempt only). Long answer: 120 healthy chunks at 20/s, "
        f"{120 * 0.05:g} s (≙ {120 * 0.05 * scale / 60:g} min).",
        "",
        "| client | setting | stall: user-visible gap | stall outcome | healthy long answer |",
        "|---|---|--:|---|---|",
    ]
    for baseline in stall.get("baseline", []):
        if "error" in baseline:
            lines.append(f"| {baseline.get('python')} | failed | | | |")
            continue
        for r in baseline["rows"]:
            gap = (r["gap"] or {}).get("p50")
            long = (f"complete, {r['long_chunks']}/120 chunks" if r["long_outcome"] == "complete" else
                    f"**cut**: {r['long_outcome']} after {r['long_duration']:.1f} s (≙ "
                    f"{r['long_duration'] * scale / 60:.0f} min), {r['long_chunks']}/120 chunks")
            real = _f((gap or 0) * scale / 60, 1)
            lines.append(f"| {r['sdk']} alone | {r['setting']} | {_f(gap, 2)} s (≙ {real} min) | "
                         f"{', '.join(r['stall_outcome'])} after {r['stall_chunks'][0]} chunks: **no answer** | "
                         f"{long} |")
    for r in stall.get("chatproxy", []):
        gap = (r["gap"] or {}).get("p50")
        real = None if gap is None else (t["STALL"] * scale + (gap - t["STALL"]))
        long = r["long"]
        raised = r["long_raised_deadline"]
        lines.append(
            f"| chatproxy, {r['adapter']} | STALL {t['STALL'] * scale:g} s → {t['STALL']:.3g} s, DEADLINE "
            f"{t['DEADLINE'] * scale:g} s → {t['DEADLINE']:g} s | {_f(gap, 2)} s (≙ {_f(real, 1)} s) | "
            f"recovered {r['recovered']}/{r['runs']}: complete answer | default profile: {long['outcome']} after "
            f"{_f(long['duration'], 1)} s, {long['deltas']}/120; `*-long` profile (DEADLINE 1800 s): "
            f"{raised['outcome']}, {raised['deltas']}/120 |")
    lines += [
        "",
        "chatproxy's gap, decomposed (seconds, p50 / p95 / max over the runs):",
        "",
        "| adapter | gap | detection (STALL = " + f"{t['STALL']:.3f})" + " | backoff | new attempt → first new delta | "
        "overhead = gap − STALL − new attempt (target ≤ 0.5) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in stall.get("chatproxy", []):
        def cell(key: str, r: dict[str, Any] = r) -> str:
            s = r.get(key) or {}
            return f"{_f(s.get('p50'), 3)} / {_f(s.get('p95'), 3)} / {_f(s.get('max'), 3)}"
        lines.append(f"| {r['adapter']} | {cell('gap')} | {cell('detection')} | {cell('delay')} | "
                     f"{cell('new_attempt')} | {cell('overhead')} |")
    return lines


ADAPTER_LABELS = {
    "raw-aiohttp": "raw aiohttp lines + orjson (the floor's read path; reference)",
    "none": "chatproxy adapter without an SDK (`SDK: \"none\"`, the sample project's): aiohttp, raw SSE + orjson",
    "current-aiohttp": "chatproxy adapter, openai 3.57 sends the request, raw SSE + orjson, aiohttp transport",
    "current-httpx": "chatproxy adapter, openai 3.57 sends the request, raw SSE + orjson, httpx2 transport "
                     "(HTTP_CLIENT default)",
    "legacy": "chatproxy adapter, openai 0.27.6 `ChatCompletion.acreate`",
    "sdk-aiohttp": "openai 3.57 parsed stream (chunk objects), aiohttp transport (reference)",
    "sdk-httpx": "openai 3.57 parsed stream (chunk objects), httpx2 transport (reference)",
}


def _adapter_table(out: dict[str, Any]) -> list[str]:
    rows = out.get("adapters") or []
    if not rows:
        return []
    lines = ["| upstream path | + ChatStream core | CPU µs/chunk | delivered | other load (cores) |",
             "|---|---|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            label = ADAPTER_LABELS.get(r["path"], r["path"])
            lines.append(f"| {label} | {'yes' if r['core'] else 'no'} | failed | | |")
            continue
        lines.append(f"| {ADAPTER_LABELS.get(r['path'], r['path'])} | {'yes' if r['core'] else 'no'} | "
                     f"**{_f(r['us_per_chunk'])}** | {r['chunks'] / r['offered']:.0%} | "
                     f"{_f(r.get('other_load_cores'), 2)} |")
    return lines


def _profile_tables(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for p in out.get("profile") or []:
        us = p["run"]["us_per_chunk"] or 0.0
        gc = p.get("gc") or {}
        chunks = p["run"]["chunks"] or 1
        gc_us = gc.get("cpu_s", 0.0) / chunks * 1e6
        lines += [
            f"### {p['config']}, {p['run']['users']} streams: {_f(us)} µs/chunk, {p['samples']} samples "
            f"(GIL holder only)",
            "",
            f"Cyclic GC (measured apart, inside the shares below): {gc_us:.0f} µs/chunk "
            f"({gc_us / us:.0%} of the CPU; collections gen0/1/2: "
            + "/".join(str(gc.get("generations", {}).get(g, [0])[0]) for g in "012")
            + f"; {gc.get('objects', 0):,} tracked objects"
            + (f"; longest full-collection pause {gc['longest_pause_s']['2'] * 1e3:.0f} ms"
               if gc.get("longest_pause_s") else "") + ").",
            "",
            "| layer (first library frame from the leaf) | share | ≈ µs/chunk |",
            "|---|--:|--:|",
        ]
        lines += [f"| {name} | {share:.1%} | {share * us:.0f} |" for name, share in p["layers"][:16]]
        lines += ["", "| chatproxy function (inclusive) | share | ≈ µs/chunk |", "|---|--:|--:|"]
        lines += [f"| `{name}` | {share:.1%} | {share * us:.0f} |" for name, share in p["chatproxy_inclusive"][:15]]
        lines += ["", "| function (self) | share |", "|---|--:|"]
        lines += [f"| `{name}` | {share:.1%} |" for name, share in p["self"][:15]]
        lines.append("")
    return lines


def _memprofile_tables(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for m in out.get("memprofile") or []:
        lines += [
            f"### {m['config']}, {m['held']} idle streams: heap {_f(m['heap_kib_per_stream'], 1)} KiB + native "
            f"{_f(m['native_kib_per_stream'], 1)} KiB per stream (native under tracemalloc includes its own "
            f"bookkeeping), {m['threads_per_stream']:.2f} OS threads per stream",
            "",
            "| library that allocated | KiB per idle stream |",
            "|---|--:|",
        ]
        lines += [f"| {name} | {kib:.1f} |" for name, kib in m["components"]]
        lines += ["", "| allocation site (← chatproxy frame that led there) | KiB per idle stream |", "|---|--:|"]
        lines += [f"| `{site}` | {kib:.2f} |" for site, kib in m["sites"][:12]]
        lines.append("")
    return lines


def _open_table(out: dict[str, Any]) -> list[str]:
    """Stream-opening cost by configuration: every run, and the median."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in out.get("open") or []:
        by_config.setdefault(row["config"], []).append(row)
    lines = ["| configuration | ms CPU per new stream, each run | median | new streams/s | "
             "OS threads per open stream |", "|---|--:|--:|--:|--:|"]
    for config, rows in by_config.items():
        ms = [r["ms_per_stream"] for r in rows if r["ms_per_stream"]]
        median = statistics.median(ms) if ms else None
        lines.append(f"| {config} | {' / '.join(_f(r['ms_per_stream'], 2) for r in rows)} | **{_f(median, 2)}** | "
                     f"{' / '.join(_f(r['streams_per_s']) for r in rows)} | "
                     f"{' / '.join(_f(r['threads_per_open_stream'], 2) for r in rows)} |")
    return lines


def _fallback_table(out: dict[str, Any]) -> list[str]:
    from bench import fallback

    return fallback.table(out["fallback"])


def _admission_table(out: dict[str, Any]) -> list[str]:
    from bench.admission import table

    return table(out["admission"])


def _ttfb_tables(out: dict[str, Any]) -> list[str]:
    from bench.ttfb import table

    return table(out["ttfb"])


def _workers_tables(out: dict[str, Any]) -> list[str]:
    lines = ["| configuration | streams | delivered | added p50 / p99 ms | workers' CPU us per chunk | "
             "Redis calls per stream-second | Redis CPU us per stream-second | errors |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in out["workers"]:
        lines.append(f"| {r['config']} | {r['users']} | {(r['delivered'] or 0):.1%} | {_f(r['added_p50_ms'], 1)} / "
                     f"{_f(r['added_p99_ms'], 1)} | {_f(r['us_per_chunk'])} | {_f(r['redis_calls_per_stream_s'], 2)} | "
                     f"{_f(r['redis_cpu_us_per_stream_s'])} | {sum(r['errors'].values())} |")
    lines += ["", "Redis calls per stream-second, by command:", "",
              "| configuration | streams | commands |", "|---|--:|---|"]
    for r in out["workers"]:
        top = ", ".join(f"{name} {n:.2f}" for name, n in list(r["redis_by_command"].items())[:8])
        lines.append(f"| {r['config']} | {r['users']} | {top} |")
    lines += ["", f"Capacity from these counts (docs/deploy.md, \"Scaling past one machine\"): each core kept "
              f"at {SCALING_UTILISATION:.0%} busy, streams of 20 chunks/s:", "",
              "| configuration | streams | streams per worker core | streams per Redis core | "
              "Redis commands/s at that load | worker cores one Redis core serves |", "|---|--:|--:|--:|--:|--:|"]
    for r in out["workers"]:
        per_core = scaling(r)
        lines.append(f"| {r['config']} | {r['users']} | {_f(per_core['worker'])} | {_f(per_core['redis'])} | "
                     f"{_f(per_core['redis_commands_per_s'])} | {_f(per_core['workers_per_redis'], 1)} |")
    return lines


SCALING_UTILISATION = 0.7  # the share of a core one plans to use: headroom for bursts and GC pauses


def scaling(r: dict[str, Any], chunks_per_s: float = 20.0) -> dict[str, float | None]:
    """Streams one worker core and one Redis core carry, from a workers run's per-chunk and
    per-stream-second costs (Redis runs commands on one thread: one core is its ceiling)."""
    worker = SCALING_UTILISATION * 1e6 / (r["us_per_chunk"] * chunks_per_s) if r.get("us_per_chunk") else None
    redis = SCALING_UTILISATION * 1e6 / r["redis_cpu_us_per_stream_s"] if r.get("redis_cpu_us_per_stream_s") else None
    return {"worker": worker, "redis": redis,
            "redis_commands_per_s": redis * r["redis_calls_per_stream_s"] if redis else None,
            "workers_per_redis": redis / worker if redis and worker else None}


def _redisops_table(out: dict[str, Any]) -> list[str]:
    from bench import redisops

    return redisops.table(out["redisops"])


def _soak_tables(out: dict[str, Any]) -> list[str]:
    lines = ["| configuration | streams | minutes | delivered | errors | when | RSS MiB | fds | threads | "
             "asyncio tasks |", "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|"]
    for r in out["soak"]:
        head = (f"| {r['config']} | {r['streams']} | {r['minutes']:g} | {(r['delivered'] or 0):.1%} | "
                f"{sum(r['errors'].values())} |")
        for when, key in (("idle, before", "idle_before"), ("loaded, first tenth", "loaded_first"),
                          ("loaded, last tenth", "loaded_last"), ("idle, after", "idle_after")):
            s = r[key]
            lines.append(f"{head} {when} | {s['rss_mib']:.1f} | {s['fds']:.0f} | {s['threads']:.0f} | "
                         f"{s['tasks']:.0f} |")
            head = "| | | | | |"
        lines.append(f"| | | | | | RSS growth under load | {r['rss_mib_per_hour']:+.1f} MiB/h | | | |")
    return lines


def markdown(out: dict[str, Any], png_name: str) -> str:
    m = out["machine"]
    o = out["options"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    relay = _main_rows(out)
    other = [r["other_load_cores"] for r in out.get("relay") or []]
    lines = [
        f"# chatproxy benchmark: `{out['name']}`",
        "",
        f"{out['date']}; {m['cpu']}, {m['cores']} cores; Python {m['python']}; {versions}. "
        f"Whole run {out.get('duration_s', 0) / 60:.1f} min.",
        "",
        f"Load: each stream {1 / o['gap']:g} chunks/s, {o['chunks']} chunks (realistic OpenAI chunk JSON), "
        f"closed loop, random start offsets; window {o['warmup']:g} s warm-up + {o['measure']:g} s measured; "
        f"one server process; {o['probes']} direct streams for the latency baseline. "
        + (f"Other processes on the machine used {min(other):.2f}–{max(other):.2f} cores during the windows."
           if other else ""),
        "",
        f"![benchmark plot]({png_name})",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|:-:|",
    ]
    lines += [f"| {name} | {value} | {_mark(ok)} |" for name, value, ok in targets(out)]
    if relay:
        lines += ["", "## 1. Relay cost and latency (server process CPU; SSE endpoint)", ""]
        lines += _relay_table(out)
        setup = _setup_table(out)
        if setup:
            lines += ["", "### Per-stream versus per-chunk cost (same concurrency, shorter streams: a 2-point fit)",
                      "", *setup]
    if out.get("idle"):
        lines += ["", "### Memory per idle stream (upstream sent headers, then nothing)", "",
                  "| server | upstream | idle streams held | RSS before (MiB) | KiB per idle stream |",
                  "|---|---|--:|--:|--:|"]
        lines += [f"| {r['config']} | {r.get('upstream', '?')} | {r['held']} | {_f(r['rss_base_mib'], 1)} | "
                  f"**{_f(r['kib_per_idle_stream'], 1)}** |" for r in out["idle"]]
    sections = [
        ("stall", "## 2. Stall recovery", _stall_tables),
        ("adapters", "## 3. Upstream paths (consumer process CPU per chunk, 200 paced streams)", _adapter_table),
        ("profile", "## 4. Profile (py-spy, server under load)", _profile_tables),
        ("memprofile", "## 5. What an idle stream holds (tracemalloc, Python heap)", _memprofile_tables),
        ("open", "## 6. Opening a stream (one-chunk streams, closed loop; threads: idle streams held)", _open_table),
        ("workers", "## 8. Across workers (nginx, 2 workers, one Redis; paced streams)", _workers_tables),
        ("soak", "## 9. Soak (one worker, paced streams; idle = no stream open)", _soak_tables),
        ("admission", "## 7. Admission (one thread, per new stream; O(1) cache calls whatever the limit)",
         _admission_table),
        ("fallback", "## 10. Fallbacks: what they cost the stream core", _fallback_table),
        ("ttfb", "## 11. A new stream: time to first byte and first token (open loop, new streams/s)", _ttfb_tables),
        ("redisops", "## 12. Redis commands per stream (journal, admission, circuit, channel layer)",
         _redisops_table),
    ]
    for part, title, tables in sections:
        if out.get(part):
            lines += ["", title, "", *tables(out)]
    if out.get("failures"):
        lines += ["", "## Failures", ""]
        lines += [f"* {f['part']}: `{f['error'].strip().splitlines()[-1]}`" for f in out["failures"]]
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    (ax_cpu, ax_lat, ax_mem), (ax_stall, ax_adapt, ax_prof) = axes
    relay = _main_rows(out)
    configs = list(dict.fromkeys(r["config"] for r in relay))
    styles = {"floor": dict(color="black", linestyle="--", marker="s"),
              "floor, uvloop": dict(color="grey", linestyle="--", marker="s")}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:cyan", "tab:olive", "tab:pink", "tab:purple",
               "tab:brown", "tab:red", "tab:gray"]
    for i, config in enumerate(c for c in configs if not _is_floor(c)):
        styles[config] = dict(color=palette[i % len(palette)], marker="o",
                              linestyle="-" if "no journal" not in config else ":")
    for config in configs:
        rows = sorted((r for r in relay if r["config"] == config), key=lambda r: r["users"])
        users = [r["users"] for r in rows]
        ax_cpu.plot(users, [r["us_per_chunk"] for r in rows], label=config, **styles[config])
        if not _is_floor(config):
            ax_lat.plot(users, [max(0.1, r["added_p99_ms"] or 0.1) for r in rows], label=config, **styles[config])
        ax_mem.plot(users, [r["peak_kib_per_stream"] for r in rows], label=config, **styles[config])
    floor = {users: us for (name, users), us in _floor_by_level(relay).items() if name == "floor"}
    if floor:
        levels = sorted(floor)
        ax_cpu.plot(levels, [floor[u] * TARGET_RATIO for u in levels], color="grey", linestyle="-.",
                    label=f"{TARGET_RATIO:g}× floor")
    ax_cpu.axhline(TARGET_US, color="red", linewidth=1, label=f"target {TARGET_US:g} µs")
    ax_cpu.set(title="CPU per relayed chunk (server process)", xlabel="concurrent streams (20 chunks/s each)",
               ylabel="µs per chunk")
    ax_cpu.set_ylim(bottom=0)
    ax_lat.axhline(TARGET_P99_MS, color="red", linewidth=1, label=f"target {TARGET_P99_MS:g} ms")
    ax_lat.set_yscale("log")
    ax_lat.set(title="Added latency p99 vs reading the upstream directly", xlabel="concurrent streams",
               ylabel="ms (log)")
    ax_mem.set(title="Peak memory per concurrent stream", xlabel="concurrent streams", ylabel="KiB per stream")
    ax_mem.set_ylim(bottom=0)
    for r in out.get("idle") or []:
        ax_mem.scatter([r["users"]], [r["kib_per_idle_stream"]], marker="x", s=80,
                       color=styles.get(r["config"], {}).get("color", "grey"), label=f"{r['config']} idle")
    ax_mem.axhline(TARGET_IDLE_KIB, color="red", linewidth=1, label=f"idle target {TARGET_IDLE_KIB:g} KiB")
    for ax in (ax_cpu, ax_lat, ax_mem):
        if relay:
            ax.set_xticks(sorted({r["users"] for r in relay}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    stall = out.get("stall") or {}
    labels, values, colors = [], [], []
    for baseline in stall.get("baseline", []):
        for r in baseline.get("rows", []):
            if r.get("gap"):
                labels.append(f"{r['sdk']}\n{r['setting']}")
                values.append(r["gap"]["p50"])
                colors.append("tab:red")
    for r in stall.get("chatproxy", []):
        if r.get("gap"):
            labels.append(f"chatproxy\n{r['adapter']}")
            values.append(r["gap"]["p50"])
            colors.append("tab:green")
    if values:
        y = range(len(values))
        ax_stall.barh(list(y), values, color=colors)
        ax_stall.set_yticks(list(y), labels, fontsize=6.5)
        ax_stall.invert_yaxis()
        ax_stall.set_xscale("log")
        for i, v in enumerate(values):
            ax_stall.text(v, i, f" {v:.2f} s", va="center", fontsize=7)
        ax_stall.set(title=f"Mid-stream stall: user-visible gap (times scaled 1/{stall.get('scale', 60):g})",
                     xlabel="seconds (log); red: stream fails, green: answer completes")
    else:
        ax_stall.set_axis_off()

    adapters = [r for r in out.get("adapters") or [] if "error" not in r and r.get("us_per_chunk")]
    if adapters:
        names = [r["path"] + (" + core" if r["core"] else "") for r in adapters]
        ax_adapt.barh(range(len(adapters)), [r["us_per_chunk"] for r in adapters],
                      color=["tab:purple" if r["core"] else ("tab:gray" if r["path"].startswith(("sdk", "raw"))
                                                              else "tab:blue") for r in adapters])
        ax_adapt.set_yticks(range(len(adapters)), names, fontsize=7)
        ax_adapt.invert_yaxis()
        for i, r in enumerate(adapters):
            ax_adapt.text(r["us_per_chunk"], i, f" {r['us_per_chunk']:.0f}", va="center", fontsize=7)
        ax_adapt.set(title="Upstream paths: consumer CPU per chunk", xlabel="µs per chunk")
    else:
        ax_adapt.set_axis_off()

    profiles = out.get("profile") or []
    if profiles:
        layer_names = list(dict.fromkeys(name for p in profiles for name, _ in p["layers"][:9]))
        width = 0.8 / len(profiles)
        for i, p in enumerate(profiles):
            shares = dict(p["layers"])
            us = p["run"]["us_per_chunk"] or 0.0
            ax_prof.barh([j + i * width for j in range(len(layer_names))],
                         [shares.get(name, 0.0) * us for name in layer_names], height=width, label=p["config"])
        ax_prof.set_yticks([j + width * (len(profiles) - 1) / 2 for j in range(len(layer_names))],
                           [n.replace(" (", "\n(") for n in layer_names], fontsize=6.5)
        ax_prof.invert_yaxis()
        ax_prof.legend(fontsize=7)
        ax_prof.set(title="Where chatproxy's CPU goes (py-spy)", xlabel="≈ µs per chunk")
    else:
        ax_prof.set_axis_off()
    fig.suptitle(f"chatproxy benchmark ({out['name']}, {out['date'][:10]}, {out['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
