"""The whole chain from one config on a tiny random model: manifest, skipping, re-running, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orca2 import pipeline
from orca2.errors import Orca2Error
from orca2.io import read_records
from orca2.stages import iterate
from orca2.testing.loopback import LoopbackServer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import child_env  # noqa: E402

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
        path = config(teacher="openai:loopback", extra="stages: [tasks, generate, erase]\n")
        text = path.read_text().replace(
            'generate: {teacher: "openai:loopback"}',
            f'generate: {{teacher: "openai:loopback", client: {{base_url: "{server.base_url}", concurrency: 2}}}}',
        )
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


ITERATE = """
iterate:
  rounds: 2
  recipe: orca-math
  objective: kto
  prompts_per_round: 8
  sample: {sampling: {n: 2, max_tokens: 12}}
  train: {max_steps: 2, lr: 0.0005, epochs: 1}
"""


def test_iterate_rounds_manifest_best_round_and_resume_inside_a_round(tmp_path, config, data_dir):
    path = config(extra=ITERATE + "  control: true\n")
    first = pipeline.run(str(path))
    assert first["ran"] == ["tasks", "generate", "erase", "train", "eval", "iterate"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(manifest["rounds"]) == ["1", "2"]
    steps = {"sample", "judge", "pairs", "train", "eval", "control", "control_eval"}
    sft = {r["id"] for r in read_records(tmp_path / "run" / "sft.jsonl")}
    for t in ("1", "2"):
        r, d = manifest["rounds"][t], tmp_path / "run" / "iterate" / f"round-{t}"
        assert set(r) == steps
        # the equal-compute control: as many SFT steps, on the teacher's traces of the round's prompts
        assert r["control"]["counts"]["steps"] == r["train"]["counts"]["steps"] == 2
        assert r["control"]["counts"]["reference_seconds"] == 0 and r["train"]["counts"]["reference_seconds"] > 0
        prompts = {x["id"] for x in read_records(d / "prompts.jsonl")}
        assert {x["id"] for x in read_records(d / "control.jsonl")} == prompts & sft
        control_cfg = json.loads((d / "control" / "summary.json").read_text())
        assert control_cfg["objective"] == "sft"
    assert (tmp_path / "run" / "iterate" / "round-2" / "control" / "model" / "config.json").exists()
    assert set(manifest["iterate"]["control_accuracy_by_round"]) == {"1", "2"}
    report = json.loads((tmp_path / "run" / "iterate" / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["SFT start", "round 1", "control 1", "round 2", "control 2"]
    assert all(r["n"] == 6 for r in report["runs"])  # the held-out items, the same for every model
    assert ("round 2", "control 2") in {(g["model"], g["against"]) for g in report["comparisons"]}
    assert set(report["phases_seconds"]["2"]) == {
        "sample",
        "judge",
        "pairs",
        "reference pass",
        "train",
        "eval",
        "control train",
        "control eval",
    }
    assert (tmp_path / "run" / "iterate" / "report.png").stat().st_size > 0
    assert "McNemar" in (tmp_path / "run" / "iterate" / "report.md").read_text()
    r1, r2 = manifest["rounds"]["1"], manifest["rounds"]["2"]
    assert r1["sample"]["counts"]["prompts"] == 8 and r1["sample"]["counts"]["samples"] == 16
    assert r1["judge"]["counts"]["teacher_replies"] == 8  # the teacher's traces join as replies
    assert r1["pairs"]["counts"]["desirable"] >= 8 and r2["pairs"]["counts"].get("replay_t-1", 0) > 0
    prompts = [
        {r["id"] for r in read_records(tmp_path / "run" / "iterate" / f"round-{t}" / "prompts.jsonl")} for t in (1, 2)
    ]
    assert not prompts[0] & prompts[1]  # a fresh partition each round
    table = manifest["iterate"]["accuracy_by_round"]
    assert set(table) == {"0", "1", "2"} and manifest["iterate"]["best_round"] in (0, 1, 2)
    assert (tmp_path / "run" / "iterate" / "best" / "config.json").exists()
    train_cfg = r2["train"]
    assert train_cfg["counts"]["steps"] == 2
    stored = list((tmp_path / "run" / "iterate" / "round-2").glob("pairs.reference-*.jsonl"))
    header = json.loads(stored[0].read_text().splitlines()[0])["orca2_reference_logps"]
    assert header["reference"].endswith("round-1/student/model")  # DNO's reference: the previous policy

    assert pipeline.run(str(path))["ran"] == []  # nothing changed
    # as if killed after round 2's pairs: its train and eval run again, nothing else
    for step in ("train", "eval"):
        del manifest["rounds"]["2"][step]
    del manifest["stages"]["iterate"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    seconds = {t: {s: manifest["rounds"][t][s]["seconds"] for s in manifest["rounds"][t]} for t in ("1", "2")}
    again = pipeline.run(str(path))
    assert again["ran"] == ["iterate"]
    after = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for t in ("1", "2"):
        for step, value in seconds[t].items():
            assert after["rounds"][t][step]["seconds"] == value  # not re-run
    assert set(after["rounds"]["2"]) == steps
    # other pairs in round 2 (less replay): its pairs, train and eval run again, with new reference log-probs
    path.write_text(
        path.read_text().replace("  control: true\n", "  control: true\n  pairs: {replay_fractions: [0.2]}\n")
    )
    assert pipeline.run(str(path))["ran"] == ["iterate"]
    assert len(list((tmp_path / "run" / "iterate" / "round-2").glob("pairs.reference-*.jsonl"))) == 1


def test_iterate_kill_9_inside_a_round_resumes_without_resampling_or_rejudging(tmp_path, config, data_dir):
    """A real SIGKILL while round 1 trains; the re-run neither samples nor judges again and finishes both rounds.
    With fresh_prompts: the SFT start never saw a round's prompt."""
    path = config(extra=ITERATE + "  fresh_prompts: true\n")
    args = [sys.executable, "-m", "orca2", "run", "--config", str(path)]
    env = child_env()
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    manifest_path = tmp_path / "run" / "manifest.json"

    def round_one_paired():
        try:
            return "pairs" in json.loads(manifest_path.read_text()).get("rounds", {}).get("1", {})
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not round_one_paired():
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the run finished before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = json.loads(manifest_path.read_text())["rounds"]["1"]
    assert "eval" not in before
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    after = json.loads(manifest_path.read_text())
    for step in ("sample", "judge", "pairs"):
        assert after["rounds"]["1"][step]["seconds"] == before[step]["seconds"]  # not redone
    assert set(after["rounds"]["2"]) == {"sample", "judge", "pairs", "train", "eval"}
    assert set(after["iterate"]["accuracy_by_round"]) == {"0", "1", "2"}
    start = {r["id"] for r in read_records(tmp_path / "run" / "sft.start.jsonl")}
    prompts = {
        r["id"] for t in (1, 2) for r in read_records(tmp_path / "run" / "iterate" / f"round-{t}" / "prompts.jsonl")
    }
    assert len(prompts) == 16 and not start & prompts
    assert start | prompts == {r["id"] for r in read_records(tmp_path / "run" / "sft.jsonl")}
    assert after["stages"]["train"]["counts"]["stages"][0]["examples"]["read"] == len(start) == 8


