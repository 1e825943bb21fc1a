"""The parts of :class:`chatproxy.core.ChatStream`, one job each (plain asyncio, no Django, no SDK).

* :mod:`~chatproxy.stream.events`: the event log. Numbers events, fans them out to readers
  (:class:`~chatproxy.stream.events.Reader`), flags keepalives for client readers, trims memory
  against the slowest reader and the event store, and starts the grace period when the last client
  leaves.
* :mod:`~chatproxy.stream.watchdog`: the one lazy timer of a stream. Emits keepalives and expires the
  running attempt's ``asyncio.timeout`` when its first-token or stall deadline, or the stream's
  deadline, has passed.
* :mod:`~chatproxy.stream.answer`: the text the consumer has been given (since the last reset) and
  the only way text reaches the log.
* :mod:`~chatproxy.stream.joiner`: joins a retry's text onto that answer (restart or continue).
* :mod:`~chatproxy.stream.retry`: what to do after a failed attempt, as a value: ``Retry(delay)``,
  ``MoveOn(code)`` (the next target) or ``GiveUp(code)``; and the one mapping of an upstream
  failure to a final error code.
* :mod:`~chatproxy.stream.attempts`: the attempt runner. Plays one :class:`~chatproxy.stream.values.Target`
  (an upstream, the request to send it, the policy its attempts follow) until it answers or the
  plan moves on or gives up.
* :mod:`~chatproxy.stream.targets`: the fallbacks. Plays the targets in order on one runner,
  asking a circuit breaker (optional) once per target whether to skip it.

Everything that spans the whole answer lives outside a target: the log and its sequence numbers,
the watchdog's deadline (``DEADLINE`` covers every target) and keepalives, the answer already sent,
the attempt count in ``StreamStats``. Everything a target decides comes from its own policy:
first-token and stall limits, attempts, backoff, ``ON_PARTIAL``. So trying another target is one
more ``await runner.run(target)`` on the same runner; its first attempt joins onto what was sent
exactly as a retry on the same target would.
"""
