"""``python manage.py chatproxy_probe [--model M] [-n N]``: measure the upstream, suggest timeouts.

Sends ``N`` short streamed requests straight to the configured upstream (``CHATPROXY["UPSTREAM"]``,
no retries, no chatproxy timeouts but ``--timeout``: a probe must see the slow tail that
timeouts would cut), then prints the measured distributions and the profile values they suggest,
computed exactly as the admin statistics page computes them (:mod:`chatproxy.records`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatproxy import records
from chatproxy.conf import Policy, get_config, upstream_api_key
from chatproxy.errors import ConfigurationError, UpstreamError
from chatproxy.profiles import resolve_policy
from chatproxy.upstream import build_upstream
from chatproxy.upstream.base import Upstream, UpstreamRequest

PROMPT = "In one short sentence: why is the sea salty?"


class Command(BaseCommand):
    help = "Send N short requests to the configured upstream and print the timeouts they suggest."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--model", help="model to probe (default: CHATPROXY['UPSTREAM']['MODEL'])")
        parser.add_argument("-n", type=int, default=20, help="number of requests (default 20)")
        parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
        parser.add_argument("--timeout", type=float, default=120.0,
                            help="seconds one request may take before it counts as failed (default 120)")
        parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
        parser.add_argument("--prompt", default=PROMPT, help="the user message to send")

    def handle(self, *args: Any, **options: Any) -> None:
        count, concurrency, timeout = options["n"], options["concurrency"], options["timeout"]
        if count < 1 or concurrency < 1 or timeout <= 0:
            raise CommandError("-n and --concurrency must be at least 1, --timeout positive.")
        upstream_conf = get_config()["UPSTREAM"]
        model = options["model"] or upstream_conf["MODEL"]
        policy = resolve_policy(model)
        request = UpstreamRequest(
            model=model,
            messages=[{"role": "user", "content": options["prompt"]}],
            params={"max_tokens": options["max_tokens"]},
            extra_body=upstream_conf["EXTRA_BODY"] or {},
            connect_timeout=policy.connect,
            read_timeout=timeout,
            total_timeout=timeout,
        )
        try:
            results = asyncio.run(_probe(request, count, concurrency, timeout))
        except ConfigurationError as exc:
            raise CommandError(f"The upstream is not usable: {exc}") from None
        where = upstream_conf["BASE_URL"] or "the SDK's default endpoint"
        self.stdout.write(f"Probed {model} at {where}: {count} request(s), concurrency {concurrency}.")
        self._report(results, policy, model)

    def _report(self, results: list[records.Sample | str], policy: Policy, model: str) -> None:
        samples = [r for r in results if isinstance(r, records.Sample)]
        failures = [r for r in results if isinstance(r, str)]
        self.stdout.write(f"{len(samples)} completed, {len(failures)} failed"
                          + (f" ({', '.join(sorted(set(failures)))})" if failures else "") + ".\n")
        if not samples:
            raise CommandError("No request completed: nothing to measure.")
        rows = [
            ("time to first token", [s.time_to_first_token for s in samples if s.time_to_first_token is not None]),
            ("longest gap", [s.longest_gap for s in samples]),
            ("duration", [s.duration for s in samples]),
        ]
        self.stdout.write(f"{'':<22}{'p50':>10}{'p95':>10}{'max':>10}{'n':>6}")
        for label, values in rows:
            dist = records.Distribution.of(values)
            cells = "".join(f"{_seconds(v):>10}" for v in (dist.p50, dist.p95, dist.max))
            self.stdout.write(f"{label:<22}{cells}{dist.count:>6}")

        suggestion = records.suggest(samples, policy, min_samples=1)
        assert suggestion is not None
        where = f"profile {policy.profile!r}" if policy.profile != "settings" else "CHATPROXY settings"
        self.stdout.write(f"\nSuggested profile values ({where} applies to {model} now):")
        self.stdout.write(f"{'field':<22}{'now':>10}{'suggested':>12}   formula")
        formulas = dict(records.FORMULAS)
        changes = suggestion.changes(policy)
        for name, attr in records.SUGGESTED_FIELDS.items():
            mark = " *" if name in changes else "  "
            self.stdout.write(f"{name:<22}{getattr(policy, attr):>10g}{getattr(suggestion, name):>12g}{mark} "
                              f"{formulas[name]}")
        if len(samples) < records.MIN_SAMPLES:
            self.stdout.write(f"\nOnly {len(samples)} sample(s): treat this as a rough guide "
                              f"(the admin suggests from {records.MIN_SAMPLES} streams on).")
        if changes:
            self.stdout.write("\n* differs from now. Apply it in the admin: Timeout profiles, or the statistics "
                              "page of Stream records.")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}s"


async def _probe(
    request: UpstreamRequest, count: int, concurrency: int, limit: float
) -> list[records.Sample | str]:
    conf = get_config()["UPSTREAM"]
    upstream = build_upstream(sdk=conf["SDK"], http_client=conf["HTTP_CLIENT"], base_url=conf["BASE_URL"],
                              api_key=upstream_api_key())
    gate = asyncio.Semaphore(concurrency)

    async def one() -> records.Sample | str:
        async with gate:
            return await _measure(upstream, request, limit)

    try:
        return list(await asyncio.gather(*(one() for _ in range(count))))
    finally:
        await upstream.aclose()


async def _measure(upstream: Upstream, request: UpstreamRequest, limit: float) -> records.Sample | str:
    """One request: a Sample, or a short failure reason."""
    started = time.monotonic()
    first = last = None
    gap = 0.0
    stream = None
    try:
        async with asyncio.timeout(limit):
            stream = await upstream.open(request)
            async for _text in stream:
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    gap = max(gap, now - last)  # type: ignore[operator]
                last = now
    except TimeoutError:
        return "timeout"
    except UpstreamError as exc:
        status = getattr(exc, "status", None)
        return f"HTTP {status}" if status else exc.reason
    finally:
        if stream is not None:
            await stream.aclose()
    return records.Sample(None if first is None else first - started, gap, time.monotonic() - started)
