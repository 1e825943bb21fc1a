"""pytest plugin: the simulator as a fixture.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.fixtures_simulator"]``.

* ``simulator`` (session scope): one :class:`~chatproxy.simulator.process.SimulatorProcess`
  started on a free port for the whole session, stopped at the end.
* ``sim`` (function scope): the same object after ``reset()``, so each test starts with an empty
  request log, zero totals and fresh per-fingerprint attempt counts. Live connections from a
  previous test are not touched (a leak shows up in that test's own assertions).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chatproxy.simulator.process import SimulatorProcess


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess() as proc:
        yield proc


@pytest.fixture(scope="module")
def module_simulator() -> Iterator[SimulatorProcess]:
    """A simulator for one module alone, for tests that count connections: the session
    simulator also carries the live servers' pooled upstream connections."""
    with SimulatorProcess() as proc:
        yield proc


@pytest.fixture
def isolated_sim(module_simulator: SimulatorProcess) -> SimulatorProcess:
    """Like ``sim``, on this module's own simulator."""
    module_simulator.reset()
    return module_simulator


@pytest.fixture
def sim(simulator: SimulatorProcess) -> SimulatorProcess:
    if not simulator.running:  # pragma: no cover - only if something killed the child
        raise RuntimeError(f"the simulator process died:\n{simulator.output()}")
    simulator.reset()
    return simulator
