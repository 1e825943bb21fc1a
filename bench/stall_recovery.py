"""Stall recovery as a user sees it: the gap between the last delta before a mid-stream stall and
the first delta after it, over N runs, through whichever openai SDK this virtualenv has.

    python bench/stall_recovery.py [-n 20] [--stall 1.0] [--http-client httpx|aiohttp]

Prints p50 / p95 / max of the gap and of the gap minus STALL (detection + backoff + new attempt).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatproxy.conf import Policy
from chatproxy.core import ChatRequest, ChatStream
from chatproxy.simulator.process import SimulatorProcess
from chatproxy.upstream import build_upstream, detect_sdk


async def one_run(upstream, policy: Policy, index: int) -> float:
    request = ChatRequest(
        model="gpt-4o-mini",
        messages=[
            {"role": "user", "content": f"bench {index} [[sim chunks=30 gap=0.02 stall_after=10 stall=60 times=1]]"}
        ],
    )
    loop = asyncio.get_running_loop()
    stream = ChatStream(upstream, request, policy).start()
    last_delta = None
    gap = None
    retried = False
    async for event in stream:
        if event.name == "retry":
            retried = True
        elif event.name == "delta":
            now = loop.time()
            if retried and gap is None:
                gap = now - last_delta
            last_delta = now
    await stream.aclose()
    assert gap is not None, "the stall was not recovered"
    return gap


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):.3f} s  p95 {p95:.3f} s  max {ordered[-1]:.3f} s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--stall", type=float, default=1.0)
    parser.add_argument("--http-client", default="httpx")
    args = parser.parse_args()
    policy = Policy(stall=args.stall, first_token=5.0, deadline=60.0, backoff_initial=0.25, backoff_max=4.0)
    with SimulatorProcess(quiet=True) as sim:
        upstream = build_upstream(sdk=detect_sdk() or "none", http_client=args.http_client, base_url=sim.base_url,
                                  api_key="sk-bench")
        try:
            gaps = [await one_run(upstream, policy, i) for i in range(args.n)]
        finally:
            await upstream.aclose()
    sdk = detect_sdk()
    label = f"{sdk}/{args.http_client}" if sdk == "current" else sdk
    print(f"stall recovery, {label}, STALL={args.stall}s, n={args.n}")
    print(f"  user-visible gap:          {summary(gaps)}")
    print(f"  gap - STALL (recovery):    {summary([g - args.stall for g in gaps])}")


if __name__ == "__main__":
    asyncio.run(main())
