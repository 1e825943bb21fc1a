"""Joining a retry's text onto the answer the consumer already has (``ON_PARTIAL``).

* ``restart``: the new attempt starts from scratch. Its text is held back while it equals what was
  already sent; once it goes past that, streaming just continues (no ``reset``). If it diverges
  (or ends inside the old text), the answer is reset and the new text so far is sent; a transport
  that cannot express a reset gets :class:`Diverged` instead.
* ``continue``: the upstream was asked to continue the partial text (a prefilled assistant
  message); an overlap at the join is removed. Only a plain-text answer is continued: one with a
  tool call (or reasoning, a refusal ...) sent is restarted, since half a call's arguments cannot
  be handed back to the model.

A structured answer (:mod:`chatproxy.stream.answer`) is matched the same way, unit by unit: what
was sent is a sequence of *segments* (the units with consecutive pieces of one channel joined; a
tool call's head is a segment of its own and must come back equal, id and name). The restart's
units are held back while each reproduces the next stretch of a segment, in the same order; the
last segment may be exceeded, and then its rest and everything after goes on as usual. So a
restarted tool call is the whole call again, matched from its head, never arguments spliced onto
an earlier attempt's. A plain-text answer that meets a structured restart becomes one segment.
"""

from __future__ import annotations

from typing import Any

from chatproxy.stream.answer import CALL, TEXT, Answer, Channel, Unit, units_of


class Diverged(Exception):
    """A restart diverged from what was sent and the transport cannot express ``reset``."""


