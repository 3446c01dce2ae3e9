"""Typed, strict configuration: YAML files -> nested dataclasses.

A config class is a dataclass whose fields are bool / int / float / str, ``Optional[...]`` / ``Union[...]``,
``Literal[...]``, ``tuple[...]`` / ``list[...]`` of those, or nested dataclasses (sections). One call reads,
merges and checks:

    cfg = load_config(TrainConfig, "configs/mar_base.yaml", ["optim.blr=2e-4", "--train.seed=1"])

- a YAML file may start with ``base: other.yaml`` (relative to itself): the base is read first, then this
  file's keys replace its keys section by section; a key given twice in one mapping is an error;
- overrides ``section.key=value`` (a leading ``--`` is accepted) are applied in order, later ones win; the value
  is YAML, except that a field that accepts strings keeps the raw text (``model.num_sampling_steps=50`` is "50");
- types are exact (True is not an int, 1 is not a bool; an int is accepted for a float); unknown keys, wrong
  types, values outside a ``Literal`` and failed ``__post_init__`` checks raise `ConfigError` naming the dotted
  key and, for unknown keys, all valid keys of that section and the closest one (difflib) if any.

YAML scalars follow the YAML 1.2 core schema rather than PyYAML's 1.1 defaults: ``1e-4`` is a float and only
``true``/``false`` are booleans (``no``/``off`` stay strings). Derived numbers such as the absolute learning
rate are computed by functions (`effective_lr`), never written back into the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
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


# --- YAML dialect: PyYAML's safe loader with YAML 1.2 booleans and floats, no duplicate keys ------------------
class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in the same section (line {key_node.start_mark.line + 1})"
                                  ": keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


# --- type checking ------------------------------------------------------------------------------------------
_UNIONS = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and args[-1] is not Ellipsis:
        return f"list of {len(args)} [{', '.join(map(_type_name, args))}]"
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "section (a mapping of keys)"
    if tp in (bool, int, float, str):
        return tp.__name__
    raise TypeError(f"config schema: unsupported annotation {tp!r}")


def _show(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _accepts_str(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return any(map(_accepts_str, args))
    return tp is str or (origin is Literal and all(isinstance(a, str) for a in args))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form (float, tuple, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and (typing.get_origin(inner[0]) in (tuple, list) or dataclasses.is_dataclass(inner[0])):
            return _convert(inner[0], value, key)  # the element-level message is more precise
        for a in inner:
            with contextlib.suppress(ConfigError):
                return _convert(a, value, key)
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value, key)
    elif ((tp in (bool, int, str) and type(value) is tp)  # exact types: True is not an int, 1 is not a bool
          or (origin is Literal and any(type(value) is type(c) and value == c for c in args))):
        return value
    elif tp is float and type(value) in (int, float):
        return float(value)
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        item_types = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
        if len(item_types) != len(value):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} items {list(value)!r}")
        return origin(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(item_types, value)))
    hint = " (quote it in YAML)" if _accepts_str(tp) and isinstance(value, (int, float)) else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}{hint}")


# --- sections -------------------------------------------------------------------------------------------------
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache  # (get_type_hints evaluates every annotation of the class)
def _field(cls: type, name: Any, prefix: str) -> tuple[dataclasses.Field, Any]:
    """The field and annotation of key `name` in section `cls`; an unknown key is an error listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if name not in fields:
        close = difflib.get_close_matches(str(name), list(fields), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        where = f"in section '{prefix}'" if prefix else "at the top level"
        raise ConfigError(f"unknown key '{_join(prefix, str(name))}'{guess}; valid keys {where}: {', '.join(fields)}")
    return fields[name], typing.get_type_hints(cls)[name]


def config_from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build and check a config of class `cls` from plain nested dicts (`prefix`: the dotted key of the section)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {_show(data)}")
    found = {name: _field(cls, name, prefix) for name in data}  # all keys are known before any value is checked
    kwargs = {}
    for name, (f, tp) in found.items():
        value = data[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, dict) and dataclasses.is_dataclass(default):  # a partial section keeps the
            value = _deep_merge(config_to_dict(default), value)  # other values of its default instance
        kwargs[name] = _convert(tp, value, _join(prefix, name))
    for f in dataclasses.fields(cls):
        required = f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"missing required key '{_join(prefix, f.name)}'")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks phrase their message as "<field> must ..."
        raise ConfigError(_join(prefix, str(e))) from None


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
        raise FileNotFoundError(f"config file not found: {path}" + (f" (the base of {_chain[-1]})" if _chain else ""))
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
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
    base_path, chain = path.parent / base, _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, chain + (base_path,)))}")
    return _deep_merge(read_yaml(base_path, chain), data)


def parse_override(text: str, cls: type) -> tuple[list[str], Any]:
    """``"--optim.blr=2e-4"`` -> (["optim", "blr"], 0.0002), the key checked against the schema `cls`.

    The value is parsed as YAML; for fields that accept strings the raw text is kept (``model.num_sampling_steps=50``).
    """
    key, sep, raw = text.removeprefix("--").partition("=")
    parts = key.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"bad override {text!r}: expected section.key=value, e.g. optim.blr=2e-4")
    tp, prefix = cls, ""
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"bad override {text!r}: '{prefix}' is a value, not a section")
        try:
            tp, prefix = _field(tp, part, prefix)[1], _join(prefix, part)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML: {e}") from None
    return parts, raw if _accepts_str(tp) and value is not None and not isinstance(value, str) else value


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> C:
    """Defaults of `cls` <- YAML file at `path` (with its ``base`` chain) <- `overrides`, checked strictly
    after the file and after all overrides (whose order does not matter: ``--model.arch=var --model.head=categorical``
    passes through an invalid pair); an error names the file, or the first override after which the config
    stopped checking."""

    def build(data: dict, where: str) -> C:
        try:
            return config_from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(where + str(e)) from None

    data = read_yaml(path) if path is not None else {}
    cfg = build(data, f"{path}: " if path is not None else "")
    first_bad = None  # the first override after which the config did not check (another may complete it)
    for text in overrides:
        parts, value = parse_override(text, cls)
        data = _deep_merge(data, functools.reduce(lambda v, p: {p: v}, reversed(parts), value))
        try:
            cfg = build(data, "")
        except ConfigError:
            first_bad = first_bad or text
    if first_bad is not None:  # the final config decides; its error names the first override that broke it
        cfg = build(data, f"override {first_bad!r}: ")
    return cfg


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
