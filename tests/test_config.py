"""Config files, overrides and merging."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mbbo.config import ConfigError, apply_overrides, load_config, merge, parse_value

YAML_TEXT = """\
algorithm: bsvrb
lr: 1e-3
beta: 0.9
steps: 100
nested:
  tol: 1E-8
  sizes: [1, 2]
  flag: true
"""

TOML_TEXT = """\
algorithm = "bsvrb"
lr = 1e-3
[nested]
tol = 1e-8
sizes = [1, 2]
flag = true
"""


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(YAML_TEXT)
    config = load_config(path)
    assert config == {
        "algorithm": "bsvrb",
        "lr": 1e-3,
        "beta": 0.9,
        "steps": 100,
        "nested": {"tol": 1e-8, "sizes": [1, 2], "flag": True},
    }
    assert isinstance(config["lr"], float)
    assert isinstance(config["steps"], int)


def test_load_toml_and_yml(tmp_path: Path) -> None:
    toml_path = tmp_path / "exp.toml"
    toml_path.write_text(TOML_TEXT)
    assert load_config(toml_path) == {
        "algorithm": "bsvrb",
        "lr": 1e-3,
        "nested": {"tol": 1e-8, "sizes": [1, 2], "flag": True},
    }
    yml_path = tmp_path / "exp.yml"
    yml_path.write_text("")
    assert load_config(yml_path) == {}


def test_load_errors(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "exp.ini"
    bad_suffix.write_text("{}")
    with pytest.raises(ConfigError, match=r"exp\.ini.*unknown config file suffix '\.ini'"):
        load_config(bad_suffix)
    with pytest.raises(FileNotFoundError, match=r"absent\.yaml"):
        load_config(tmp_path / "absent.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad_yaml)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('a = 1\nb = = 2\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML.*line 2"):
        load_config(bad_toml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(scalar)


def test_yaml_error_line_is_the_offending_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: 2\nc: d: e\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3:"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("-7", -7),
        ("1e-3", 1e-3),
        ("1E5", 1e5),
        ("2.5e+3", 2500.0),
        ("-1.5e-2", -0.015),
        (".5", 0.5),
        ("0.1", 0.1),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ("[1e-3, 2]", [1e-3, 2]),
        ("{a: 1}", {"a": 1}),
        ("bsvrb_v2", "bsvrb_v2"),
        ("runs/demo", "runs/demo"),
        ("'3'", "3"),
        ("1_000", 1000),
    ],
)
def test_parse_value(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_value_special_floats() -> None:
    assert parse_value(".inf") == math.inf
    assert parse_value("-.inf") == -math.inf
    assert math.isnan(parse_value(".nan"))
    # the spellings users type (the module docstring promises them): floats, not strings
    assert math.isnan(parse_value("nan")) and math.isnan(parse_value("NaN"))
    assert parse_value("inf") == math.inf and parse_value("-inf") == -math.inf
    assert parse_value("information") == "information" and parse_value("none") == "none"
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_value("[1, 2")


def test_yaml_key_given_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nnested:\n  a: 1\n  a: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: .*key 'a' is given twice \(lines 3 and 4\)"):
        load_config(path)


def test_non_utf8_config_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"lr: 0.1\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not UTF-8 text \(byte 0xe9"):
        load_config(path)


def test_apply_overrides_nested_and_does_not_mutate() -> None:
    config = {"lr": 0.1, "nested": {"tol": 1e-8, "keep": "x"}}
    result = apply_overrides(config, ["lr=1e-3", "nested.tol=1e-6", "a.b.c=3", "flag=true", "ids=[1,2]"])
    assert result == {
        "lr": 1e-3,
        "nested": {"tol": 1e-6, "keep": "x"},
        "a": {"b": {"c": 3}},
        "flag": True,
        "ids": [1, 2],
    }
    assert config == {"lr": 0.1, "nested": {"tol": 1e-8, "keep": "x"}}


def test_apply_overrides_flat_dotted_key_and_later_wins() -> None:
    assert apply_overrides({"a.b": 1}, ["a.b=2"]) == {"a.b": 2}
    assert apply_overrides({}, ["x=1", "x=2"]) == {"x": 2}
    assert apply_overrides({}, ["name=a=b"]) == {"name": "a=b"}


def test_apply_overrides_errors() -> None:
    with pytest.raises(ConfigError, match=r"'lr0\.1' must have the form key=value"):
        apply_overrides({}, ["lr0.1"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["a..b=3"])
    with pytest.raises(ConfigError, match=r"'lr\.x=3': 'lr' is a float, not a mapping"):
        apply_overrides({"lr": 0.1}, ["lr.x=3"])
    with pytest.raises(ConfigError, match=r"override 'ids=\[1,2'"):
        apply_overrides({}, ["ids=[1,2"])
    with pytest.raises(TypeError, match="single string"):
        apply_overrides({}, "lr=1")  # type: ignore[arg-type]


def test_merge_later_wins_and_nests() -> None:
    defaults = {"lr": 0.1, "nested": {"tol": 1e-8, "maxiter": 10}, "seed": 0}
    file_config = {"lr": 0.01, "nested": {"tol": 1e-6}}
    merged = merge(defaults, file_config, ["seed=3", "nested.maxiter=20"])
    assert merged == {"lr": 0.01, "nested": {"tol": 1e-6, "maxiter": 20}, "seed": 3}
    assert defaults == {"lr": 0.1, "nested": {"tol": 1e-8, "maxiter": 10}, "seed": 0}
    assert file_config == {"lr": 0.01, "nested": {"tol": 1e-6}}
    assert merge(defaults, None, {"nested": {"tol": 1.0}})["nested"] == {"tol": 1.0, "maxiter": 10}
    assert merge(defaults, {"nested": 5}) == {"lr": 0.1, "nested": 5, "seed": 0}


def test_merge_does_not_alias_inputs() -> None:
    file_config = {"nested": {"sizes": [1, 2]}}
    merged = merge({}, file_config)
    merged["nested"]["sizes"].append(3)
    assert file_config == {"nested": {"sizes": [1, 2]}}


def test_a_runs_config_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"task": "quadratic", "hyper": {"lr": 1e-05, "gamma": NaN}, "runner": {"iterations": 3}}')
    loaded = load_config(path)
    assert loaded["hyper"]["lr"] == 1e-5 and math.isnan(loaded["hyper"]["gamma"])
    assert loaded["runner"]["iterations"] == 3
