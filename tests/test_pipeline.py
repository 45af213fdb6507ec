"""The whole chain from one config on a tiny random model: manifest, skipping, re-running, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orca2 import pipeline
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.testing.loopback import LoopbackServer

CONFIG = """
output: {run}
seed: 0
assignment:
  default: step-by-step
  tasks: {{synthetic/arithmetic: direct-answer}}
tasks: {{sources: ["synthetic:arithmetic,word-problem"], per_kind: 12}}
heldout: {{sources: ["synthetic:arithmetic,word-problem"], per_kind: 3}}
generate: {{teacher: "{teacher}"}}
erase: {{generic: cautious}}
train: {{model: "{model}", max_len: 1024, lr: 0.001, warmup_ratio: 0.0, mask_check: 2}}
eval:
  base_model: "{model}"
  base_system: ["strategy:step-by-step"]
  system: [cautious]
  sampling: {{max_tokens: 8}}
"""


@pytest.fixture
def config(tmp_path, tiny_model):
    def write(teacher="program:synthetic", extra=""):
        path = tmp_path / "pipeline.yaml"
        path.write_text(CONFIG.format(run=tmp_path / "run", teacher=teacher, model=tiny_model) + extra)
        return path
    return write


def test_all_stages_then_skip_then_partial_rerun(tmp_path, config, data_dir):
    path = config()
    first = pipeline.run(str(path))
    assert first["ran"] == ["tasks", "generate", "erase", "train", "eval"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for name in first["ran"]:
        entry = manifest["stages"][name]
        assert entry["config_hash"] and entry["outputs"] and entry["seconds"] >= 0 and entry["counts"]
    assert manifest["stages"]["erase"]["counts"]["read"] == 24 and "torch" in manifest["packages"]
    assert manifest["stages"]["generate"]["inputs"]  # hashes of tasks.jsonl and assignment.yaml
    assert (tmp_path / "run" / "eval" / "compare.md").exists()
    report = json.loads((tmp_path / "run" / "eval" / "student" / "report.json").read_text())
    assert set(report["benchmarks"]["cautious"]["tasks"]) == {"synthetic/arithmetic", "synthetic/word-problem"}

    assert pipeline.run(str(path))["ran"] == []  # nothing changed: everything skipped
    # one parameter of erase changes: erase and everything after it re-run, nothing before
    again = pipeline.run(str(path), ("erase.generic=empty",))
    assert again["ran"] == ["erase", "train", "eval"] and again["skipped"] == ["tasks", "generate"]
    sft = next(read_records(tmp_path / "run" / "sft.jsonl"))
    assert sft["messages"][0]["content"] == ""
    # a stage output deleted by hand is noticed and remade
    (tmp_path / "run" / "sft.jsonl").unlink()
    assert pipeline.run(str(path), ("erase.generic=empty",))["ran"][0] == "erase"
    assert pipeline.run(str(path), ("erase.generic=empty",), from_stage="train")["ran"] == ["train", "eval"]


def test_bad_configs_fail_before_any_work(tmp_path, config):
    path = config(extra="colour: blue\n")
    with pytest.raises(Orca2Error, match=r"pipeline.yaml:\d+: unknown key 'colour'"):
        pipeline.run(str(path))
    path = config()
    with pytest.raises(Orca2Error, match=r"unknown stage 'distill'"):
        pipeline.run(str(path), ("stages=[tasks, distill]",))
    with pytest.raises(Orca2Error, match=r"key 'erase.genric': unknown key"):
        pipeline.run(str(path), ("erase.genric=empty",))
    with pytest.raises(Orca2Error, match=r"train.model: model '/nowhere/model': no such model folder"):
        pipeline.run(str(path), ("train.model=/nowhere/model",))
    with pytest.raises(Orca2Error, match=r"key 'generate.output' is set by the pipeline"):
        pipeline.run(str(path), ("generate.output=x.jsonl",))
    assert not (tmp_path / "run").exists()


def test_failure_names_the_stage_and_keeps_earlier_outputs(tmp_path, config, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = config(teacher="openai:loopback")
    with pytest.raises(Orca2Error, match=r"stage 'generate' failed: model openai:loopback: no API key"):
        pipeline.run(str(path))
    assert (tmp_path / "run" / "tasks.jsonl").exists()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"].keys() == {"tasks"}


def test_kill_mid_stage_and_rerun_completes(tmp_path, config, monkeypatch):
    """A real teacher server, a real SIGKILL during generation; the re-run loses and duplicates nothing."""
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    from orca2.testing.loopback import Faults

    with LoopbackServer(faults=Faults(latency=0.1)) as server:
        path = config(teacher="openai:loopback",
                      extra="stages: [tasks, generate, erase]\n")
        text = path.read_text().replace('generate: {teacher: "openai:loopback"}',
                                        f'generate: {{teacher: "openai:loopback", client: {{base_url: "{server.base_url}", concurrency: 2}}}}')
        path.write_text(text)
        args = [sys.executable, "-m", "orca2", "run", "--config", str(path)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = tmp_path / "run" / "cache" / "responses.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and not (cache.exists() and len(cache.read_bytes().splitlines()) >= 6):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "run" / "traces.jsonl").exists()
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "skipped (unchanged): tasks" in done.stdout
    traces = [r["id"] for r in read_records(tmp_path / "run" / "traces.jsonl")]
    tasks = [r["id"] for r in read_records(tmp_path / "run" / "tasks.jsonl")]
    assert traces == tasks
