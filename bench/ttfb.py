"""Part ``ttfb``: the latency a *new* stream adds, at a fixed rate of new streams (open loop).

Closed-loop load (:mod:`bench.loadgen`) opens a stream only when one ends, so a slow server gets
fewer new streams; here arrivals follow a fixed schedule whether or not earlier streams finished,
as users do. Every stream is short (``--ttfb-chunks`` at ``--rate`` chunks/s), so at 50 new
streams/s about 50 are open at once and nearly all the work is opening streams.

One run of the part: the configurations' servers are started once (as in :mod:`bench.relay`) and
measured in turn, in windows of ``--ttfb-measure`` seconds, ``--ttfb-repeats`` rounds in
alternating order (A B C, C B A, ...), so machine drift hits all of them alike. Each window is one
load generator process (``python -m bench.ttfb '<config JSON>'``, below) that sends

* ``--ttfb-rate`` new streams/s through the server under test (arrivals evenly spaced, or Poisson
  with ``--ttfb-arrivals poisson``), and
* ``--ttfb-direct-rate`` new streams/s straight to the pacer (the baseline: same client, same
  seconds, same machine load).

Each stream is a new TCP connection (``Connection: close``) driven by a bare :class:`asyncio.Protocol`:
the request leaves in one ``write`` as soon as the connection is up, and every ``data_received``
is timestamped once. Per stream:

* time to first byte: request written -> first response bytes (chatproxy: headers and its ``: open``
  comment; the floor and the pacer: their headers), and -> first body bytes;
* first token: the pacer stamps each content token with its send time (:mod:`bench.pacer`);
  first content token sent -> its arrival, and request written -> its arrival.

Only streams *scheduled* inside ``[w0, w1)`` are counted; arrivals go on for one stream's length
after ``w1`` so the last counted streams run under the same load. Added latency is
``pN(through) - pN(direct)``, as in the relay part. The load generator reports its own lag (how
late each arrival's timer fired and how late its request left, and a 10 ms ticker's lag): an
open-loop generator that falls behind sends fewer streams than scheduled and delays its own reads,
so such a window is marked as not valid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

MARK = re.compile(rb"~(\d+\.\d+)")
END_MARKERS: dict[str, bytes | None] = {"sse": b"event: done", "floor": None, "direct": b"data: [DONE]"}
DEFAULT_CONFIGS = ["floor", "daphne", "uvicorn"]
#: A request that leaves more than this after its scheduled time was not sent on time.
ON_TIME_S = 0.010
#: A window is valid when at least this share of its requests left on time ...
VALID_ON_TIME = 0.99
#: ... and the generator's 10 ms ticker was at most this late at p99.
VALID_LOOP_LAG_S = 0.010
#: Per-stream times recorded by the load generator (seconds).
METRICS = ("ttfb", "body", "token", "first_token", "start_lag")


# --------------------------------------------------------------------------- the client side


class Probe(asyncio.Protocol):
    """One stream on its own connection: writes the request, parses the HTTP/1.1 response
    (chunked or not) and the SSE body as it arrives, and keeps the times of its first bytes,
    first body bytes and first content token."""

    def __init__(self, request: bytes, expected: int, end_marker: bytes | None,
                 on_close: Callable[[Probe], None] | None = None) -> None:
        self.request = request
        self.expected = expected
        self.end_marker = end_marker
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.counted = False  # scheduled inside the measured window
        self.t_connected: float | None = None
        self.t_write: float | None = None
        self.t_first: float | None = None  # first response bytes (status line)
        self.t_body: float | None = None  # first body bytes
        self.t_token: float | None = None  # arrival of the first content token
        self.s_token: float | None = None  # ... and its send time, stamped by the pacer
        self.status = 0
        self.tokens = 0
        self.ended = False  # the body is complete (last chunk, Content-Length reached, or EOF)
        self.saw_end_marker = False
        self.error_event = False
        self.closed = False
        self._head: bytes | None = b""  # None once the headers are parsed
        self._chunked = False
        self._length: int | None = None
        self._raw = b""  # undecoded chunked body
        self._need = -1  # bytes of the current chunk still to come (-1: a size line is next)
        self._sse = b""  # decoded body not yet cut at an event boundary
        self._body_bytes = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.t_connected = time.monotonic()
        transport.write(self.request)
        self.t_write = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.feed(data, time.monotonic())
        if self.ended and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        if self._head is None and not self._chunked and self._length is None:
            self.ended = True  # no framing: EOF ends the body
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_close is not None:
            self.on_close(self)

    # parsing (no I/O: fed bytes and their arrival time)

    def feed(self, data: bytes, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return
            self._headers(head[:end])
            self._head = None
            data = head[end + 4:]
            if not data:
                return
        if not self._chunked:
            self._body(data, now)
            if self._length is not None and self._body_bytes >= self._length:
                self.ended = True
            return
        raw = self._raw + data
        while not self.ended:
            if self._need < 0:
                eol = raw.find(b"\r\n")
                if eol < 0:
                    break
                size = int(raw[:eol].split(b";", 1)[0], 16)
                raw = raw[eol + 2:]
                if size == 0:
                    self.ended = True  # the last chunk (trailers, if any, are not read)
                    break
                self._need = size
            if len(raw) < self._need + 2:
                break
            piece, raw = raw[:self._need], raw[self._need + 2:]
            self._need = -1
            self._body(piece, now)
        self._raw = raw

    def _headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self._chunked = True
            elif name == b"content-length":
                self._length = int(value)

    def _body(self, piece: bytes, now: float) -> None:
        if self.t_body is None:
            self.t_body = now
        self._body_bytes += len(piece)
        pending = self._sse + piece
        cut = pending.rfind(b"\n\n")
        if cut < 0:
            self._sse = pending
            return
        block, self._sse = pending[:cut], pending[cut + 2:]
        marks = MARK.findall(block)
        if marks:
            if self.t_token is None:
                self.t_token, self.s_token = now, float(marks[0])
            self.tokens += len(marks)
        if b"event: error" in block:
            self.error_event = True
        if self.end_marker is not None and self.end_marker in block:
            self.saw_end_marker = True

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.ended and self.tokens >= self.expected and not self.error_event
                and (self.end_marker is None or self.saw_end_marker))

    def times(self) -> dict[str, float | None]:
        """The per-stream times of :data:`METRICS` (None where the stream did not get that far);
        ``start_lag`` is filled in by the caller, which knows the schedule."""
        def since_write(t: float | None) -> float | None:
            return None if t is None or self.t_write is None else t - self.t_write

        return {
            "ttfb": since_write(self.t_first),
            "body": since_write(self.t_body),
            "token": None if self.t_token is None or self.s_token is None else self.t_token - self.s_token,
            "first_token": since_write(self.t_token),
            "start_lag": None,
        }


def arrivals(start: float, stop: float, rate: float, poisson: bool, rng: random.Random,
             phase: float = 0.0) -> list[float]:
    """Scheduled start times in ``[start, stop)`` at ``rate`` per second: evenly spaced (offset by
    ``phase`` gaps) or a Poisson process."""
    if rate <= 0:
        return []
    if not poisson:  # computed, not accumulated: summing float gaps drifts
        count = math.ceil(round((stop - start) * rate - phase, 9))
        return [start + (i + phase) / rate for i in range(max(0, count))]
    times: list[float] = []
    t = start + rng.expovariate(rate)
    while t < stop:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _request(url: str, headers: dict[str, str], body: bytes) -> bytes:
    parts = urlsplit(url)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def generate(cfg: dict[str, Any]) -> dict[str, Any]:
    """The load generator: open-loop arrivals through the server and straight to the pacer."""
    loop = asyncio.get_running_loop()
    w0, w1, stop = cfg["w0"], cfg["w1"], cfg["stop"]
    rng = random.Random(cfg["seed"])
    chunks, gap = cfg["chunks"], cfg["gap"]
    late_start = time.monotonic() > cfg["t0"]
    targets = {
        "through": (cfg["url"], cfg["headers"], cfg["kind"]),
        "direct": (cfg["pacer"] + "/chat/completions",
                   {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}, "direct"),
    }
    schedule = [(t, "through") for t in arrivals(cfg["t0"], stop, cfg["rate"], cfg["poisson"], rng)]
    # The baseline's arrivals fall between the server's (half a gap later) when evenly spaced.
    schedule += [(t, "direct") for t in arrivals(cfg["t0"], stop, cfg["direct_rate"], cfg["poisson"], rng,
                                                 phase=0.5 * cfg["direct_rate"] / max(cfg["rate"], 1e-9))]
    counted: dict[str, list[tuple[float, Probe]]] = {"through": [], "direct": []}
    open_probes: set[Probe] = set()
    timer_lag = array("d")
    errors: Counter[str] = Counter()

    counted_open = [0]  # counted streams not yet closed
    counted_done = asyncio.Event()

    def closed(probe: Probe) -> None:
        open_probes.discard(probe)
        if probe.counted:
            counted_open[0] -= 1
            if not counted_open[0] and time.monotonic() >= w1:
                counted_done.set()

    async def start(index: int, path: str, scheduled: float) -> None:
        fired = time.monotonic()
        url, headers, kind = targets[path]
        prompt = f"{path} {index} [[pace chunks={chunks} gap={gap} first_delay=0]]"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        if kind == "direct":
            body.update(model="gpt-4o-mini", stream=True, stream_options={"include_usage": True})
        probe = Probe(_request(url, headers, orjson.dumps(body)), chunks, END_MARKERS[kind], closed)
        if w0 <= scheduled < w1:
            probe.counted = True
            counted_open[0] += 1
            counted[path].append((scheduled, probe))
            timer_lag.append(fired - scheduled)
        open_probes.add(probe)
        parts = urlsplit(url)
        try:
            await loop.create_connection(lambda: probe, parts.hostname, parts.port)
        except OSError as exc:
            probe.connection_lost(exc)
            if probe.counted:
                errors[f"{path}: {type(exc).__name__}"] += 1

    tasks: set[asyncio.Task[None]] = set()

    def fire(index: int, path: str, scheduled: float) -> None:
        task = loop.create_task(start(index, path, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for index, (when, path) in enumerate(sorted(schedule)):
        loop.call_at(when, fire, index, path, when)  # loop.time() is time.monotonic()
    loop_lag = array("d")
    cpu: dict[str, float] = {}
    loop.call_at(w0, lambda: cpu.__setitem__("w0", time.process_time()))
    loop.call_at(w1, lambda: cpu.__setitem__("w1", time.process_time()))

    async def ticker() -> None:
        interval = 0.01
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            if w0 <= loop.time() < w1:
                loop_lag.append(loop.time() - before - interval)

    tick = loop.create_task(ticker())
    # Every stream scheduled has been started by ``stop``; the counted ones get ``drain`` more
    # seconds to end, then whatever is still open is cut (and counted as incomplete).
    await asyncio.sleep(max(0.0, stop - time.monotonic()))
    if counted_open[0]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cfg["drain"]):
                await counted_done.wait()
    tick.cancel()
    for probe in list(open_probes):
        if probe.transport is not None:
            probe.transport.abort()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(tick, *tasks, return_exceptions=True)
    out: dict[str, Any] = {}
    for path, rows in counted.items():
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        status: Counter[str] = Counter()
        on_time = complete = 0
        for scheduled, probe in rows:
            times = probe.times()
            if probe.t_write is not None:
                times["start_lag"] = probe.t_write - scheduled
                on_time += probe.t_write - scheduled <= ON_TIME_S
            for metric, value in times.items():
                if value is not None:
                    values[metric].append(round(value, 7))
            complete += probe.complete
            if probe.status and probe.status != 200:
                status[f"{path}: HTTP {probe.status}"] += 1
            elif probe.error_event:
                status[f"{path}: error event"] += 1
            elif probe.t_write is not None and not probe.complete:
                status[f"{path}: incomplete"] += 1
        errors.update(status)
        out[path] = {"scheduled": len(rows), "on_time": on_time, "complete": complete, **values}
    return {
        **out,
        "errors": dict(errors),
        "late_start": late_start,
        "timer_lag": list(timer_lag),
        "loop_lag": list(loop_lag),
        "client_cpu_s": cpu.get("w1", 0.0) - cpu.get("w0", 0.0),
    }


# --------------------------------------------------------------------------- the driver side


def _percentile(values: Iterable[float], q: float) -> float | None:
    from bench.loadgen import percentile

    return percentile(list(values), q)


def added(through: list[float], direct: list[float], q: float) -> float | None:
    """``pq(through) - pq(direct)``: what the server adds at that percentile (None without samples)."""
    a, b = _percentile(through, q), _percentile(direct, q)
    return None if a is None or b is None else a - b


def _pooled(windows: list[dict[str, Any]], path: str, metric: str) -> list[float]:
    return [v for w in windows for v in w[path][metric]]


def summarize(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration, its windows' samples pooled (each against its own baseline
    streams, which ran in the same seconds)."""
    rows = []
    for config in dict.fromkeys(w["config"] for w in windows):
        mine = [w for w in windows if w["config"] == config]
        row: dict[str, Any] = {"config": config, "upstream": mine[0].get("upstream"), "windows": len(mine)}
        for path in ("through", "direct"):
            row[path] = {
                **{key: sum(w[path][key] for w in mine) for key in ("scheduled", "on_time", "complete")},
                **{metric: {q: _percentile(_pooled(mine, path, metric), p)
                            for q, p in (("p50", 0.5), ("p99", 0.99))} for metric in METRICS},
            }
        row["added"] = {metric: {q: added(_pooled(mine, "through", metric), _pooled(mine, "direct", metric), p)
                                 for q, p in (("p50", 0.5), ("p99", 0.99))} for metric in ("ttfb", "token",
                                                                                            "first_token")}
        scheduled = row["through"]["scheduled"]
        cpu = sum(w["server_cpu_s"] for w in mine)
        row["cpu_ms_per_stream"] = cpu / scheduled * 1e3 if scheduled else None
        row["new_streams_per_s"] = scheduled / sum(w["measure"] for w in mine)
        row["errors"] = dict(sum((Counter(w["errors"]) for w in mine), Counter()))
        row["timer_lag_p99"] = _percentile((v for w in mine for v in w["timer_lag"]), 0.99)
        row["loop_lag_p99"] = _percentile((v for w in mine for v in w["loop_lag"]), 0.99)
        row["client_cpu_share"] = sum(w["client_cpu_s"] for w in mine) / sum(w["measure"] for w in mine)
        row["other_load_cores"] = max(w["other_load_cores"] for w in mine)
        row["behind"] = [reason for w in mine for reason in w["behind"]]
        row["windows_behind"] = sum(1 for w in mine if w["behind"])
        rows.append(row)
    return rows


