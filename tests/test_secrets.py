"""Secrets have one door: an API key given through a config, `--set` or the environment reaches no file a run
writes (outputs, saved configs, the manifest, summaries, caches, logs) and no config hash."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orca2.config import config_to_dict, save_config
from orca2.models import ClientConfig
from orca2.testing.loopback import LoopbackServer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import child_env  # noqa: E402


def stage_configs() -> list[type]:
    """Every stage config class that carries a client (and so may carry a key)."""
    from orca2.eval.evaluate import EvalConfig
    from orca2.stages.generate import GenerateConfig
    from orca2.stages.instruct import InstructConfig
    from orca2.stages.judge import JudgeConfig
    from orca2.stages.persona import AugmentConfig, InferConfig
    from orca2.stages.sample import SampleConfig
    from orca2.stages.select import SelectConfig

    return [
        EvalConfig,
        GenerateConfig,
        InstructConfig,
        JudgeConfig,
        AugmentConfig,
        InferConfig,
        SampleConfig,
        SelectConfig,
    ]


def with_key(cls: type, key: str):
    required = {
        "EvalConfig": {"model": "program:synthetic", "output": "o"},
        "GenerateConfig": {"tasks": "t", "output": "o", "strategy": "step-by-step", "teacher": "openai:m"},
        "InstructConfig": {"docs": ("d",), "output": "o", "flow": "text-modification"},
        "JudgeConfig": {"replies": ("r",), "output": "o"},
        "AugmentConfig": {"posts": "p", "traits": "t", "output": "o"},
        "InferConfig": {"posts": "p", "output": "o"},
        "SampleConfig": {"tasks": "t", "output": "o", "student": "openai:m"},
        "SelectConfig": {"tasks": "t", "output": "o", "teacher": "openai:m"},
    }[cls.__name__]
    return cls(**required, client=ClientConfig(api_key=key))


@pytest.mark.parametrize("cls", stage_configs(), ids=lambda c: c.__name__)
def test_every_serialised_config_hides_the_key_and_its_hash_ignores_it(cls, tmp_path):
    a, b = with_key(cls, "sk-first-secret-0001"), with_key(cls, "sk-second-secret-0002")
    assert a.client.api_key == "sk-first-secret-0001"  # the config itself still holds it, for the backend
    assert config_to_dict(a) == config_to_dict(b) and config_to_dict(a)["client"]["api_key"] == "***"
    assert "secret" not in repr(a) and "secret" not in json.dumps(config_to_dict(a))
    save_config(a, tmp_path / "saved.yaml")
    assert "secret" not in (tmp_path / "saved.yaml").read_text()
    without = dataclasses.replace(a, client=ClientConfig())
    assert config_to_dict(without)["client"]["api_key"] is None


def files_holding(folders: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


RUN = """
output: {run}
seed: 0
stages: [tasks, select, generate, erase, train, eval, iterate]
tasks: {{sources: ["synthetic:arithmetic,word-problem"], per_kind: 6}}
heldout: {{sources: ["synthetic:arithmetic"], per_kind: 2}}
select:
  teacher: openai:teacher
  candidates: [direct-answer, step-by-step]
  dev_size: 2
  client: {{base_url: "{url}", api_key: "{config_key}"}}
generate: {{teacher: "openai:teacher", client: {{base_url: "{url}"}}}}
erase: {{generic: cautious, verify: "off"}}
train: {{model: "{model}", max_len: 1024, lr: 0.001, warmup_ratio: 0.0, mask_check: 2, max_steps: 1}}
eval:
  base_model: openai:base
  sampling: {{max_tokens: 8}}
  client: {{base_url: "{url}"}}
iterate:
  rounds: 1
  recipe: orca-math
  objective: kto
  prompts_per_round: 4
  sample: {{sampling: {{n: 2, max_tokens: 8}}, client: {{api_key: "{iterate_key}"}}}}
  train: {{max_steps: 1, lr: 0.0005, epochs: 1}}
"""


def test_keys_from_config_set_and_environment_reach_no_file_of_a_run(tmp_path, tiny_model):
    keys = {
        "config": "sk-cfg-5d1e0a7c",
        "set": "sk-set-93b2f4aa",
        "env": "sk-env-77c0e1d9",
        "iterate": "sk-it-c4e81f02",
        "instruct": "sk-ins-0f3a9b61",
        "persona": "sk-per-a81c3e55",
    }
    cache = tmp_path / "cache"
    env = child_env(OPENAI_API_KEY=keys["env"], ORCA2_CACHE_DIR=str(cache))
    with LoopbackServer() as server:
        path = tmp_path / "run.yaml"
        path.write_text(
            RUN.format(
                run=tmp_path / "run",
                url=server.base_url,
                model=tiny_model,
                config_key=keys["config"],
                iterate_key=keys["iterate"],
            )
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "orca2",
                "run",
                "--config",
                str(path),
                "--set",
                f"generate.client.api_key={keys['set']}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.stats.ok > 0
        secrets = list(keys.values())
        assert not [s for s in secrets if s in done.stdout + done.stderr]
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert (
            set(manifest["stages"]) >= {"select", "generate", "eval", "iterate"} and manifest["rounds"]["1"]["sample"]
        )
        # the same run with other keys: every config hash the same, so nothing re-runs
        other = path.read_text().replace(keys["config"], "sk-cfg-other").replace(keys["iterate"], "sk-it-other")
        path.write_text(other)
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "orca2",
                "run",
                "--config",
                str(path),
                "--set",
                "generate.client.api_key=sk-set-other",
            ],
            capture_output=True,
            text=True,
            env={**env, "OPENAI_API_KEY": "sk-env-other"},
            timeout=600,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        rerun = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert rerun["stages"] == manifest["stages"] and rerun["rounds"] == manifest["rounds"]  # seconds too: none ran

        # the agent flows and role-play sections: keys in their client sections
        flows = tmp_path / "flows.yaml"
        docs = tmp_path / "docs"
        docs.mkdir()
        (docs / "a.md").write_text("The Millbrook bridge opened in 1932 after four years of work. " * 4)
        flows.write_text(f"""
output: {tmp_path / "run2"}
stages: [instruct]
instruct: {{docs: ["{docs}"], flow: text-modification, model: "openai:agent", rounds: 0,
           client: {{base_url: "{server.base_url}", api_key: "{keys["instruct"]}"}}}}
""")
        done = subprocess.run(
            [sys.executable, "-m", "orca2", "run", "--config", str(flows)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    persona = tmp_path / "persona.yaml"
    persona.write_text(f"""
output: {tmp_path / "run3"}
stages: [persona]
persona:
  synth: {{users: 3, posts: 10}}
  infer: {{client: {{api_key: "{keys["persona"]}"}}}}
  augment: {{client: {{api_key: "{keys["persona"]}"}}}}
""")
    done = subprocess.run(
        [sys.executable, "-m", "orca2", "run", "--config", str(persona)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert files_holding([tmp_path / "run", tmp_path / "run2", tmp_path / "run3", cache], secrets) == []
    assert files_holding([tmp_path / "run"], ["api_key: '***'"])  # the saved configs say a key was given
