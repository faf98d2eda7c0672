"""Strict YAML -> dataclass loading with typed ``--set a.b=c`` overrides.

Each component owns a ``@dataclass(kw_only=True)`` config; this module only knows how to fill such
dataclasses from plain data. Rules:

- an unknown key is an error that lists the valid keys at that level;
- a field without a default is required;
- values are type-checked against the annotations (``int``, ``float``, ``bool``, ``str``,
  ``Literal``, ``Optional``, ``list[...]``, ``dict[...]``, nested dataclasses) and never ``eval``-ed;
- a ``ConfigError`` raised by a dataclass's ``__post_init__`` is re-raised with the dotted path of the
  section prepended, so the message names the full field (``train.batch_size: ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from rpg_dist.errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def build(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively and strictly.

    Raises:
        ConfigError: unknown or missing keys, wrong types, or a failed ``__post_init__`` rule.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or "<root>"
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(_join(path, str(err))) from None


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads an exponent without a dot (lr: 1e-3) as a string.
            return parse_override(float, value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return _finite(float(value), path)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def parse_override(tp: Any, raw: str, path: str) -> Any:
    """Parse the text of ``--set path=raw`` for a field annotated ``tp`` (no ``eval``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if raw.strip().lower() in _NULL and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_override(arg, raw, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: cannot parse {raw!r}")
    if tp is str:
        return raw
    if origin is Literal:
        for arg in args:
            if str(arg) == raw:
                return arg
        raise ConfigError(f"{path}: {raw!r} is not one of {list(args)}")
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"{path}: expected true/false, got {raw!r}")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            value = float(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {raw!r}") from None
        return _finite(value, path)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: cannot parse {raw!r}: {err}") from None
    return coerce(tp, value, path)


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to raw config ``data`` after checking each key path against ``cls``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        target_cls, node = cls, data
        for depth, key in enumerate(keys):
            fields = {f.name: f for f in dataclasses.fields(target_cls) if f.init}
            where = ".".join(keys[:depth]) or "<root>"
            if key not in fields:
                raise ConfigError(f"--set {dotted}: {where} has no key {key!r}; valid keys are {sorted(fields)}")
            tp = typing.get_type_hints(target_cls)[key]
            section_cls = _dataclass_in(tp)
            if depth == len(keys) - 1:
                node[key] = parse_override(tp, raw, dotted)
            elif section_cls is None:
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is not a section")
            else:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                target_cls, node = section_cls, node[key]
    return data


def load_yaml_text(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text into a mapping, naming ``source`` in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config dataclass (round-trips through ``build``)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def fingerprint(*parts: Any) -> str:
    """Stable sha256 of config sections and plain values, used by stage manifests and resume checks."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _finite(value: float, path: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    return value


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
