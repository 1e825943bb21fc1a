"""The policy's one definition: the schema agrees with settings, the model and validation; no import cycle."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from chatproxy import conf, policy
from chatproxy.models import TimeoutProfile
from chatproxy.policy import KNOBS, Policy

PACKAGE = Path(__file__).resolve().parents[1] / "chatproxy"


def test_every_tunable_field_of_policy_has_one_knob():
    # profile and fallbacks come from the profile row itself, not from TIMEOUTS
    assert [knob.name for knob in KNOBS] == [f.name for f in fields(Policy) if f.name not in ("profile", "fallbacks")]
    assert conf.DEFAULTS["TIMEOUTS"] == {knob.setting: knob.default for knob in KNOBS}
    assert all(getattr(Policy(), knob.name) == knob.default for knob in KNOBS)
    assert conf.settings_policy() == Policy()  # the test settings set no TIMEOUTS


def test_the_model_fields_are_the_schema():
    for knob in KNOBS:
        model_field = TimeoutProfile._meta.get_field(knob.field)
        assert (model_field.default, str(model_field.verbose_name), str(model_field.help_text)) == (
            knob.default, knob.label, knob.help_text)
        assert [value for value, _label in model_field.choices or ()] == list(knob.choices)
    assert Policy().profile_values() == {knob.field: knob.default for knob in KNOBS}


def test_settings_are_read_as_before():
    got = policy.from_timeouts({"STALL": "7", "MAX_ATTEMPTS": 2.0, "KEEPALIVE": None})
    assert (got.stall, got.max_attempts, got.keepalive, got.profile) == (7.0, 2, 10.0, "settings")
    with pytest.raises(ValueError, match="TIMEOUTS\\['STALL'\\] is 'ten'"):
        policy.from_timeouts({"STALL": "ten"})


def test_one_validation_speaks_the_language_of_its_reader():
    bad = Policy(keepalive=60.0, gateway=60.0)
    (for_settings,) = bad.problems()
    (for_admin,) = bad.problems(policy.by_label)
    assert for_settings.knob is for_admin.knob is policy.BY_NAME["keepalive"]
    assert for_settings.fix.startswith("lower KEEPALIVE (e.g. to 15 s) or raise GATEWAY")
    assert for_admin.sentence().startswith(
        "Must be shorter than the gateway timeout (60 s), or the gateway cuts a silent stream before a keepalive "
        "goes out: lower the keepalive interval (e.g. to 15 s) or raise the gateway timeout")
    assert Policy().problems() == []


@pytest.mark.parametrize("value", [True, None, "3", float("nan"), 2.5])
def test_values_of_the_wrong_kind_are_problems_not_crashes(value):
    (problem,) = policy.problems({"max_attempts": value})
    assert problem.knob.name == "max_attempts" and "whole number from 1 to 10" in problem.message


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """chatproxy modules that ``module`` imports anywhere (module level or inside a function)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(f"{target}."):
                found.add(target)
    return found


def test_import_graph_has_no_cycle():
    paths = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _imports(path, module, set(paths)) for module, path in paths.items()}
    assert graph["chatproxy.policy"] == set()  # the stream core's dependency stays Django-free
    assert "chatproxy.profiles" not in graph["chatproxy.conf"]

    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*trail, module, target])}"
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