def baseline(windows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The direct streams' percentiles, all windows pooled."""
    return {metric: {"p50": _percentile(_pooled(windows, "direct", metric), 0.5),
                     "p99": _percentile(_pooled(windows, "direct", metric), 0.99)} for metric in METRICS}


def behind(result: dict[str, Any]) -> list[str]:
    """Why a window's load generator fell behind its schedule (empty: it kept up)."""
    reasons = []
    sent = result["through"]["scheduled"] + result["direct"]["scheduled"]
    on_time = result["through"]["on_time"] + result["direct"]["on_time"]
    if result["late_start"]:
        reasons.append("started after its first arrival")
    if sent and on_time / sent < VALID_ON_TIME:
        reasons.append(f"{1 - on_time / sent:.1%} of requests left > {ON_TIME_S * 1e3:g} ms late")
    lag = _percentile(result["loop_lag"], 0.99)
    if lag is not None and lag > VALID_LOOP_LAG_S:
        reasons.append(f"event-loop lag p99 {lag * 1e3:.1f} ms")
    return reasons


def window(name: str, server: Any, pacer: Any, all_pids: list[int], opts: Any, repeat: int) -> dict[str, Any]:
    """One measured window of configuration ``name`` (its server already running)."""
    from bench import procs

    stream_s = opts.ttfb_chunks * opts.gap
    t0 = time.monotonic() + 1.0
    w0 = t0 + 1.5 * stream_s + 0.5  # by then as many streams are open as there will be
    w1 = w0 + opts.ttfb_measure
    stop = w1 + stream_s + 0.2
    cfg = {"url": server.stream_url, "headers": server.stream_headers(),
           "kind": "floor" if server.kind == "floor" else "sse", "pacer": pacer.base_url,
           "rate": opts.ttfb_rate, "direct_rate": opts.ttfb_direct_rate, "poisson": opts.ttfb_arrivals == "poisson",
           "chunks": opts.ttfb_chunks, "gap": opts.gap, "t0": t0, "w0": w0, "w1": w1, "stop": stop, "drain": 5.0,
           "seed": opts.seed * 1000 + repeat}
    proc = subprocess.Popen([sys.executable, "-m", "bench.ttfb", json.dumps(cfg)], cwd=procs.ROOT,
                            env=procs._child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.pin(proc.pid, procs.LOAD_CPUS)
    foreign = procs.ForeignLoad([*all_pids, pacer.pid, proc.pid])
    procs.sleep_until(w0)
    cpu0 = procs.cpu_seconds(server.pid)
    foreign.start()
    procs.sleep_until(w1)
    cpu1 = procs.cpu_seconds(server.pid)
    other = foreign.stop()
    stdout, stderr = proc.communicate(timeout=stop - time.monotonic() + cfg["drain"] + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"ttfb load generator failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout)
    result.update(config=name, upstream=server.upstream_path, repeat=repeat, measure=opts.ttfb_measure,
                  server_cpu_s=cpu1 - cpu0, other_load_cores=other)
    result["behind"] = behind(result)
    return result


def run(opts: Any, pacer: Any, databases: Any, log: Callable[[str], None],
        quiet: Callable[[list[int]], None]) -> dict[str, Any]:
    """The part: every configuration's server started once, then measured in alternating rounds."""
    from bench import relay

    configs = opts.configs or DEFAULT_CONFIGS
    servers: dict[str, Any] = {}
    windows: list[dict[str, Any]] = []
    try:
        for name in configs:
            servers[name] = relay.start_server(name, pacer, databases)
        pids = [s.pid for s in servers.values()]
        for repeat in range(opts.ttfb_repeats):
            for name in configs if repeat % 2 == 0 else configs[::-1]:
                quiet([pacer.pid, *pids])
                log(f"ttfb: {name}, {opts.ttfb_rate:g} new streams/s ({opts.ttfb_arrivals}) of {opts.ttfb_chunks} "
                    f"chunks, {opts.ttfb_measure:g} s window (round {repeat + 1})")
                w = window(name, servers[name], pacer, pids, opts, repeat)
                windows.append(w)
                (row,) = summarize([w])
                log("  " + _line(row))
    finally:
        for server in servers.values():
            server.stop()
    return {"windows": windows, "rows": summarize(windows), "baseline": baseline(windows),
            "options": {"rate": opts.ttfb_rate, "direct_rate": opts.ttfb_direct_rate, "arrivals": opts.ttfb_arrivals,
                        "chunks": opts.ttfb_chunks, "chunk_rate": 1 / opts.gap, "measure": opts.ttfb_measure,
                        "repeats": opts.ttfb_repeats}}


def _ms(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 1e3:.{digits}f}"


def _pair(stats: dict[str, float | None], digits: int = 1) -> str:
    return f"{_ms(stats['p50'], digits)} / {_ms(stats['p99'], digits)}"


def _line(row: dict[str, Any]) -> str:
    t = row["through"]
    behind = f"; LOAD GENERATOR BEHIND: {'; '.join(row['behind'])}" if row["behind"] else ""
    return (f"ttfb p50/p99 {_pair(t['ttfb'])} ms (direct {_pair(row['direct']['ttfb'])}), first token added "
            f"{_pair(row['added']['token'])} ms, on time {t['on_time']}/{t['scheduled']}, complete "
            f"{t['complete']}/{t['scheduled']}, {row['cpu_ms_per_stream'] or 0:.2f} ms CPU/stream{behind}"
            + (f"; errors {row['errors']}" if row["errors"] else ""))


def table(part: dict[str, Any]) -> list[str]:
    """The report's tables: latency of a new stream, then what was sent and how well."""
    o = part["options"]
    rows = part["rows"]
    lines = [
        f"{o['rate']:g} new streams/s through the server ({o['arrivals']} arrivals, open loop), each "
        f"{o['chunks']} chunks at {o['chunk_rate']:g} chunks/s on a new connection, and {o['direct_rate']:g}/s "
        f"straight to the pacer in the same seconds (the baseline); {o['repeats']} × {o['measure']:g} s windows "
        "per configuration, interleaved. Milliseconds, p50 / p99; added = through − direct at that percentile.",
        "",
        "| configuration | first byte | first byte, added | first body bytes | first token: upstream → "
        "client, added | request → first token | … added | CPU ms per new stream (its chunks included) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = part["baseline"]
    lines.append(f"| pacer directly (the baseline, all windows) | {_pair(base['ttfb'])} | – | {_pair(base['body'])} | "
                 f"{_pair(base['token'])} (absolute) | {_pair(base['first_token'])} | – | – |")
    for r in rows:
        t, a = r["through"], r["added"]
        name = r["config"].replace("floor", "floor (bare aiohttp relay)") if r["config"].startswith("floor") \
            else f"chatproxy, {r['config']}"
        cpu = r["cpu_ms_per_stream"]
        lines.append(f"| {name} | {_pair(t['ttfb'])} | **{_pair(a['ttfb'])}** | {_pair(t['body'])} | "
                     f"**{_pair(a['token'])}** | {_pair(t['first_token'])} | {_pair(a['first_token'])} | "
                     f"{'–' if cpu is None else f'{cpu:.2f}'} |")
    lines += [
        "",
        f"The load itself (sent on time: the request left ≤ {ON_TIME_S * 1e3:g} ms after its scheduled time; a window "
        f"is valid when ≥ {VALID_ON_TIME:.0%} did and the generator's 10 ms ticker lagged ≤ "
        f"{VALID_LOOP_LAG_S * 1e3:g} ms at p99; where it fell behind, the latencies above are not valid: it sent "
        "late and read late; why, per window: the raw JSON's `behind`):",
        "",
        "| configuration | new streams/s | scheduled | sent on time | complete | direct: on time / complete | "
        "arrival timer lag p99 (ms) | generator loop lag p99 (ms) | generator CPU (cores) | other load (cores) | "
        "valid |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        t, d = r["through"], r["direct"]
        valid = "✅" if not r["windows_behind"] else f"❌ {r['windows_behind']}/{r['windows']} windows behind"
        lines.append(f"| {r['config']} | {r['new_streams_per_s']:.1f} | {t['scheduled']} | {t['on_time']} | "
                     f"{t['complete']} | {d['on_time']} / {d['complete']} of {d['scheduled']} | "
                     f"{_ms(r['timer_lag_p99'], 2)} | {_ms(r['loop_lag_p99'], 2)} | {r['client_cpu_share']:.2f} | "
                     f"{r['other_load_cores']:.2f} | {valid} |")
    for r in rows:
        if r["errors"]:
            lines.append(f"\nErrors, {r['config']}: {r['errors']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="the ttfb part's load generator (run by python -m bench)")
    parser.add_argument("config", help="JSON, as bench.ttfb.window builds it")
    cfg = json.loads(parser.parse_args().config)
    print(json.dumps(asyncio.run(generate(cfg))), flush=True)


if __name__ == "__main__":
    main()