def test_iterate_samples_from_a_served_student(tmp_path, config, data_dir, monkeypatch):
    """iterate.serve: each round starts the server command on π_t, samples through it, and stops it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    serve = f"{sys.executable} -m orca2.testing.loopback --port {{port}}"
    path = config(extra=ITERATE.replace("rounds: 2", "rounds: 1") + f'  serve: "{serve}"\n')
    assert pipeline.run(str(path))["ran"][-1] == "iterate"
    samples = list(read_records(tmp_path / "run" / "iterate" / "round-1" / "samples.jsonl"))
    assert len(samples) == 16 and samples[0]["meta"]["student"].startswith("openai:student-")
    assert (tmp_path / "run" / "iterate" / "round-1" / "server.log").exists()


@pytest.mark.parametrize(
    "name", ["demo.yaml", "loop-demo.yaml", "orca-math-7b/run.yaml", "dno-7b/run.yaml", "persona-demo.yaml"]
)
def test_shipped_run_configs_build_before_any_work(name, tmp_path):
    """Every section of the shipped configs builds (keys, types, models, iterate's steps) and names known strategies."""
    import yaml

    from orca2.strategies import Assignment, Library

    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    built = pipeline.Pipeline(path)
    assert "eval" in built.configs
    library = Library.load()
    if "select" in built.configs:  # the strategies are chosen by select (the demo: by student probes)
        assert built.configs["select"].student is not None or name != "demo.yaml"
        for candidate in built.configs["select"].candidates:
            library.get(candidate)
    elif "assignment" in built.data:
        assignment = tmp_path / "assignment.yaml"
        assignment.write_text(yaml.safe_dump(built.data["assignment"]))
        Assignment.load(assignment, library)


def test_iterate_partitions_are_taken_in_turn(tmp_path, config):
    """iterate.partitions: every task in exactly one partition; round t takes partition (t - 1) mod N."""
    from orca2.io import write_records

    path = config(extra=ITERATE.replace("prompts_per_round: 8", "partitions: 3"))
    run = pipeline.Pipeline(str(path))
    write_records(
        run.paths["tasks"],
        [{"id": f"t{i}", "task": "x", "messages": [{"role": "user", "content": str(i)}]} for i in range(10)],
    )
    rounds = []
    for t in (1, 2, 3, 4):
        iterate.write_prompts(run, run.configs["iterate"], t)
        rounds.append([r["id"] for r in read_records(iterate.round_dir(run, t) / "prompts.jsonl")])
    assert sorted(sum(rounds[:3], [])) == sorted(f"t{i}" for i in range(10))
    assert rounds[3] == rounds[0] and sorted(map(len, rounds[:3])) == [3, 3, 4]
    # the control: the round's learning rate and step count, SFT on the teacher's traces of the round's prompts
    control = iterate.round_config(run, run.configs["iterate"], 1, "control", steps=3)
    assert (control.objective, control.lr, control.max_steps, control.data) == (
        "sft",
        0.0005,
        3,
        (str(iterate.round_dir(run, 1) / "control.jsonl"),),
    )
    # the student samples under the generic prompt erase trained it with
    assert iterate.round_config(run, run.configs["iterate"], 1, "sample").generic == "cautious"
    # the round's sampling is seeded by the run's seed unless iterate.sample.sampling.seed says otherwise
    assert iterate.round_config(run, run.configs["iterate"], 1, "sample").sampling.seed == run.seed
    for override, seed in (("seed=3", 3), ("iterate.sample.sampling.seed=11", 11)):
        other = pipeline.Pipeline(str(path), (override,))
        assert iterate.round_config(other, other.configs["iterate"], 1, "sample").sampling.seed == seed
    empty = pipeline.Pipeline(str(path), ("erase.generic=empty",))
    assert iterate.round_config(empty, empty.configs["iterate"], 1, "sample").generic == "empty"
    with pytest.raises(Orca2Error, match="prompts_per_round or partitions"):
        pipeline.Pipeline(str(config(extra=ITERATE + "  partitions: 2\n")))
    with pytest.raises(Orca2Error, match="fresh_prompts needs prompts_per_round"):
        pipeline.Pipeline(
            str(config(extra=ITERATE.replace("prompts_per_round: 8", "partitions: 3") + "  fresh_prompts: true\n"))
        )
    fresh = pipeline.Pipeline(
        str(config(extra=ITERATE.replace("prompts_per_round: 8", "prompts_per_round: 5") + "  fresh_prompts: true\n"))
    )
    assert fresh.configs["train"].data == (str(fresh.paths["sft_start"]),) and fresh.inputs("train") == [
        fresh.paths["sft_start"]
    ]
    write_records(
        fresh.paths["tasks"],
        [{"id": f"t{i}", "task": "x", "messages": [{"role": "user", "content": str(i)}]} for i in range(10)],
    )
    with pytest.raises(
        Orca2Error,
        match=r"2 rounds × 5 prompts need 10 tasks and more for the SFT start .fresh_prompts.; "
        "the run has 10",
    ):
        iterate.write_sft_start(fresh)


def seeds_of(cfg, where=""):
    """Every seed a resolved config holds — its own and its sampling's — by dotted place."""
    import dataclasses

    if isinstance(cfg, dict):
        return {k: v for name, c in cfg.items() if c is not None for k, v in seeds_of(c, f"{where}{name}.").items()}
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "seed":
            found[where + "seed"] = value
        elif dataclasses.is_dataclass(value) and f.name == "sampling":
            found[f"{where}sampling.seed"] = value.seed
    return found


def test_the_run_seed_reaches_every_section_that_has_one(tmp_path, config):
    """orca2 run --seed N (the `seed` key): every resolved section's seed and sampling seed is N — select, generate
    and eval included — unless the section sets its own."""
    extra = ITERATE + "select: {teacher: program:synthetic, candidates: [direct-answer, step-by-step]}\n"
    path = config(
        extra=extra.replace("iterate:", "stages: [tasks, select, generate, erase, train, eval, iterate]\niterate:")
    )
    run = pipeline.Pipeline(str(path), ("seed=7",))
    found = {k: v for name, cfg in run.configs.items() for k, v in seeds_of(cfg, f"{name}.").items()}
    it = run.configs["iterate"]
    for step in ("sample", "judge", "pairs", "train"):
        found.update(seeds_of(iterate.round_config(run, it, 1, step, steps=1), f"iterate.{step}."))
    assert {
        "select.sampling.seed",
        "generate.sampling.seed",
        "eval.student.sampling.seed",
        "eval.base.sampling.seed",
        "tasks.seed",
        "train.seed",
        "iterate.sample.sampling.seed",
        "iterate.train.seed",
    } <= set(found)
    assert set(found.values()) == {7}, found
    own = pipeline.Pipeline(str(path), ("seed=7", "generate.sampling.seed=2", "train.seed=3"))
    assert own.configs["generate"].sampling.seed == 2 and own.configs["train"].seed == 3
    assert own.configs["select"].sampling.seed == 7


def test_manifest_records_the_environment_and_a_rerun_elsewhere_is_warned(tmp_path, config, caplog):
    """The manifest records what `auto` resolved to, the CPU, torch, BLAS and threads; a re-run whose environment
    differs from the one that made the outputs says so in one line naming what changed."""
    path = config(extra="stages: [tasks]\n")
    pipeline.run(str(path))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    env = manifest["environment"]
    assert {"cpu", "isa", "cores", "torch", "threads", "blas", "auto_dtype", "numeric_env"} <= set(env)
    assert env["auto_dtype"]["cpu"] in ("float32", "bfloat16")
    key = manifest["stages"]["tasks"]["environment"]
    assert manifest["environments"][key] == env
    caplog.clear()
    pipeline.run(str(path))
    assert "another environment" not in caplog.text  # the same machine: no warning
    # the outputs were made on a machine with 7 threads and the other answer to native bf16 than this one's
    native = "avx512_bf16" in env["isa"]
    isa = [f for f in env["isa"] if f != "avx512_bf16"] if native else env["isa"] + ["avx512_bf16"]
    there, here = ("float32", "bfloat16") if native else ("bfloat16", "float32")
    other = {**env, "threads": 7, "isa": isa, "auto_dtype": {"cpu": there}}
    manifest["environments"]["elsewhere"] = other
    manifest["stages"]["tasks"]["environment"] = "elsewhere"
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    result = pipeline.run(str(path))
    assert result["skipped"] == ["tasks"]  # a warning, not a re-run
    lines = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "tasks ran in another environment" in lines[0] and "threads 7 → " in lines[0]
    assert f"auto_dtype {{cpu: {there}}} → {{cpu: {here}}}" in lines[0] and "avx512_bf16" in lines[0]


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def pinned_dtypes(cfg, where):
    """(place, dtype) for every dtype that decides results: a training dtype, and the client dtype of a section
    that runs a local model (its engine computes in it)."""
    import dataclasses

    from orca2.models import parse_model

    found = []
    if isinstance(cfg, dict):
        for name, c in cfg.items():
            if c is not None:
                found += pinned_dtypes(c, f"{where}.{name}")
        return found
    names = {f.name for f in dataclasses.fields(cfg)}
    if "dtype" in names:
        found.append((f"{where}.dtype", cfg.dtype))
    models = [getattr(cfg, n) for n in ("teacher", "model", "student", "judge") if n in names]
    models += [cfg.student.model] if dataclasses.is_dataclass(getattr(cfg, "student", None)) else []
    local = [m for m in models if isinstance(m, str) and parse_model(m, paths=True).scheme == "local"]
    if "client" in names and local:
        found.append((f"{where}.client.dtype", cfg.client.dtype))
    for n in names:
        value = getattr(cfg, n)
        if dataclasses.is_dataclass(value) and n not in ("client", "sampling"):
            found += pinned_dtypes(value, f"{where}.{n}")
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_pins_the_dtypes_that_decide_its_numbers(path, tmp_path):
    """`auto` resolves per machine (bf16 where the CPU computes it natively), so a shipped config never leaves it to
    `auto`: every training dtype and every local model's client dtype is explicit."""
    from orca2.config import load_config, read_yaml
    from orca2.eval.evaluate import EvalConfig
    from orca2.train.trainer import TrainConfig

    data, _ = read_yaml(path)
    if not isinstance(data, dict) or "default" in data or "tasks" in data and "output" not in data:
        pytest.skip("an assignment, not a run config")
    if set(data) <= {*pipeline.SETTINGS, *pipeline.chain()}:
        run = pipeline.Pipeline(str(path), output=str(tmp_path / "run"))
        found = []
        for name, cfg in run.configs.items():
            found += pinned_dtypes(cfg, name)
        if "iterate" in run.configs:
            it = run.configs["iterate"]
            for step in ("sample", "train") + (("control",) if it.control else ()):
                found += pinned_dtypes(iterate.round_config(run, it, 1, step, steps=1), f"iterate.{step}")
    else:
        cls = TrainConfig if "stages" in data or "chat_template" in data else EvalConfig
        found = pinned_dtypes(load_config(cls, path), path.stem)
    assert found, path
    assert not [place for place, dtype in found if dtype == "auto"], found
