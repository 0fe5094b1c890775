"""Typed frozen-dataclass configs from YAML files plus `a.b.c=value` overrides.

Every field is checked against its annotation; an unknown key or a value of the
wrong type is an error that names the file (or `--set` flag), the dotted field
and the value.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
  pass


def _is_dataclass_type(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str, default: Any = None) -> Any:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(arg, value, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
  if typing.get_origin(tp) is typing.Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if _is_dataclass_type(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, where, base=default if isinstance(default, tp) else None)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
    return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
  if tp is Any:
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
  raise ConfigError(f"{where}: unsupported field type {tp!r}")


def from_dict(cls: type[C], values: dict[str, Any], where: str = "config", base: C | None = None) -> C:
  """Builds `cls` from a (nested) mapping, checking names and types.

  Fields the mapping leaves out keep their value in `base` (default: the class
  defaults). A nested section starts from the enclosing default's value, so
  `--set mome.layer.top_k=3` changes that one field of `MomeTuningConfig().layer`
  and not of a bare `MomeConfig()`.
  """
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(fields))}")

  def default(k: str) -> Any:
    return getattr(base, k) if base is not None else fields[k].default

  kwargs = {k: _coerce(hints[k], v, f"{where}.{k}", default(k)) for k, v in values.items()}
  if base is not None:
    kwargs = {**{k: getattr(base, k) for k in fields}, **kwargs}
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple):
    return [to_dict(v) for v in obj]
  return obj


def read_file(path: os.PathLike) -> dict[str, Any]:
  """The mapping of fields in a YAML file; errors name the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  try:
    values = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: invalid YAML: {e}") from None
  if not isinstance(values, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of fields")
  return values


def overrides(items: Sequence[str]) -> dict[str, Any]:
  """`--set a.b=value` items as a nested mapping, each value parsed as YAML."""
  values: dict[str, Any] = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"--set {item!r}: expected key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = values
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"--set {item}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)
  return values


def dotted_names(values: dict[str, Any], prefix: str = "") -> set[str]:
  """The dotted names of the leaves of a nested mapping (`{"a": {"b": 1}}` -> {"a.b"})."""
  out = set()
  for key, value in values.items():
    name = f"{prefix}{key}"
    out |= dotted_names(value, f"{name}.") if isinstance(value, dict) and value else {name}
  return out


def load(cls: type[C], path: os.PathLike | None, items: Sequence[str] = ()) -> C:
  """Reads `path` (YAML, may be None for defaults), applies `key.sub=value` override items."""
  values, where = ({}, "defaults") if path is None else (read_file(path), str(path))
  if items:
    values = _merged(values, overrides(items))
    where = f"{where} + --set overrides"
  return from_dict(cls, values, where)


def _merged(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """`base` with the leaves of `over` set; a section set to a value (or the reverse) is an error."""
  out = dict(base)
  for key, value in over.items():
    old = out.get(key)
    if key in out and isinstance(old, dict) != isinstance(value, dict):
      raise ConfigError(f"--set {prefix}{key}: {'a section' if isinstance(old, dict) else 'not a section'}"
                        " in the config file")
    out[key] = _merged(old, value, f"{prefix}{key}.") if isinstance(old, dict) else value
  return out


def dump(obj: Any) -> str:
  return yaml.safe_dump(to_dict(obj), sort_keys=False)
