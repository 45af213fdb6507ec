from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from orca2.config import load_config, parse_override, save_config
from orca2.errors import Orca2Error


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-5
    steps: int = 10


@dataclass(frozen=True)
class Cfg:
    output: str
    n: int = 3
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)
    limit: int | None = None


def test_yaml_flags_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: x.jsonl\nn: 5\ninner:\n  lr: 0.001\n")
    cfg = load_config(Cfg, path, ["inner.steps=7", "inner.lr=2e-5", "names=[a, b]"], {"n": 9, "limit": None})
    assert cfg == Cfg("x.jsonl", 9, "a", ("a", "b"), Inner(2e-5, 7), None)


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: x\ninner:\n  lr: 0.1\n  stepz: 3\n")
    with pytest.raises(Orca2Error, match=r"c.yaml:4: key 'inner.stepz': unknown key \(valid: lr, steps\)"):
        load_config(Cfg, path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("output: x\nn: many\n", r"c.yaml:2: key 'n': must be int"),
        ("output: x\nmode: c\n", r"c.yaml:2: key 'mode': must be one of a, b"),
        ("output: x\nn: true\n", r"key 'n': must be int"),
        ("n: 3\n", r"missing required key 'output'"),
        ("output: [x\n", r"c.yaml:1: invalid YAML|c.yaml:2: invalid YAML"),
        ("- 1\n", r"c.yaml:1: the config must be a mapping"),
    ],
)
def test_bad_values(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(Orca2Error, match=message):
        load_config(Cfg, path)


def test_override_parsing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("lr=2e-5") == ("lr", 2e-5)
    assert parse_override("name=step-by-step") == ("name", "step-by-step")
    with pytest.raises(Orca2Error, match="KEY=VALUE"):
        parse_override("novalue")
    with pytest.raises(Orca2Error, match=r"unknown key"):
        load_config(Cfg, None, ["output=x", "bogus=1"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(Cfg, None, ["output=o.jsonl", "names=[p, q]", "inner.lr=0.5"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["names"] == ["p", "q"]
    assert load_config(Cfg, tmp_path / "saved.yaml") == cfg
