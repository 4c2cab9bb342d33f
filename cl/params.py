"""Typed hyperparameter dataclasses: declaration, validation, description.

Every registered thing (strategy, model, dataset, scenario generator) declares
its parameters as a dataclass whose fields are made with `param(default, doc)`,
or `required(doc)` for a parameter without a default (declare those first, or
make the dataclass `kw_only`). A numeric parameter may declare its range:
`low`/`high` are inclusive bounds, `above`/`below` exclusive ones, and they
apply to every element of a list or table of numbers (`param([100], "widths",
low=1)`). `build_params` turns a plain dict (from a TOML file or `--set`) into
an instance, rejecting unknown keys, missing required keys, wrong types,
non-finite floats (TOML's nan and inf) and values out of range with a message
that lists the valid keys and their types, then calls the instance's
`validate()` method, if it has one: raise `ValueError("what is wrong; how to
fix it")` there for constraints between values. A field whose natural key is a
Python keyword declares the key files use: `param(..., key="class")`.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cl.errors import UserError


def _metadata(doc: str, low: float | None, high: float | None, above: float | None,
              below: float | None, key: str | None) -> dict[str, Any]:
    bounds = {k: v for k, v in (("low", low), ("high", high), ("above", above), ("below", below)) if v is not None}
    return {"doc": doc, **({"bounds": bounds} if bounds else {}), **({"key": key} if key else {})}


def file_key(field: dataclasses.Field) -> str:
    """The key a file writes for this field: its name, or the `key` it declares."""
    return field.metadata.get("key", field.name)


def param(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
          above: float | None = None, below: float | None = None, key: str | None = None) -> Any:
    """A dataclass field with a default, a one-line doc and an optional range (lists are copied)."""
    metadata = _metadata(doc, low, high, above, below, key)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def required(doc: str, *, low: float | None = None, high: float | None = None, above: float | None = None,
             below: float | None = None, key: str | None = None) -> Any:
    """A dataclass field that must be given (no default), with a one-line doc and an optional range."""
    return dataclasses.field(metadata=_metadata(doc, low, high, above, below, key))


def range_text(bounds: dict[str, float]) -> str:
    """`>= 1`, `> 0`, `in [0, 1)`: the range a field declares, as `cl list` and errors print it."""
    lower = ("[", bounds["low"]) if "low" in bounds else ("(", bounds["above"]) if "above" in bounds else None
    upper = ("]", bounds["high"]) if "high" in bounds else (")", bounds["below"]) if "below" in bounds else None
    if lower and upper:
        return f"in {lower[0]}{_bound(lower[1])}, {_bound(upper[1])}{upper[0]}"
    if lower:
        return f"{'>=' if lower[0] == '[' else '>'} {_bound(lower[1])}"
    return f"{'<=' if upper[0] == ']' else '<'} {_bound(upper[1])}"


def _bound(value: float) -> str:
    """A range bound as written: whole numbers in full (2**32, not 4.29497e+09), others short."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else f"{value:g}"


def _numbers(value: Any) -> list[float]:
    """The numbers in a value: itself, or the elements of a list or table (booleans are not numbers)."""
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _in_range(x: float, bounds: dict[str, float]) -> bool:
    return (x >= bounds.get("low", -math.inf) and x <= bounds.get("high", math.inf)
            and ("above" not in bounds or x > bounds["above"]) and ("below" not in bounds or x < bounds["below"]))


@dataclasses.dataclass
class NoParams:
    """For things that take no parameters."""


def type_name(tp: Any) -> str:
    """Short human-readable name of a type annotation (`int`, `list[int]`, `'a'|'b'`)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{type_name(inner)}]"
    if origin is dict:
        _, inner = get_args(tp) or (str, Any)
        return f"table of {type_name(inner)}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, converted value) for `value` against annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            ok, converted = _check(value, arm)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (inner,) = get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, converted = _check(item, inner)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        _, inner = get_args(tp) or (str, Any)
        converted_table = {}
        for key, item in value.items():
            ok, converted = _check(item, inner)
            if not (ok and isinstance(key, str)):
                return False, value
            converted_table[key] = converted
        return True, converted_table
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def describe_params(cls: type) -> list[dict[str, Any]]:
    """One dict per field: name, type, default (None when required), required, doc (for `cl list`)."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        bounds = f.metadata.get("bounds")
        rows.append({"name": file_key(f), "type": type_name(hints[f.name]), "default": default,
                     "required": _is_required(f), "doc": f.metadata.get("doc", ""),
                     "range": range_text(bounds) if bounds else ""})
    return rows


