"""Deterministic answer text.

Contract
--------
:func:`answer_tokens` returns the answer as a list of tokens, one word each, shaped like a real
model's stream: the first token has no leading space, every later token starts with one
(``["Quiet", " rivers", " carry", ...]``); sentences start with a capital letter and end with
``.``, ``!`` or ``?``; an occasional comma sits inside a sentence. The last token of an answer of
``n`` tokens always ends a sentence.

The tokens are a pure function of

* the conversation (role + text of every message, ``[[sim ...]]`` blocks removed, whitespace
  collapsed),
* the request's ``seed`` (``None`` is a value of its own),
* a ``salt`` (the server passes the attempt number only with the ``diverge`` directive, else 0),
* ``n``,
* an optional ``variant`` (JSON-able): the server passes the model name with the ``per_model``
  directive, the choice index for choices after the first (``n > 1``), and a tag for reasoning
  text. ``None`` (the default) leaves the material exactly as without it, so answers that do not
  ask for a variant never change.

For the same inputs but a smaller ``n'`` the first ``n' - 1`` tokens are the same: only the last
token's punctuation is forced. ``max_tokens`` truncation therefore uses ``tokens[:max_tokens]`` of
the full answer, which is what a real model cut at ``length`` looks like.

A stdlib :class:`random.Random` seeded from a sha256 keeps this stable across Python versions and
processes (``hash()`` is salted per process and must not be used here).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .faults import strip_directives

__all__ = [
    "WORDS",
    "answer_tokens",
    "content_text",
    "continuation_tokens",
    "conversation_key",
    "rng_for",
    "word_tokens",
]

WORDS: tuple[str, ...] = tuple(
    """
    the a stream of tokens flows through quiet network while every server keeps its promise and
    clients wait for answers that arrive in small pieces like rain on warm stone rivers carry light
    across old valleys where patient engineers measure time between each chunk so nothing stalls
    without notice when silence grows too long the proxy tries again with fresh connection and
    gentle backoff users never see raw errors only calm text that keeps moving forward model
    writes careful sentences about gardens mountains harbours lanterns bridges clocks letters maps
    orchards windows trains music paper stars morning evening simple clear bright steady honest
    small large green blue golden silver distant nearby soft loud slow fast
    """.split()
)

_END = (".", ".", ".", ".", ".", ".", "!", "?")


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, ``None``, or a list of content parts.

    Only ``{"type": "text", "text": ...}`` parts (and bare strings) contribute; images and the like
    are ignored, as they would not change a text-only simulator's answer.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
        return "\n".join(pieces)
    return str(content)


def conversation_key(messages: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """``[[role, stripped text], ...]``: the part of the conversation the answer depends on."""
    return [[str(m.get("role", "")), strip_directives(content_text(m.get("content")))] for m in messages]


def rng_for(messages: Iterable[Mapping[str, Any]], seed: Any, salt: int, variant: Any = None) -> random.Random:
    """A :class:`random.Random` that is a pure function of its arguments (see the contract)."""
    key: dict[str, Any] = {"messages": conversation_key(messages), "seed": seed, "salt": salt}
    if variant is not None:
        key["variant"] = variant
    material = json.dumps(
        key,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return random.Random(int.from_bytes(hashlib.sha256(material.encode("utf-8")).digest(), "big"))


def answer_tokens(
    messages: Sequence[Mapping[str, Any]],
    seed: Any = None,
    salt: int = 0,
    n: int = 20,
    *,
    variant: Any = None,
) -> list[str]:
    """The answer to ``messages`` as ``n`` word tokens (see the module contract)."""
    return word_tokens(rng_for(messages, seed, salt, variant), n)


def word_tokens(rng: random.Random, n: int) -> list[str]:
    """``n`` word tokens drawn from ``rng``, shaped as described in the module contract."""
    tokens: list[str] = []
    remaining_in_sentence = 0
    for i in range(n):
        if remaining_in_sentence == 0:
            remaining_in_sentence = rng.randint(5, 13)
            word = rng.choice(WORDS).capitalize()
        else:
            word = rng.choice(WORDS)
        remaining_in_sentence -= 1
        if remaining_in_sentence == 0:
            word += rng.choice(_END)
        elif remaining_in_sentence > 2 and rng.random() < 0.08:
            word += ","
        if i == n - 1 and remaining_in_sentence != 0:
            # The answer must not stop mid-sentence; strip a comma before ending it.
            word = word.rstrip(",") + "."
        tokens.append(word if i == 0 else " " + word)
    return tokens


def continuation_tokens(full: Sequence[str], partial: str) -> list[str] | None:
    """The tokens to stream when continuing ``partial``, or ``None`` if it is not a prefix.

    ``full`` is the complete answer for the conversation without the trailing assistant message.
    If ``"".join(full)`` starts with ``partial`` (and ``partial`` has some non-space text), the
    result starts with the token containing the partial's last non-space character, repeated, and
    goes on to the end: real models overlap the text they are asked to continue, and chatproxy
    deduplicates that overlap. The overlap is always a suffix of ``partial`` and a prefix of the
    result.
    """
    text = "".join(full)
    stripped = partial.rstrip()
    if not stripped or not text.startswith(partial):
        return None
    last_char = len(stripped) - 1
    start = 0
    for index, token in enumerate(full):
        if start + len(token) > last_char:
            return list(full[index:])
        start += len(token)
    return None  # unreachable: partial is a prefix of text, so some token covers last_char
