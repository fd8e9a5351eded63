"""Command configs: dataclasses loaded from YAML, then ``key=value`` overrides, strictly checked.

Unknown keys and values of the wrong type are refused with one line that names the key, as in
nanoGPT's configurator; YAML goes through ``attnswap.validate.load_yaml`` (no duplicate keys, aliases capped) and the
built config through ``check_config_values`` (64-bit integers, finite floats, seeds, devices, batch sizes against
memory). The resolved config is a plain dict in every run folder and result file.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from attnswap.errors import AttnswapError
from attnswap.validate import check_config_values, check_numbers, load_yaml, shown

C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from a YAML file (optional) and overrides (raw strings are parsed as YAML scalars)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AttnswapError(f"config file not found: {path}")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        except UnicodeDecodeError as exc:
            raise AttnswapError(f"config file {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
        except yaml.YAMLError as exc:
            raise AttnswapError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise AttnswapError(f"config file {path} must hold a mapping of key: value")
        values.update(loaded)
    values.update(overrides or {})
    return build_config(cls, values)


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise AttnswapError(f"unknown config key '{unknown[0]}' for {cls.__name__}; known keys: {', '.join(fields)}")
    typed = {key: _typed(key, value, hints[key]) for key, value in values.items()}
    check_numbers(typed)  # before the config's own checks, which would compare an inf or a nan
    config = cls(**typed)
    check_config_values(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _typed(key: str, value: Any, kind: Any) -> Any:
    if isinstance(value, str) and kind is not str and not _allows_str(kind):
        try:
            value = load_yaml(value, f"config key '{key}'") if value.strip() else None
        except yaml.YAMLError:
            raise AttnswapError(f"config key '{key}' = {shown(value)} cannot be read; give a plain value") from None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return _typed(key, value, candidate)
            except AttnswapError:
                continue
        raise AttnswapError(f"config key '{key}' = {shown(value)} has the wrong type; expected {kind}")
    if origin in (list, tuple):
        (item_kind, *_rest) = args or (Any,)
        # Variant specs contain commas ("window:w=64,sinks=4"), so lists of strings split on ";".
        separator = ";" if item_kind is str else ","
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(separator) if v.strip()]
        converted = [_typed(key, v, item_kind) for v in items]
        return tuple(converted) if origin is tuple else converted
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise AttnswapError(f"config key '{key}' = {shown(value)} is beyond any float; give a finite value") \
                from None
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AttnswapError(f"config key '{key}' = {shown(value)} has the wrong type; expected {kind.__name__}")
    return value


def _allows_str(kind: Any) -> bool:
    return kind is str or str in typing.get_args(kind)