def valid_keys_text(cls: type) -> str:
    rows = describe_params(cls)
    if not rows:
        return "it takes no parameters"
    return "valid keys: " + ", ".join(f"{r['name']} ({r['type']})" for r in rows)


def build_params(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Validate `values` against dataclass `cls` and return an instance.

    `where` names the config section for the error message, e.g. "strategy 'er'".
    """
    if values is not None and not isinstance(values, dict):
        raise UserError(f"{where} must be a table (key = value pairs), got {values!r}")
    hints = get_type_hints(cls)
    by_key = {file_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - set(by_key))
    if unknown:
        raise UserError(f"{where}: unknown key {', '.join(map(repr, unknown))}; {valid_keys_text(cls)}")
    values = {by_key[key].name: value for key, value in (values or {}).items()}  # by field name
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [f for f in dataclasses.fields(cls) if _is_required(f) and f.name not in values]
    if missing:
        f = missing[0]
        raise UserError(f"{where}: missing required parameter {file_key(f)} ({type_name(hints[f.name])}: "
                        f"{f.metadata.get('doc', '')}); add {file_key(f)} = ... to its table")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        ok, converted = _check(values[f.name], hints[f.name])
        if not ok:
            raise UserError(f"{where}: {file_key(f)} must be {type_name(hints[f.name])}, got {values[f.name]!r}")
        kwargs[f.name] = converted
    declared = f"{cls.__module__}.{cls.__qualname__}"
    for f in dataclasses.fields(cls):  # the defaults a file did not override pass the same checks
        if f.name in values or _is_required(f):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        ok, converted = _check(default, hints[f.name])
        if not ok:
            raise UserError(f"{where}: the default of {file_key(f)} ({default!r}) is not {type_name(hints[f.name])}; "
                            f"fix its declaration in {declared}")
        kwargs[f.name] = converted
    instance = cls(**kwargs)
    check_params(instance, where, defaults=[name for name in names if name not in values], declared=declared)
    return instance


def check_params(instance: Any, where: str, defaults: list[str] = (), declared: str = "") -> None:
    """Every number of `instance` finite and in its field's declared range, then its `validate()`;
    a UserError naming the field otherwise (for a field in `defaults`, which the user did not set, the
    declaration in `declared` is to blame). `build_params` runs it; so can code that builds
    parameters itself."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        numbers = _numbers(value)
        fix = f" (its default; fix its declaration in {declared})" if f.name in defaults else ""
        if not all(math.isfinite(x) for x in numbers):
            raise UserError(f"{where}: {file_key(f)} must be finite, got {value!r}{fix or '; give a number'}")
        bounds = f.metadata.get("bounds")
        if bounds and not all(_in_range(x, bounds) for x in numbers):
            each = " (each value)" if isinstance(value, (list, dict)) else ""
            raise UserError(f"{where}: {file_key(f)} must be {range_text(bounds)}{each}, got {value!r}{fix}")
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None


def params_to_dict(instance: Any) -> dict[str, Any]:
    """The parameters as a file writes them (each under its `file_key`), as stored in run records; `build_params`
    reads the result back."""
    if not dataclasses.is_dataclass(instance):
        return {}
    values = dataclasses.asdict(instance)
    return {file_key(f): values[f.name] for f in dataclasses.fields(instance)}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one dict of dotted keys: {"training": {"lr": 0.1}} -> {"training.lr": 0.1}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two configurations, as "key: old -> new"."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(none)") != b.get(k, "(none)")]


__all__ = ["param", "required", "NoParams", "build_params", "changes", "check_params", "describe_params", "file_key",
           "flatten", "params_to_dict", "range_text", "type_name", "valid_keys_text"]
