"""Typed, strict configuration: YAML files -> nested dataclasses.

A config class is a dataclass whose fields are bool / int / float / str, ``Optional[...]``, ``Literal[...]``,
``tuple[...]`` / ``list[...]`` of those, or nested dataclasses (sections). One call reads, merges and checks:

    cfg = load_config(TrainConfig, "configs/mar_base.yaml", ["optim.blr=2e-4", "--train.seed=1"])

- a YAML file may start with ``base: other.yaml`` (relative to itself): the base is read first, then this
  file's keys replace its keys section by section;
- overrides ``section.key=value`` (a leading ``--`` is accepted) are applied in order, later ones win;
- unknown keys, wrong types, values outside a ``Literal`` and failed ``__post_init__`` checks raise
  `ConfigError` naming the dotted key and, for unknown keys, the valid keys of that section.

YAML scalars follow the YAML 1.2 core schema rather than PyYAML's 1.1 defaults: ``1e-4`` is a float and only
``true``/``false`` are booleans (``no``/``off`` stay strings). Derived numbers such as the absolute learning
rate are computed by functions (`effective_lr`), never written back into the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mar.io import write_text

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override does not match its schema; the message names the key and the fix."""


# --- YAML dialect: PyYAML's safe loader with YAML 1.2 booleans and floats ---------------------------------
class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is an error (PyYAML would silently keep the last one)."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in the same section (line {key_node.start_mark.line + 1}):"
                                  " keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --- type checking ------------------------------------------------------------------------------------------
_UNIONS = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} [{', '.join(_type_name(a) for a in args)}]"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "section (a mapping of keys)"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _accepts_str(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return any(_accepts_str(a) for a in args)
    return tp is str or (origin is Literal and all(isinstance(a, str) for a in args))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form (tuple, float, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def mismatch() -> ConfigError:
        hint = " (quote it in YAML)" if _accepts_str(tp) and isinstance(value, (int, float)) else ""
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}{hint}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise mismatch()
        return _build(tp, value, key)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _convert(a, value, key)
            except ConfigError:
                if len(inner) == 1 and (typing.get_origin(a) in (list, tuple) or dataclasses.is_dataclass(a)):
                    raise  # the element-level message is more precise
        raise mismatch()
    if origin is Literal:
        if any(type(value) is type(c) and value == c for c in args):
            return value
        raise mismatch()
    if tp is bool or tp is int or tp is str:
        if type(value) is not tp:  # exact: True is not an int, 1 is not a bool
            raise mismatch()
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise mismatch()
        return float(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} items {list(value)!r}")
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    raise TypeError(f"config schema: unsupported annotation {tp!r} for {key}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fields(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}, typing.get_type_hints(cls)


def _unknown(prefix: str, name: Any, valid: list[str]) -> ConfigError:
    where = f"in section '{prefix}'" if prefix else "at the top level"
    close = difflib.get_close_matches(str(name), valid, n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{_join(prefix, str(name))}'{guess}; valid keys {where}: {', '.join(valid)}")


def _build(cls: type[C], data: dict, prefix: str = "") -> C:
    fields, hints = _fields(cls)
    for name in data:
        if name not in fields:
            raise _unknown(prefix, name, list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(value, dict) and dataclasses.is_dataclass(default):  # a partial section keeps the
                value = _deep_merge(config_to_dict(default), value)  # other values of its default instance
            kwargs[name] = _convert(hints[name], value, _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(prefix, name)}'")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks phrase their message as "<field> must ..."
        raise ConfigError(_join(prefix, str(e))) from None


def config_from_dict(cls: type[C], data: dict) -> C:
    """Build and check a config of class `cls` from plain nested dicts."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {_show(data)}")
    return _build(cls, data)


# --- files and overrides --------------------------------------------------------------------------------------
def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file into plain dicts, resolving ``base:`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        of = f" (the base of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"config file not found: {path}{of}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {_show(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {_show(base)}")
    base_path = path.parent / base
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, chain + (base_path,)))}")
    return _deep_merge(read_yaml(base_path, chain), data)


def parse_override(text: str, cls: type) -> tuple[list[str], Any]:
    """``"--optim.blr=2e-4"`` -> (["optim", "blr"], 0.0002), the key checked against the schema `cls`.

    The value is parsed as YAML; for string fields the raw text is kept (``model.num_sampling_steps=50``).
    """
    key, sep, raw = (text[2:] if text.startswith("--") else text).partition("=")
    parts = key.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"bad override {text!r}: expected section.key=value, e.g. optim.blr=2e-4")
    tp, prefix = cls, ""
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"bad override {text!r}: '{prefix}' is a value, not a section")
        fields, hints = _fields(tp)
        if part not in fields:
            raise ConfigError(f"override {text!r}: {_unknown(prefix, part, list(fields))}")
        tp, prefix = hints[part], _join(prefix, part)
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML: {e}") from None
    return parts, raw if _accepts_str(tp) and value is not None and not isinstance(value, str) else value


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> C:
    """Defaults of `cls` <- YAML file at `path` (with its ``base`` chain) <- `overrides`, checked strictly."""
    data = read_yaml(path) if path is not None else {}
    try:
        _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    for text in overrides:
        parts, value = parse_override(text, cls)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        old = node.get(parts[-1])
        node[parts[-1]] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        try:
            _build(cls, data)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return _build(cls, data)


def config_to_dict(cfg: Any) -> Any:
    """A config as plain nested dicts/lists (tuples become lists), ready for YAML or a checkpoint."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); `load_config(type(cfg), path)` gives it back."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
