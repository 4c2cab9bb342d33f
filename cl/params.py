"""Typed hyperparameter dataclasses: declaration, validation, description.

Every registered thing (strategy, model, dataset, scenario generator) declares
its parameters as a dataclass whose fields are made with `param(default, doc)`,
or `required(doc)` for a parameter without a default (declare those first, or
make the dataclass `kw_only`). `build_params` turns a plain dict (from a TOML
file or `--set`) into an instance, rejecting unknown keys, missing required
keys and wrong types with a message that lists the valid keys and their types,
then calls the instance's `validate()` method, if it has one: raise
`ValueError("what is wrong; how to fix it")` there for constraints between values.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cl.errors import UserError


def param(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc (lists are copied)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    """A dataclass field that must be given (no default), with a one-line doc."""
    return dataclasses.field(metadata={"doc": doc})


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
        rows.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                     "required": _is_required(f), "doc": f.metadata.get("doc", "")})
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
    values = dict(values or {})
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown key {', '.join(map(repr, unknown))}; {valid_keys_text(cls)}")
    missing = [f for f in dataclasses.fields(cls) if _is_required(f) and f.name not in values]
    if missing:
        f = missing[0]
        raise UserError(f"{where}: missing required parameter {f.name} ({type_name(hints[f.name])}: "
                        f"{f.metadata.get('doc', '')}); add {f.name} = ... to its table")
    kwargs = {}
    for key, value in values.items():
        ok, converted = _check(value, hints[key])
        if not ok:
            raise UserError(f"{where}: {key} must be {type_name(hints[key])}, got {value!r}")
        kwargs[key] = converted
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    return instance


def params_to_dict(instance: Any) -> dict[str, Any]:
    return dataclasses.asdict(instance) if dataclasses.is_dataclass(instance) else {}


__all__ = ["param", "required", "NoParams", "build_params", "describe_params", "params_to_dict", "type_name",
           "valid_keys_text"]
