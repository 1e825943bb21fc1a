"""Joining a retry's text onto the answer the consumer already has (``ON_PARTIAL``).

* ``restart``: the new attempt starts from scratch. Its text is held back while it equals what was
  already sent; once it goes past that, streaming just continues (no ``reset``). If it diverges
  (or ends inside the old text), the answer is reset and the new text so far is sent; a transport
  that cannot express a reset gets :class:`Diverged` instead.
* ``continue``: the upstream was asked to continue the partial text (a prefilled assistant
  message); an overlap at the join is removed.
"""

from __future__ import annotations

from chatproxy.stream.answer import Answer


class Diverged(Exception):
    """A restart diverged from what was sent and the transport cannot express ``reset``."""


class Joiner:
    """Feeds one retry attempt's chunks onto ``answer``; ``mode`` is ``"restart"`` or ``"continue"``."""

    __slots__ = ("_allow_reset", "_answer", "held", "joined", "matched", "mode", "prefix")

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

    def feed(self, text: str) -> None:
        if self.joined:
            self._answer.add(text)
        elif self.mode == "restart":
            self._feed_restart(text)
        else:
            self.held.append(text)
            if sum(map(len, self.held)) >= min(self.OVERLAP_WINDOW, len(self.prefix)):
                self._join_continuation()

    def end(self) -> None:
        """The attempt ended normally."""
        if self.joined:
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
