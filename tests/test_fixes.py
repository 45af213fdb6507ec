"""Regressions named in the Models issue: multi-task eval, user BBH benchmarks, strategy placeholders,
non-UTF-8 input, the launcher's rendezvous port, a missing student; and the one model-spec parser."""

import socket

import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records, write_records
from orca2.models import SPEC_FORMS, parse_model
from orca2.testing.loopback import LoopbackServer


def test_model_specs_parse_in_one_place_with_one_error():
    assert parse_model("openai:gpt-4o").id == "openai:gpt-4o" and parse_model("batch:gpt-4o").scheme == "batch"
    assert parse_model("local:default").id == "local:default" and parse_model("program:synthetic").target == "synthetic"
    assert parse_model("runs/x/model", paths=True).scheme == "local"
    for bad in ("gpt-4o", "claude:x", "openai:", "program:other"):
        with pytest.raises(Orca2Error) as info:
            parse_model(bad)
        assert bad in str(info.value)
    with pytest.raises(Orca2Error, match="valid: " + SPEC_FORMS.replace("|", r"\|").replace("(", r"\(")):
        parse_model("claude:x")


def test_eval_of_two_tasks_of_one_benchmark_scores_both(tmp_path, data_dir, monkeypatch):
    from orca2.eval.evaluate import EvalConfig, run

    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with LoopbackServer() as server:
        report = run(
            load_config(
                EvalConfig,
                None,
                (),
                {
                    "model": "openai:loopback",
                    "output": str(tmp_path / "r"),
                    "data_dir": str(data_dir),
                    "limit": 2,
                    "bench": (
                        "bbh/snarks",
                        "bbh/navigate" if (data_dir / "bbh/navigate.json").exists() else "bbh/hyperbaton",
                    ),
                    "client.base_url": server.base_url,
                },
            )
        )
    tasks = report["benchmarks"]["empty"]["tasks"]
    assert len(tasks) == 2 and "bbh/snarks" in tasks and all(t["n"] == 2 for t in tasks.values())
    assert report["benchmarks"]["empty"]["overall"]["bbh"]["tasks"] == 2


def test_a_user_benchmark_with_the_bbh_loader_picks_its_own_task(tmp_path, data_dir):
    from orca2.eval.benchmarks import load_items, load_registry, select

    spec = tmp_path / "mine.yaml"
    spec.write_text(f"mybench:\n  loader: bbh\n  path: {data_dir / 'bbh'}\n")
    registry = load_registry((str(spec),))
    ((bench, task),) = select(registry, ("mybench/snarks",))
    items = load_items(bench, task, data_dir, 3)
    assert len(items) == 3 and {i["task"] for i in items} == {"mybench/snarks"}


def test_program_teacher_recognises_a_strategy_prompt_with_the_task_filled_in(tmp_path):
    from orca2.stages.generate import GenerateConfig, run
    from orca2.stages.tasks import TasksConfig
    from orca2.stages.tasks import run as make_tasks

    strategy = tmp_path / "mine.yaml"
    strategy.write_text(
        "name: task-aware\ndescription: names the task\nsystem_prompt: 'You solve {task} problems, "
        "one step at a time.'\n"
    )
    tasks = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic",), output=str(tasks), per_kind=4))
    # program:synthetic writes no 'task-aware' style, so each task fails — with the error that proves the rendered
    # prompt was recognised (before the fix: "the system prompt is not one of the library's strategies")
    summary = run(
        load_config(
            GenerateConfig,
            None,
            (),
            {
                "tasks": str(tasks),
                "output": str(tmp_path / "t.jsonl"),
                "teacher": "program:synthetic",
                "strategy": "task-aware",
                "strategies": (str(strategy),),
                "allow_failures": True,
            },
        )
    )
    errors = list(read_records(tmp_path / "t.errors.jsonl"))
    assert summary["failed"] == 4 and all(
        "cannot write in the style of strategy 'task-aware'" in e["error"] for e in errors
    )


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_records(path, [{"id": "a", "task": "t", "messages": [{"role": "user", "content": "hi"}]}])
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "task": "t", "messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(Orca2Error, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        list(read_records(path))
    rejected = []
    assert len(list(read_records(path, on_invalid=lambda n, line, exc: rejected.append(n)))) == 1 and rejected == [2]


def test_the_launcher_takes_a_free_rendezvous_port(monkeypatch):
    from orca2.train.launch import launcher_command

    monkeypatch.delenv("MASTER_PORT", raising=False)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29500))  # another job holds DeepSpeed's default port
    except OSError:
        pass  # already held by someone: the point stands
    try:
        command = launcher_command(2, None)
        port = int(command[command.index("--master_port") + 1])
        assert port != 29500
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    finally:
        holder.close()
    monkeypatch.setenv("MASTER_PORT", "31234")
    assert launcher_command(2, None)[-1] == "31234"


def test_a_missing_student_is_reported_before_deepspeed_starts(tmp_path, run_cli, sft_file):
    done = run_cli(
        "train", "--model", str(tmp_path / "nope"), "--data", str(sft_file), "-o", str(tmp_path / "run"), "--nproc", "2"
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model ") and f"{tmp_path / 'nope'}" in last and "no such model folder" in last
    assert "deepspeed" not in done.stderr.lower() and not (tmp_path / "run").exists()
