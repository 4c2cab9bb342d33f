"""The registries: entry-point loading that never leaves a partial registry, and name clashes."""
from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest

import cl.registry
from cl.errors import UserError
from cl.registry import Registry


@dataclasses.dataclass
class NoParams:
    pass


class First:
    """first"""


class Second:
    """second"""


def fake_entry_points(points):
    return lambda group: [p for p in points if p.group == group]


def test_builtins_come_from_this_packages_entry_points():
    groups = {ep.group for ep in importlib.metadata.distribution("cl-bench").entry_points
              if ep.group.startswith("cl.")}
    assert groups == {"cl.strategies", "cl.models", "cl.datasets", "cl.scenarios"}
    assert "naive" in cl.registry.STRATEGIES.names() and "mlp" in cl.registry.MODELS.names()


def test_a_failing_entry_point_fails_every_lookup(monkeypatch):
    """After one plugin fails to import, later look-ups must not quietly use a partial registry."""
    registry = Registry("gadget", "test.gadgets", "gadgets")
    good = importlib.metadata.EntryPoint("good", "tests.test_registry", "test.gadgets")
    bad = importlib.metadata.EntryPoint("bad", "tests.no_such_module_here", "test.gadgets")
    monkeypatch.setattr(cl.registry, "entry_points", fake_entry_points([good, bad]))
    for _ in range(2):
        with pytest.raises(UserError, match="plugin entry point 'bad' .* failed to import"):
            registry.get("anything")
    monkeypatch.setattr(cl.registry, "entry_points", fake_entry_points([good]))
    registry.register("thing", params=NoParams)(First)
    assert registry.get("thing").obj is First  # loads once the broken plugin is gone


def test_two_objects_under_one_name_is_an_error():
    registry = Registry("gadget", "test.gadgets", "gadgets")
    registry.register("thing", params=NoParams)(First)
    registry.register("thing", params=NoParams)(First)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match="'thing' is registered twice: by .*First.* and by .*Second.*; rename the "
                                         "plugin's"):
        registry.register("thing", params=NoParams)(Second)


class ClashingPlugin:
    """An entry point whose module registers a name another package has taken."""

    name, value, group = "clash", "someone_elses.plugin", "test.gadgets"

    def __init__(self, registry):
        self.registry = registry

    def load(self):
        self.registry.register("thing", params=NoParams)(Second)


def test_a_plugin_taking_a_built_in_name_is_one_line_naming_both(monkeypatch):
    """The clash is reported as such, not as the entry point that happened to load second having failed."""
    registry = Registry("gadget", "test.gadgets", "gadgets")
    registry.register("thing", params=NoParams)(First)
    monkeypatch.setattr(cl.registry, "entry_points", fake_entry_points([ClashingPlugin(registry)]))
    with pytest.raises(UserError) as raised:
        registry.get("thing")
    message = str(raised.value)
    assert "failed to import" not in message and "fix or uninstall" not in message
    assert "registered twice: by tests.test_registry.First" in message and "tests.test_registry.Second" in message


def test_a_parameter_without_a_doc_is_refused_at_registration():
    """`cl list` and every error about a parameter show its doc, so a plain default is not enough."""
    from cl.params import param

    @dataclasses.dataclass
    class Plain:
        size: int = param(3, "a size")
        lr: float = 0.1

    registry = Registry("gadget", "test.gadgets", "gadgets")
    with pytest.raises(TypeError, match=r"gadget 'thing': parameter lr of .*Plain has no doc; declare it with "
                                        r"param\(default, \"what it does\"\)"):
        registry.register("thing", params=Plain)(First)
    assert "thing" not in registry._entries
