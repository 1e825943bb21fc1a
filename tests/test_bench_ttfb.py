"""The ttfb benchmark's measuring code: its HTTP/SSE client, the percentile arithmetic, and its
open-loop generator against the real pacer on loopback."""

from __future__ import annotations

import itertools
import random
import time

from aiohttp import web

from bench import pacer, ttfb


def _chunked(*pieces: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


BODY = [b": open\nretry: 3000\n\n", b'event: delta\ndata: {"text": " a~100.250000"}\n\n',
        b'event: delta\ndata: {"text": " b~100.300000"}\n\n', b"event: done\ndata: {}\n\n"]


def test_probe_times_and_completion_whatever_the_read_boundaries() -> None:
    response = _chunked(*BODY)
    first_token_done = response.index(b"a~100.250000") + len(b"a~100.250000\"}\n\n\r\n")
    for cut in range(1, len(response)):
        probe = ttfb.Probe(b"", expected=2, end_marker=b"event: done")
        probe.t_write = 1.0
        probe.feed(response[:cut], 2.0)
        probe.feed(response[cut:], 3.0)
        assert probe.complete, cut
        assert (probe.status, probe.tokens, probe.t_first, probe.s_token) == (200, 2, 2.0, 100.25)
        # A token arrives when its whole HTTP chunk (and its CRLF) is in.
        assert probe.t_token == (2.0 if cut >= first_token_done else 3.0), cut
        times = probe.times()
        assert times["ttfb"] == 1.0 and times["first_token"] == probe.t_token - 1.0
        assert times["token"] == probe.t_token - 100.25


def test_probe_byte_by_byte_and_what_is_not_complete() -> None:
    probe = ttfb.Probe(b"", expected=2, end_marker=b"event: done")
    for i, byte in enumerate(_chunked(*BODY)):
        probe.feed(bytes([byte]), float(i))
    assert probe.complete and probe.tokens == 2

    cut_short = ttfb.Probe(b"", expected=2, end_marker=b"event: done")
    cut_short.feed(_chunked(*BODY[:2]), 1.0)  # ends properly, one token, no done event
    assert cut_short.ended and not cut_short.complete

    failed = ttfb.Probe(b"", expected=1, end_marker=b"event: done")
    failed.feed(_chunked(BODY[1], b'event: error\ndata: {"code": "x"}\n\n', BODY[3]), 1.0)
    assert failed.error_event and not failed.complete

    refused = ttfb.Probe(b"", expected=1, end_marker=None)
    refused.feed(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}", 1.0)
    assert refused.ended and refused.status == 429 and not refused.complete and refused.t_token is None


def test_added_latency_is_the_difference_of_percentiles() -> None:
    direct = [i / 1000 for i in range(101)]  # p50 50 ms, p99 99 ms (nearest rank)
    through = [2 * v for v in reversed(direct)]
    assert round(ttfb.added(through, direct, 0.5) or 0, 9) == 0.050
    assert round(ttfb.added(through, direct, 0.99) or 0, 9) == 0.099
    assert ttfb.added([], direct, 0.5) is None


def _window(config: str, through: list[float], direct: list[float], on_time: int = 10) -> dict[str, object]:
    def path(values: list[float], on_time: int) -> dict[str, object]:
        return {"scheduled": 10, "on_time": on_time, "complete": 10, **{m: values for m in ttfb.METRICS}}

    result = {"config": config, "through": path(through, on_time), "direct": path(direct, 10), "errors": {},
              "late_start": False, "timer_lag": [0.001], "loop_lag": [0.001], "client_cpu_s": 0.1,
              "server_cpu_s": 0.05, "measure": 1.0, "other_load_cores": 0.0}
    result["behind"] = ttfb.behind(result)
    return result


def test_summary_pools_windows_against_their_own_baselines_and_flags_a_late_generator() -> None:
    windows = [_window("a", [0.010] * 10, [0.002] * 10), _window("b", [0.020] * 10, [0.004] * 10, on_time=5),
               _window("a", [0.010] * 9 + [0.030], [0.002] * 10)]
    a, b = ttfb.summarize(windows)
    assert (a["windows"], a["through"]["scheduled"], a["windows_behind"]) == (2, 20, 0)
    assert round(a["added"]["ttfb"]["p50"], 9) == 0.008 and round(a["added"]["ttfb"]["p99"], 9) == 0.028
    assert round(a["cpu_ms_per_stream"], 9) == 5.0  # 0.1 s of server CPU over 20 new streams
    assert round(b["added"]["ttfb"]["p50"], 9) == 0.016
    assert b["windows_behind"] == 1 and "25.0% of requests left" in b["behind"][0]  # 5 of 20 requests late


def test_arrivals_even_and_poisson() -> None:
    even = ttfb.arrivals(10.0, 11.0, 50.0, False, random.Random(1))
    assert len(even) == 50 and all(round(b - a, 9) == 0.02 for a, b in itertools.pairwise(even))
    poisson = ttfb.arrivals(0.0, 100.0, 50.0, True, random.Random(1))
    assert 4700 < len(poisson) < 5300 and poisson == sorted(poisson)


async def test_generator_against_the_pacer(unused_tcp_port: int) -> None:
    runner = web.AppRunner(pacer.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        base = f"http://127.0.0.1:{unused_tcp_port}/v1"
        t0 = time.monotonic() + 0.05
        cfg = {"url": base + "/chat/completions", "headers": {"Content-Type": "application/json"}, "kind": "direct",
               "pacer": base, "rate": 40.0, "direct_rate": 20.0, "poisson": False, "chunks": 3, "gap": 0.01,
               "t0": t0, "w0": t0 + 0.1, "w1": t0 + 0.35, "stop": t0 + 0.4, "drain": 3.0, "seed": 1}
        out = await ttfb.generate(cfg)
    finally:
        await runner.cleanup()
    assert out["errors"] == {}
    assert (out["through"]["scheduled"], out["direct"]["scheduled"]) == (10, 5)
    assert out["through"]["complete"] == 10 and out["direct"]["complete"] == 5
    through = out["through"]
    assert len(through["ttfb"]) == len(through["first_token"]) == 10
    # The first token leaves one gap after the role chunk: request -> first token is at least that.
    assert min(through["first_token"]) >= 0.01
    assert all(0 < byte <= first for byte, first in zip(through["ttfb"], through["first_token"], strict=True))
    assert all(0 <= t < 1.0 for t in through["token"])
