"""The worked-solution teacher: correct for every synthetic task type under every strategy, in that strategy's style."""

import pytest

from orca2.answers import is_correct
from orca2.config import load_config
from orca2.eval.usage import classify
from orca2.io import read_records
from orca2.sources.synthetic import GENERATORS
from orca2.stages.generate import GenerateConfig, run
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.strategies import names

STYLE = {
    "direct-answer": "direct",
    "step-by-step": "step-by-step",
    "recall-then-generate": "recall-first",
    "recall-reason-generate": "recall-first",
    "extract-generate": "extract-first",
}


@pytest.mark.parametrize("strategy", names())
def test_every_kind_and_strategy_is_correct_and_in_style(tmp_path, strategy):
    tasks = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic",), output=str(tasks), per_kind=15, seed=4))
    summary = run(
        load_config(
            GenerateConfig,
            None,
            (),
            {
                "tasks": str(tasks),
                "output": str(tmp_path / "t.jsonl"),
                "teacher": "program:synthetic",
                "strategy": strategy,
            },
        )
    )
    traces = list(read_records(tmp_path / "t.jsonl"))
    assert summary["answered"] == 15 * len(GENERATORS) and summary["failed"] == 0
    for t in traces:
        reply = t["messages"][-1]["content"]
        assert is_correct(reply, t["answer"], t["meta"]["answer_type"]), (strategy, t["id"], reply)
        assert t["meta"]["teacher"] == "program:synthetic"
        expected = STYLE.get(strategy)
        if expected and not (expected == "step-by-step" and len(t["meta"]["synthetic"]["steps"]) < 2):
            assert classify(reply) == expected, (strategy, reply)


def test_non_synthetic_tasks_are_refused_with_a_reason(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a", "task": "t", "messages": [{"role": "user", "content": "q"}], "answer": "1"}\n')
    summary = run(
        load_config(
            GenerateConfig,
            None,
            (),
            {
                "tasks": str(tasks),
                "output": str(tmp_path / "t.jsonl"),
                "teacher": "program:synthetic",
                "strategy": "step-by-step",
                "allow_failures": True,
            },
        )
    )
    assert summary["failed"] == 1
    error = next(read_records(tmp_path / "t.errors.jsonl"))["error"]
    assert "only answers built-in synthetic tasks" in error


def test_a_mixed_assignment_teaches_one_task_under_several_strategies(tmp_path):
    from orca2.strategies import Assignment

    tasks = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:word-problem",), output=str(tasks), per_kind=40, seed=1))
    (tmp_path / "assign.yaml").write_text("default: [direct-answer, step-by-step]\n")
    summary = run(
        load_config(
            GenerateConfig,
            None,
            (),
            {
                "tasks": str(tasks),
                "output": str(tmp_path / "t.jsonl"),
                "teacher": "program:synthetic",
                "assign": str(tmp_path / "assign.yaml"),
            },
        )
    )
    assignment = Assignment.load(tmp_path / "assign.yaml")
    traces = list(read_records(tmp_path / "t.jsonl"))
    assert (
        set(summary["by_strategy"]) == {"direct-answer", "step-by-step"} and sum(summary["by_strategy"].values()) == 40
    )
    for t in traces:
        assert t["meta"]["strategy"] == assignment.strategy_for(t["task"], t["id"])
        assert classify(t["messages"][-1]["content"]) == STYLE[t["meta"]["strategy"]]
