"""The answer as the consumer has it: the text sent since the last reset."""

from __future__ import annotations

from chatproxy.stream.events import EventLog
from chatproxy.stream.values import StreamStats


class Answer:
    """Sends text to the consumer (``delta`` events) and remembers it, for joining a retry onto it."""

    __slots__ = ("_log", "_parts", "_started_at", "_stats", "length")

    def __init__(self, log: EventLog, stats: StreamStats, started_at: float) -> None:
        self._log = log
        self._stats = stats
        self._started_at = started_at
        self._parts: list[str] = []
        self.length = 0  # characters sent since the last reset

    def add(self, text: str) -> None:
        """Send ``text`` on."""
        self._parts.append(text)
        self.length += len(text)
        if self._stats.time_to_first_token is None:
            self._stats.time_to_first_token = self._log.loop.time() - self._started_at
        self._log.emit("delta", {"text": text})

    def text(self) -> str:
        """Everything sent since the last reset."""
        return "".join(self._parts)

    def reset(self, reason: str) -> None:
        """Tell the consumer to discard what it has (``reset`` event) and start over empty."""
        self._log.emit("reset", {"reason": reason})
        self._parts = []
        self.length = 0
