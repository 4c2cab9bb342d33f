"""Name -> implementation registries for strategies, models, datasets and scenarios.

Everything registers through the entry-point groups `cl.strategies`,
`cl.scenarios`, `cl.datasets` and `cl.models`: an entry point names a module to
import, and importing it runs its `@register_...` decorators. The built-ins are
declared the same way in this package's own `setup.cfg`, so the registry never
names the packages that import it. The entry points of a group are imported the
first time its registry is asked for a name; if one fails to import, every
look-up fails with the same one-line error (never a partial registry).
"""
from __future__ import annotations

import dataclasses
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

from cl.errors import UserError
from cl.params import NoParams


@dataclasses.dataclass
class Entry:
    name: str
    obj: Any
    params: type
    doc: str
    source: str  # module that registered it


class Registry:
    def __init__(self, kind: str, group: str, list_command: str):
        self.kind = kind
        self.group = group
        self.list_command = list_command
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, params: type | None = None) -> Callable[[Any], Any]:
        """Decorator: `@REGISTRY.register("name", params=ParamsDataclass)`.

        For classes, `params` defaults to the class attribute `Params`.
        """

        def decorator(obj: Any) -> Any:
            p = params if params is not None else getattr(obj, "Params", NoParams)
            if not dataclasses.is_dataclass(p):
                raise TypeError(f"{self.kind} {name!r}: params must be a dataclass, got {p!r}")
            undocumented = [f.name for f in dataclasses.fields(p) if not f.metadata.get("doc")]
            if undocumented:  # `cl list` and every error about it show its doc
                raise TypeError(f"{self.kind} {name!r}: parameter {undocumented[0]} of {p.__qualname__} has no doc; "
                                f"declare it with param(default, \"what it does\") or required(\"what it does\") "
                                f"from cl.params")
            existing = self._entries.get(name)
            if existing is not None and _qualified(existing.obj) != _qualified(obj):
                raise NameClash(f"{self.kind} {name!r} is registered twice: by {_origin(existing.obj)} and by "
                                f"{_origin(obj)}; rename the plugin's (its @register_{self.kind}(...) name)")
            doc = inspect.getdoc(obj) or ""
            self._entries[name] = Entry(name, obj, p, doc.strip().splitlines()[0] if doc else "",
                                        obj.__module__)
            if inspect.isclass(obj):
                obj.registered_name = name
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        points = entry_points(group=self.group)
        if not points:
            raise UserError(f"no {self.kind} is registered: entry-point group {self.group} is empty; "
                            f"install the package (pip install -e .) rather than running it from the source tree")
        for ep in points:
            try:
                ep.load()
            except NameClash as exc:  # whichever loads second is not the one to blame
                raise UserError(str(exc)) from None
            except Exception as exc:  # say which plugin is broken instead of a traceback
                raise UserError(f"plugin entry point {ep.name!r} ({ep.value}) in group {self.group} "
                                f"failed to import: {exc}; fix or uninstall that package") from None
        self._loaded = True  # only once every entry point imported

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UserError(f"unknown {self.kind} {name!r}; known: {known} "
                            f"(see `cl list {self.list_command}`)")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


class NameClash(ValueError):
    """Two different objects registered under one name."""


def _origin(obj: Any) -> str:
    """`module.qualname (package name version)`, for saying where a registered object comes from."""
    from cl.provenance import package_of

    package = package_of(obj.__module__)
    return _qualified(obj) + (f" (package {package['name']} {package['version']})" if package else "")


def _qualified(obj: Any) -> str:
    """`module.qualname`: the same name again (a re-imported module) is not a clash."""
    return f"{obj.__module__}.{getattr(obj, '__qualname__', repr(obj))}"


STRATEGIES = Registry("strategy", "cl.strategies", "strategies")
MODELS = Registry("model", "cl.models", "models")
DATASETS = Registry("dataset", "cl.datasets", "datasets")
SCENARIOS = Registry("scenario", "cl.scenarios", "scenarios")

register_strategy = STRATEGIES.register
register_model = MODELS.register
register_dataset = DATASETS.register
register_scenario = SCENARIOS.register
