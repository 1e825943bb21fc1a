"""Which targets a request may fall back to: ``FALLBACKS``, the admin profile's ``fallbacks``, ``UPSTREAMS``.

A fallback *target* is written ``"model"`` (a model on the same upstream as the request) or
``"upstream:model"`` (a model on the upstream ``UPSTREAMS`` names; ``"default:model"`` is
``UPSTREAM``). A prefix that names no configured upstream is part of the model name
(``"llama3:8b"``), as system check ``chatproxy.W006`` points out.

The targets for a request to ``model`` (:func:`chain`): the ``fallbacks`` of the admin profile that
applies to the model when it lists any (one target per line), else the list of the most specific
``FALLBACKS`` glob matching the model (the same specificity rules as profiles), else none. The
request's own target and repeats are left out. Each fallback target's attempts run under the
profile of its own model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatproxy.conf import get_config
from chatproxy.policy import Policy
from chatproxy.profiles import specificity
from chatproxy.stream.values import DEFAULT_UPSTREAM

#: The most fallback targets one model may list.
MAX_TARGETS = 10  # as many as a profile may list (models.MAX_FALLBACKS)


@dataclass(frozen=True, slots=True)
class TargetName:
    """A parsed fallback target: ``upstream`` (``"default"`` or a ``UPSTREAMS`` key) and ``model``."""

    upstream: str
    model: str

    @property
    def label(self) -> str:
        """How the ``retry`` event's ``fallback`` field writes it."""
        return self.model if self.upstream == DEFAULT_UPSTREAM else f"{self.upstream}:{self.model}"


def upstream_names() -> frozenset[str]:
    """The configured upstream names: ``"default"`` and the keys of ``UPSTREAMS``."""
    return frozenset({DEFAULT_UPSTREAM, *(get_config()["UPSTREAMS"] or {})})


def parse(text: str, names: Iterable[str] | None = None) -> TargetName:
    """``"upstream:model"`` or ``"model"`` as a :class:`TargetName` (``names``: the upstream names)."""
    prefix, sep, model = text.partition(":")
    if sep and model and prefix in (upstream_names() if names is None else names):
        return TargetName(prefix, model)
    return TargetName(DEFAULT_UPSTREAM, text)


def model_of(label: str) -> str:
    """The model a ``retry`` event's ``fallback`` label names."""
    return parse(label).model


def configured(model: str, fallbacks: Mapping[str, Any] | None = None) -> Sequence[str]:
    """The ``FALLBACKS`` list of the most specific glob matching ``model`` (empty if none does)."""
    table = get_config()["FALLBACKS"] if fallbacks is None else fallbacks
    matching = [glob for glob in table or {} if isinstance(glob, str) and fnmatch.fnmatchcase(model, glob)]
    if not matching:
        return ()
    best = max(matching, key=lambda glob: (specificity("", glob), glob))
    targets = table[best]
    return tuple(targets) if isinstance(targets, (list, tuple)) else ()


def chain(model: str, policy: Policy) -> list[TargetName]:
    """The fallback targets for a request to ``model`` whose policy is ``policy``; see the module docstring."""
    texts = policy.fallbacks or configured(model)
    if not texts:
        return []
    names = upstream_names()
    seen = {TargetName(DEFAULT_UPSTREAM, model)}
    result = []
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            continue
        target = parse(text.strip(), names)
        if target not in seen:
            seen.add(target)
            result.append(target)
    return result[:MAX_TARGETS]
