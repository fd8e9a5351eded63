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


def load_runs(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> list[C]:
    """One config per entry of the file's top-level ``runs:`` list, or ``[load_config(...)]`` where it has none.

    A question with several settings is one file: its keys are shared, and each entry of ``runs`` names the run
    (``run: NAME``) and overrides some keys; a mapping (``distill: {data_style: wikitext}``) updates the shared one.
    Each run writes to ``OUT/NAME`` and, where the config has a name, is named ``NAME_OF_FILE_NAME``. Overrides
    from the command line apply to every run, last; ``runs=A,B`` picks runs by name.
    """
    overrides = dict(overrides or {})
    picked = overrides.pop("runs", None)
    with_runs = dataclasses.make_dataclass(cls.__name__, [("runs", list, dataclasses.field(default_factory=list))],
                                           bases=(cls,))
    shared = load_config(with_runs, path, overrides)
    entries = shared.runs
    if not entries:
        if picked is not None:
            raise AttnswapError(f"runs={picked} picks runs, but {path or 'the config'} has no runs: list")
        return [load_config(cls, path, overrides)]
    names = [_run_name(path, i, entry) for i, entry in enumerate(entries)]
    if len(set(names)) < len(names):
        raise AttnswapError(f"{path}: run names repeat ({', '.join(names)}); give each run its own name")
    wanted = names if picked is None else [n.strip() for n in str(picked).split(",") if n.strip()]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise AttnswapError(f"no run named '{missing[0]}' in {path}; choose from: {', '.join(names)}")
    base = {f.name: getattr(shared, f.name) for f in dataclasses.fields(cls)}
    configs = []
    for name, entry in zip(names, entries):
        if name not in wanted:
            continue
        values = dict(base)
        for key, value in entry.items():
            if key == "run":
                continue
            if key == "out":
                raise AttnswapError(f"{path}: run '{name}' sets out; each run writes to the file's out/{name}")
            merged = isinstance(values.get(key), dict) and isinstance(value, dict)
            values[key] = {**values[key], **value} if merged else value
        if "out" in base:
            values["out"] = str(Path(str(base["out"])) / name)
        if "name" in base and "name" not in entry:
            values["name"] = f"{base['name']}_{name}"
        configs.append(build_config(cls, {**values, **{k: v for k, v in overrides.items() if k != "out"}}))
    return configs


def _run_name(path: str | Path | None, index: int, entry: Any) -> str:
    """The ``run:`` name of one entry of ``runs``, checked to be a plain folder name."""
    if not isinstance(entry, dict) or not isinstance(entry.get("run"), str):
        raise AttnswapError(f"{path}: runs[{index}] must be a mapping with run: NAME (and the keys it changes)")
    name = entry["run"]
    if not name or name in (".", "..") or any(c in name for c in "/\\,"):
        raise AttnswapError(f"{path}: runs[{index}] has run: {name!r}; a run's name is a plain folder name")
    return name
