"""The one config loader: typed dataclasses <- YAML files + dotted overrides.

Every config in vidpipe (model, training, extraction) is a tree of dataclasses. A YAML file
and `--set a.b=value` overrides fill it; unknown keys and wrongly typed values are user
errors that name the file and the key.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vidpipe.core.errors import VidpipeError, first_line

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    """Plain nested dict of a dataclass config (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict | None, source: str = "config") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors naming `source`."""
    return _build(cls, data or {}, source, prefix="")


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None), then apply overrides.

    Overrides are `dotted.key=value` strings; the value is parsed as YAML
    (`model.sparse_k=290`, `model.sparse_k=null`, `train.select_on_test=false`).
    """
    data = read_config_file(path) if path is not None else {}
    config = from_dict(cls, data, str(path) if path is not None else "defaults")
    return apply_overrides(config, overrides) if overrides else config   # errors name the --set


def read_config_file(path: str | Path) -> dict:
    """The mapping of a YAML config file (a path or a shipped config's name), unchecked:
    for callers that need to know which keys the file itself sets."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_bytes()) or {}   # bytes: a binary file is a YAMLError
    except (yaml.YAMLError, RecursionError) as exc:
        raise VidpipeError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise VidpipeError(f"{path}: expected a mapping at the top level")
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with vidpipe (package data), by name: {'malt_thumos': path, ...}."""
    folder = importlib.resources.files("vidpipe.configs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file's path: an existing file as given, else a shipped config's name
    (`malt_thumos`, `malt_thumos.yaml` or `configs/malt_thumos.yaml`); a one-line error
    lists the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    # `configs/NAME.yaml` as the README writes it names the shipped file from any folder
    name = path.stem if path.suffix == ".yaml" and path.parent in (Path("."), Path("configs")) else str(path)
    if name in shipped:
        return shipped[name]
    raise VidpipeError(f"{name_or_path}: config file not found (shipped configs: "
                       f"{', '.join(sorted(shipped))})")


def apply_overrides(config: T, overrides: list[str] | tuple[str, ...], source: str = "--set") -> T:
    """A copy of `config` with `dotted.key=value` overrides applied (checked like a file)."""
    return from_dict(type(config), _with_overrides(to_dict(config), overrides), source)


def _with_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VidpipeError(f"override '{item}': expected KEY=VALUE, e.g. model.sparse_k=290")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise VidpipeError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise VidpipeError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise VidpipeError(f"{source}: unknown config key '{prefix}{unknown[0]}' (known here: {known})")
    values = {name: _coerce(hints[name], data[name], source, prefix + name)
              for name in fields if name in data}
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check/convert one value against its annotation; errors name the dotted key."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except VidpipeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise VidpipeError(f"{source}: '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VidpipeError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise VidpipeError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        # Strings too: YAML 1.1 reads `3e-3` (no dot) as a string, not a number.
        if not isinstance(value, bool) and isinstance(value, (int, float, str)):
            try:
                return float(value)
            except ValueError:
                pass
        raise VidpipeError(f"{source}: '{key}' must be a number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise VidpipeError(f"{source}: '{key}' must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VidpipeError(f"{source}: '{key}' must be an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise VidpipeError(f"{source}: '{key}' must be a string, got {value!r}")
    return value
