"""Configuration files (YAML or TOML), command-line overrides (`key=value`, `a.b=3`) and merging.

Values are parsed as YAML scalars with one fix: PyYAML follows YAML 1.1, where `1e-3` and `1.5e3` are
strings; here every literal that reads as a float (`1e-3`, `1E5`, `.5`, `-2.5e+3`, `inf`, `nan`) is a float,
in files and in overrides alike.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "apply_overrides", "load_config", "merge", "parse_value"]

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
