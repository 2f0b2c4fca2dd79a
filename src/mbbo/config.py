"""Configuration files (YAML or TOML), command-line overrides (`key=value`, `a.b=3`) and merging.

Values are parsed as YAML scalars with one fix: PyYAML follows YAML 1.1, where `1e-3` and `1.5e3` are
strings; here every literal that reads as a float (`1e-3`, `1E5`, `.5`, `-2.5e+3`, `inf`, `nan`) is a float,
in files and in overrides alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "coerce_fields",
    "coerce_value",
    "field_types",
    "load_config",
    "merge",
    "parse_value",
]

YAML_SUFFIXES = (".yaml", ".yml")
TOML_SUFFIXES = (".toml",)
JSON_SUFFIXES = (".json",)  # a run's config.json


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names it."""


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with a float resolver that also accepts `1e-3`-style literals."""


_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.?(?:inf|Inf|INF)
        |\.?(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)

# Replace the inherited float resolver (copy the table so SafeLoader itself is left untouched).
_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789.iInN"))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys must be unique: a key given twice is an error naming both lines."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str) -> Any:
    """Parse YAML text with the float-aware safe loader."""
    return yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader


def _parse_yaml_file(path: Path, text: str) -> Any:
    """Parse a YAML file, naming the file and the line in errors."""
    try:
        return _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc


def _parse_toml_file(path: Path, text: str) -> Any:
    """Parse a TOML file; tomllib's message already gives the line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `.yaml`/`.yml` or `.toml` file into a (possibly nested) dict; an empty YAML file gives `{}`.

    Raises:
        FileNotFoundError: no file at `path`.
        ConfigError: unknown suffix, a parse error (with the line where the parser gives it), or a top
            level that is not a mapping.
    """
    source = Path(path)
    suffix = source.suffix.lower()
    if suffix not in YAML_SUFFIXES + TOML_SUFFIXES + JSON_SUFFIXES:
        allowed = ", ".join(YAML_SUFFIXES + TOML_SUFFIXES + JSON_SUFFIXES)
        raise ConfigError(
            f"{source}: unknown config file suffix {source.suffix!r} (expected one of {allowed})"
        )
    if not source.is_file():
        raise FileNotFoundError(f"no config file at {source}")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save the file as UTF-8") from exc
    if suffix in TOML_SUFFIXES:
        data = _parse_toml_file(source, text)
    else:  # JSON is YAML (flow style), and this parser refuses duplicate keys and names the line
        data = _parse_yaml_file(source, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse one override value as a YAML scalar/flow value: `3` -> 3, `1e-3` -> 0.001, `true` -> True,
    `[1, 2]` -> [1, 2], `null` -> None, anything else -> the string itself."""
    try:
        return _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {text!r}: {getattr(exc, 'problem', None) or exc}") from exc


def _split_override(override: str) -> tuple[str, str]:
    """Split `key=value` at the first `=`, validating the key."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must have the form key=value")
    key, _, value = override.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key or key component")
    return key, value.strip()


def _set_path(config: dict[str, Any], key: str, value: Any, override: str) -> None:
    """Set `config[key]`, where a dotted key walks (and creates) nested dicts.

    A literal dotted key already present at the top level (a flat config) is set as is.
    """
    if key in config:
        config[key] = value
        return
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {prefix!r} is a {type(child).__name__}, not a mapping")
        node = child
    node[leaf] = value


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of `config` with each `key=value` (or `a.b.c=value`) override applied in order.

    Raises:
        ConfigError: an override without `=`, with an empty key, whose value does not parse, or whose path
            crosses a non-mapping value. The message names the override.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    result = copy.deepcopy(dict(config))
    for override in overrides:
        key, text = _split_override(override)
        try:
            value = parse_value(text)
        except ConfigError as exc:
            raise ConfigError(f"override {override!r}: {exc}") from exc
        _set_path(result, key, value, override)
    return result


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` in place: nested mappings merge, every other value replaces."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def merge(
    defaults: Mapping[str, Any],
    file_config: Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Combine configuration layers, later winning: defaults < file config < overrides.

    Nested mappings are merged key by key. `overrides` is either a list of `key=value` strings (see
    :func:`apply_overrides`) or a mapping merged like the file config. The inputs are not modified.
    """
    result = _deep_merge(copy.deepcopy(dict(defaults)), file_config or {})
    if isinstance(overrides, Mapping):
        return _deep_merge(result, overrides)
    return apply_overrides(result, overrides)


# ---------------------------------------------------------------------------------------------------------
# typed values (settings, hyper-parameters and run options come from YAML/TOML/the command line;
# checked and converted here for the CLI and the task registry)
# ---------------------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every dataclass field of `cls` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _type_name(annotation: Any) -> str:
    """A short readable name of a type annotation: `float`, `int | None`, `float | str`."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    members = _union_members(annotation)
    if len(members) > 1:
        return " | ".join(_type_name(member) for member in members)
    return str(annotation)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (`X | Y`, `Optional[X]`), or the annotation alone."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


_NO_MATCH = object()


def _coerce_member(value: Any, member: Any) -> Any:
    """`value` as type `member`, or `_NO_MATCH`. Ints are accepted for floats, integral floats for ints."""
    if member is Any:
        return value
    if member is type(None):
        return None if value is None else _NO_MATCH
    if member is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if isinstance(value, bool):
        return _NO_MATCH
    if member is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return _NO_MATCH
    if member is float:
        return float(value) if isinstance(value, int | float) else _NO_MATCH
    if member is str:
        return value if isinstance(value, str) else _NO_MATCH
    if typing.get_origin(member) is tuple:
        return _coerce_tuple(value, typing.get_args(member))
    if isinstance(member, type):
        return value if isinstance(value, member) else _NO_MATCH
    return value  # an annotation we cannot check (e.g. a generic): leave it to the owner's validation


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> Any:
    """A list or tuple as a tuple of the annotated item types (`tuple[float, float]`, `tuple[int, ...]`)."""
    if not isinstance(value, list | tuple):
        return _NO_MATCH
    items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if not args:
        return tuple(value)
    if len(items) != len(value):
        return _NO_MATCH
    converted = [_first_match(item, annotation) for item, annotation in zip(value, items, strict=True)]
    return _NO_MATCH if any(c is _NO_MATCH for c in converted) else tuple(converted)


def _first_match(value: Any, annotation: Any) -> Any:
    """`value` converted to the first fitting member of `annotation`, or `_NO_MATCH`."""
    for member in _union_members(annotation):
        converted = _coerce_member(value, member)
        if converted is not _NO_MATCH:
            return converted
    return _NO_MATCH


def coerce_value(name: str, value: Any, annotation: Any, *, what: str = "setting") -> Any:
    """Check `value` against a field annotation and convert it where that is lossless.

    Ints are accepted for float fields (`lr=1` -> 1.0), integral floats for int fields (`iterations=1e4` ->
    10000); bools are never numbers. Union members are tried in order (`float | str`: a number, else a string).

    Raises:
        ValueError: the value does not fit; the message names `what`, `name`, the expected type and the value.
    """
    converted = _first_match(value, annotation)
    if converted is not _NO_MATCH:
        return converted
    raise ValueError(
        f"bad value for {what} {name!r}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
    )


def coerce_fields(cls: type, values: Mapping[str, Any], *, what: str = "setting") -> dict[str, Any]:
    """Type-check `values` against the dataclass fields of `cls` (see :func:`coerce_value`).

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or a value of the wrong type.
    """
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {sorted(types_)}")
    return {key: coerce_value(key, value, types_[key], what=what) for key, value in values.items()}
