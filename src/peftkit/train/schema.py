"""Check a YAML mapping against a dataclass and collect *every* problem, each with its key path.

A run fails late and expensively when a typo surfaces after a 14 s model load, so the whole
config is checked first and all problems are reported in one message::

    config examples/x.yaml has 3 problems:
      - method.rank: unknown key (did you mean 'r'?)
      - epochs: expected int, got str 'three'
      - data.train.path: file not found: ../shared/data/missing.csv

:func:`check_block` understands the type hints used by peftkit's config classes (``int``,
``float``, ``bool``, ``str``, ``None``, ``list[X]``, ``dict[str, X]``, ``Literal[...]``, unions and
nested dataclasses). YAML 1.1 reads ``3e-3`` as a string, so a float field also takes a string
that parses as a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A run config with one or more problems; ``problems`` holds one line per problem, ``hint``
    one line of what to do about them (e.g. the command that makes a recipe's files)."""

    def __init__(
        self, problems: list[str], source: str | None = None, hint: str | None = None
    ) -> None:
        self.problems = list(problems)
        self.source = source
        self.hint = hint
        where = f"config {source}" if source else "config"
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        tail = f"\n{hint}" if hint else ""
        super().__init__(f"{where} has {n} problem{'s' if n != 1 else ''}:\n{lines}{tail}")


def type_name(hint: Any) -> str:
    """A short human spelling of a type hint (``int | None``, ``list[str]``, ``'a' | 'b'``)."""
    origin = get_origin(hint)
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(hint))
    if origin in (list, tuple, set, frozenset):
        args = get_args(hint)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin in (dict, Mapping):
        args = get_args(hint)
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]" if args else "mapping"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


def coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Return ``value`` converted to ``hint`` (or unchanged), appending any mismatch to ``problems``."""
    origin = get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        # Try exact matches first so `bool | str` keeps True as a bool and `int | float` keeps ints.
        for option in options:
            trial: list[str] = []
            out = coerce(value, option, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {type_name(hint)}, got {_describe(value)}")
        return value
    if hint is type(None):
        if value is not None:
            problems.append(f"{path}: expected null, got {_describe(value)}")
        return value
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint_text}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected int, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool):
            problems.append(f"{path}: expected float, got {_describe(value)}")
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `3e-3` as a string
            except ValueError:
                pass
        problems.append(f"{path}: expected float, got {_describe(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected str, got {_describe(value)}")
        return value
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {type_name(hint)}, got {_describe(value)}")
            return value
        args = get_args(hint)
        item = args[0] if args else Any
        return [coerce(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected {type_name(hint)}, got {_describe(value)}")
            return value
        args = get_args(hint)
        key_hint, val_hint = args if args else (Any, Any)
        return {
            coerce(k, key_hint, f"{path}.<key>", problems): coerce(
                v, val_hint, f"{path}.{k}", problems
            )
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return value
        return check_block(value, hint, path, problems)
    if isinstance(hint, type) and issubclass(hint, str) and isinstance(value, str):
        return value  # str enums (TaskType) take their string value; the class validates it
    if isinstance(hint, type):
        if not isinstance(value, hint):
            problems.append(f"{path}: expected {type_name(hint)}, got {_describe(value)}")
        return value
    return value  # an exotic hint: let the class constructor judge


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields (``Any`` where a hint cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable hint must not block validation of the rest
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def unknown_key(path: str, key: str, known: list[str]) -> str:
    """The message for an unknown key, with a close match when there is one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = (
        f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
    )
    return f"{path}: unknown key{hint}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def check_block(
    data: Mapping[str, Any],
    cls: type,
    path: str,
    problems: list[str],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check ``data`` against dataclass ``cls``; return the coerced values of the given keys.

    Unknown keys, type mismatches and missing required fields are appended to ``problems``;
    keys listed in ``skip`` are left to the caller.
    """
    hints = field_hints(cls)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is MISSING and f.default_factory is MISSING
    }
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in hints:
            known = [k for k in hints if k not in skip]
            problems.append(unknown_key(join(path, key), str(key), known))
            continue
        out[key] = coerce(value, hints[key], join(path, key), problems)
    for key in sorted(required - set(data) - set(skip)):
        problems.append(f"{join(path, key)}: required key is missing ({type_name(hints[key])})")
    return out


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """Instantiate dataclass ``cls`` from checked values, building nested dataclass fields too."""
    hints = field_hints(cls)
    kwargs = {}
    for key, value in values.items():
        hint = hints.get(key, Any)
        target = _dataclass_in(hint)
        if target is not None and isinstance(value, Mapping):
            value = build(target, value)
        kwargs[key] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if get_origin(hint) in (Union, types.UnionType):
        for option in get_args(hint):
            if dataclasses.is_dataclass(option):
                return option
    return None
