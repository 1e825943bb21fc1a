"""The end-of-session table: per server, endpoint and scenario, what the client measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.e2e.stack import NGINX_READ_TIMEOUT, ROOT, SLOW_FIRST_TOKEN, SLOW_MODEL, WORKER_TIMEOUTS

REPORT_PATH = ROOT / "test-artifacts" / "e2e-report.md"


@dataclass
class Row:
    server: str
    scenario: str
    transport: str
    status: int
    result: str  # "done", or what went wrong
    worst_silence: float
    total: float
    first_byte: float
    keepalives: int
    attempts: int  # upstream requests the simulator saw for this stream
    worker: str = ""  # which worker(s) nginx sent it to


ROWS: list[Row] = []


def record(row: Row) -> None:
    ROWS.append(row)


def render() -> str:
    timeouts = ", ".join(f"{k} {v}" for k, v in WORKER_TIMEOUTS.items())
    lines = [
        "# chatproxy behind nginx: end-to-end scenarios",
        "",
        f"nginx `proxy_read_timeout {NGINX_READ_TIMEOUT:g}s`, `proxy_buffering off`, HTTP/1.1, round robin over "
        "two workers sharing SQLite and Redis (`channels_redis`, Django's Redis cache).",
        f"Worker timeouts (`CHATPROXY_TIMEOUTS`): {timeouts}; model `{SLOW_MODEL}` runs under an admin "
        f"profile with FIRST_TOKEN {SLOW_FIRST_TOKEN:g}.",
        "",
        "*worst silence*: the longest time the client received nothing (time to the first byte included); "
        "*total*: request sent to last byte; *attempts*: upstream requests the simulator served for the stream; "
        "*worker*: where nginx sent it.",
        "",
        "| server | scenario | endpoint | status | result | worst silence (s) | total (s) | first byte (s) "
        "| keepalives | attempts | worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        lines.append(
            f"| {r.server} | {r.scenario} | {r.transport} | {r.status} | {r.result} | {r.worst_silence:.2f} "
            f"| {r.total:.2f} | {r.first_byte:.2f} | {r.keepalives} | {r.attempts} | {r.worker} |"
        )
    if ROWS:
        worst = max(ROWS, key=lambda r: r.worst_silence)
        lines += ["", f"Worst silence over all streams: {worst.worst_silence:.2f} s ({worst.server}, {worst.scenario}, "
                      f"{worst.transport}); nginx gives up after {NGINX_READ_TIMEOUT:g} s."]
    return "\n".join(lines) + "\n"


def write(path: Path = REPORT_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    return path