class Joiner:
    """Feeds one retry attempt's chunks onto ``answer``; ``mode`` is ``"restart"`` or ``"continue"``."""

    __slots__ = ("_allow_reset", "_answer", "held", "joined", "matched", "mode", "prefix", "segment", "segments")

    # A continuation's overlap is looked for in the first this-many characters.
    OVERLAP_WINDOW = 64

    def __init__(self, answer: Answer, mode: str, *, allow_reset: bool) -> None:
        self._answer = answer
        self._allow_reset = allow_reset
        self.mode = mode
        self.prefix = answer.text()
        self.matched = 0  # restart: characters of prefix the new attempt reproduced
        self.held: list[str] = []  # continue: text held until the overlap is known
        self.joined = False  # past the join: plain pass-through
        # Restart of a structured answer: (channel, text) segments, the one being matched, and
        # ``matched`` counts its characters reproduced so far.
        self.segments: list[tuple[Channel, str]] | None = None
        self.segment = 0
        if answer.units is not None and mode == "restart":
            self.segments = _segments(answer.units)

    def feed(self, text: str) -> None:
        if self.joined:
            self._answer.add(text)
        elif self.segments is not None:
            self._feed_unit(TEXT, text, None)
        elif self.mode == "restart":
            self._feed_restart(text)
        else:
            self.held.append(text)
            if sum(map(len, self.held)) >= min(self.OVERLAP_WINDOW, len(self.prefix)):
                self._join_continuation()

    def feed_choices(self, choices: list[Any]) -> None:
        """Feed everything one chunk's ``choices`` carry."""
        answer = self._answer
        for channel, text, logprobs in units_of(choices, answer.finish_reasons):
            if self.joined:
                answer.put(channel, text, logprobs)
            elif self.mode == "continue":
                self._join_continuation()
                answer.put(channel, text, logprobs)
            else:
                if self.segments is None:  # the plain-text prefix becomes one segment
                    self.segments = [(TEXT, self.prefix)] if self.prefix else []
                self._feed_unit(channel, text, logprobs)

    def end(self) -> None:
        """The attempt ended normally."""
        if self.joined:
            return
        if self.segments is not None:
            self._diverge_units([])
            return
        if self.mode == "restart":
            # The new answer stopped inside the old one: it is shorter, so it diverged.
            self._diverge(self.prefix[: self.matched])
        else:
            self._join_continuation()

    def _feed_restart(self, text: str) -> None:
        prefix, matched = self.prefix, self.matched
        rest = len(prefix) - matched
        if len(text) <= rest:
            if prefix.startswith(text, matched):
                self.matched = matched + len(text)
                if self.matched == len(prefix):
                    self.joined = True
                return
        elif prefix.startswith(text[:rest], matched):
            self.joined = True
            self._answer.add(text[rest:])
            return
        self._diverge(prefix[:matched] + text)

    def _feed_unit(self, channel: Channel, text: str, logprobs: Any) -> None:
        segments = self.segments
        assert segments is not None
        last = len(segments) - 1
        # Past a fully reproduced segment, a unit of another channel belongs to the next one.
        while self.segment < last and channel != segments[self.segment][0] \
                and self.matched == len(segments[self.segment][1]):
            self.segment += 1
            self.matched = 0
        if self.segment > last:  # nothing was sent (cannot happen after partial output)
            self.joined = True
            self._answer.put(channel, text, logprobs)
            return
        seg_channel, seg_text = segments[self.segment]
        matched = self.matched
        if channel != seg_channel:
            self._diverge_units([(channel, text, logprobs)])
        elif channel[0] == CALL:  # a call's head comes back whole and equal, or it is another call
            if text != seg_text or matched:
                self._diverge_units([(channel, text, logprobs)])
            else:
                self._advance(len(text), last)
        elif len(text) <= len(seg_text) - matched:
            if seg_text.startswith(text, matched):
                self._advance(matched + len(text), last)
            else:
                self._diverge_units([(channel, text, logprobs)])
        else:
            rest = len(seg_text) - matched
            if self.segment == last and seg_text.startswith(text[:rest], matched):
                self.joined = True
                self._answer.put(channel, text[rest:], logprobs)
            else:
                self._diverge_units([(channel, text, logprobs)])

    def _advance(self, matched: int, last: int) -> None:
        self.matched = matched
        if self.segment == last and matched == len(self.segments[last][1]):  # type: ignore[index]
            self.joined = True

    def _diverge_units(self, new: list[Unit]) -> None:
        """The restart differs: reset, then send what it reproduced so far and ``new``."""
        if not self._allow_reset:
            raise Diverged()
        segments = self.segments or []
        so_far: list[Unit] = [(channel, text, None) for channel, text in segments[: self.segment]]
        if self.segment < len(segments) and self.matched:
            channel, text = segments[self.segment]
            so_far.append((channel, text[: self.matched], None))
        answer = self._answer
        answer.reset("diverged")
        self.joined = True
        for channel, text, logprobs in so_far + new:
            if text:
                answer.put(channel, text, logprobs)

    def _diverge(self, new_text: str) -> None:
        if not self._allow_reset:
            raise Diverged()
        self._answer.reset("diverged")
        self.joined = True
        if new_text:
            self._answer.add(new_text)

    def _join_continuation(self) -> None:
        self.joined = True
        text = "".join(self.held)
        self.held = []
        text = text[overlap(self.prefix, text) :]
        if text:
            self._answer.add(text)


def _segments(units: list[Unit]) -> list[tuple[Channel, str]]:
    """``units`` with consecutive pieces of one channel joined (a call's head stays alone)."""
    segments: list[tuple[Channel, list[str]]] = []
    for channel, text, _ in units:
        if segments and segments[-1][0] == channel and channel[0] != CALL:
            segments[-1][1].append(text)
        else:
            segments.append((channel, [text]))
    return [(channel, "".join(texts)) for channel, texts in segments]


def overlap(before: str, after: str) -> int:
    """Length of the longest start of ``after`` that ``before`` ends with, at a word boundary.

    Models asked to continue often repeat the last word or two; a one-letter coincidence
    ("th" + "he ...") must not eat text, so the overlap has to start where a word starts in
    ``before`` and be at least two characters long.
    """
    for size in range(min(len(before), len(after)), 1, -1):
        if before.endswith(after[:size]):
            start = len(before) - size
            if start == 0 or before[start - 1].isspace() or after[0].isspace():
                return size
    return 0
