"""The baseline of the problem: a mid-stream stall and a long healthy answer, read with an openai SDK
alone (no chatproxy), times scaled down by ``--scale``.

    python -m bench.stall_sdk --base-url http://127.0.0.1:PORT/v1 [--scale 60] [--runs 3]

Runs with whichever openai generation this interpreter has (prints one JSON line):

* openai 0.27 (``ChatCompletion.acreate(stream=True)``): ``request_timeout`` becomes aiohttp
  ``ClientTimeout(total=...)`` over the whole streamed body. Settings: the default (``TIMEOUT_SECS``
  = 600 s, scaled by patching ``openai.api_requestor.TIMEOUT_SECS``) and ``request_timeout=(10,
  300)`` (scaled: ``(10/scale, 300/scale)``).
* openai >= 1 (``AsyncOpenAI``): the default ``Timeout(600, connect=5)`` (scaled), where 600 s is
  the per-read timeout, and the SDK never retries once the body has started.

Scenarios, against the chatproxy simulator: ``stall``: 40 chunks 0.05 s apart with a stall
(3600 s) after 10; ``long``: a healthy answer of 120 chunks 0.05 s apart (6 s, i.e. 6 min at
scale 60). Each run records its chunk times and how it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import time
from typing import Any

STALL = "[[sim chunks=40 gap=0.05 stall_after=10 stall=3600]]"
LONG = "[[sim chunks=120 gap=0.05]]"


async def legacy_run(prompt: str, request_timeout: Any) -> dict[str, Any]:
    import openai

    started = time.monotonic()
    times: list[float] = []
    outcome = "complete"
    gen = None
    try:
        gen = await openai.ChatCompletion.acreate(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True,
            request_timeout=request_timeout, api_key="sk-bench", api_base=BASE_URL,
        )
        async for chunk in gen:
            choices = chunk.get("choices")
            if choices and (choices[0].get("delta") or {}).get("content"):
                times.append(time.monotonic())
    except BaseException as exc:
        outcome = type(exc).__name__
    finally:
        if gen is not None:
            await gen.aclose()
    return {"started": started, "chunks": times, "ended": time.monotonic(), "outcome": outcome}


async def current_run(prompt: str, client: Any) -> dict[str, Any]:
    started = time.monotonic()
    times: list[float] = []
    outcome = "complete"
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True)
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.monotonic())
    except BaseException as exc:
        outcome = type(exc).__name__
    return {"started": started, "chunks": times, "ended": time.monotonic(), "outcome": outcome}


BASE_URL = ""


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    global BASE_URL
    BASE_URL = args.base_url
    version = importlib.metadata.version("openai")
    scale = args.scale
    jobs: dict[str, Any] = {}
    if version.startswith("0."):
        import openai.api_requestor

        openai.api_requestor.TIMEOUT_SECS = 600 / scale  # the default total, scaled
        settings = {
            "default": (None, f"request_timeout default (600 s → {600 / scale:g} s)"),
            "tuple": ((10 / scale, 300 / scale), f"request_timeout=(10, 300) → ({10 / scale:.3g}, {300 / scale:g}) s"),
        }
        for key, (timeout, _) in settings.items():
            for i in range(args.runs):
                jobs[f"{key}/stall/{i}"] = legacy_run(f"baseline {key} {i} {STALL}", timeout)
            jobs[f"{key}/long/0"] = legacy_run(f"baseline {key} long {LONG}", timeout)
        labels = {key: label for key, (_, label) in settings.items()}
        sdk = f"openai {version}"
    else:
        import openai

        client = openai.AsyncOpenAI(base_url=BASE_URL, api_key="sk-bench",
                                    timeout=openai.Timeout(600 / scale, connect=5 / scale))
        for i in range(args.runs):
            jobs[f"default/stall/{i}"] = current_run(f"baseline current {i} {STALL}", client)
        jobs["default/long/0"] = current_run(f"baseline current long {LONG}", client)
        labels = {"default": f"default Timeout(600, connect=5) → read {600 / scale:g} s"}
        sdk = f"openai {version}"
    results = await asyncio.gather(*jobs.values())
    return {"sdk": sdk, "scale": scale, "labels": labels, "runs": dict(zip(jobs, results, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--scale", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
