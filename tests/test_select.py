import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.stages.generate import GenerateConfig
from orca2.stages.generate import run as generate
from orca2.io import read_records
from orca2.testing.loopback import LoopbackServer
from orca2.stages.select import SelectConfig, dev_slices, run
from orca2.strategies import Assignment, get
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    make_tasks(TasksConfig(sources=("synthetic:arithmetic,word-problem",), output=str(path), per_kind=12))
    return path


def teacher_that_prefers(tasks_file):
    """Right on word problems only when told to go step by step; right on arithmetic under both strategies,
    but verbose under step-by-step (so the cheaper direct answer should win the tie)."""
    gold = {r["messages"][0]["content"]: r["answer"] for r in read_records(tasks_file)}
    steps = get("step-by-step").system_text()
    direct = get("direct-answer").system_text()

    def respond(body):
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if user.startswith("What is"):
            if system == direct:
                return gold[user]
            if system == steps:
                return "1. Read the two numbers.\n2. Apply the operation carefully.\n" f"The answer is: {gold[user]}"
        if system == steps:
            return f"1. Start.\n2. Apply each change.\nThe answer is: {gold[user]}"
        return "The answer is: -1"

    return respond


def test_select_measures_and_assigns(tmp_path, tasks_file, monkeypatch, run_cli):
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with LoopbackServer(responder=teacher_that_prefers(tasks_file)) as server:
        result = run_cli("select", "--tasks", str(tasks_file), "-o", str(tmp_path / "assign.yaml"), "--teacher", "openai:t",
                         "--base-url", server.base_url, "--candidates", "direct-answer,step-by-step,explain-then-answer",
                         "--dev-size", "8")
        assert result.returncode == 0, result.stderr
        assert server.stats.ok == 2 * 3 * 8
        assignment = Assignment.load(tmp_path / "assign.yaml")
        assert assignment.strategy_for("synthetic/word-problem") == "step-by-step"
        assert assignment.strategy_for("synthetic/arithmetic") == "direct-answer"
        table = (tmp_path / "assign.table.md").read_text()
        assert "| synthetic/word-problem | 8 |" in table and "**100%" in table and "0% (" in table
        # generate under the chosen assignment: the 2 × 8 dev responses already paid for are reused
        before = server.stats.ok
        summary = generate(load_config(GenerateConfig, None, (), {
            "tasks": str(tasks_file), "output": str(tmp_path / "traces.jsonl"), "teacher": "openai:t",
            "assign": str(tmp_path / "assign.yaml"), "client.base_url": server.base_url}))
        assert summary["cached_at_start"] == 16 and server.stats.ok - before == 24 - 16


def test_dev_slices_are_seeded_and_bounded(tasks_file):
    slices, no_answer = dev_slices(str(tasks_file), 5, seed=0)
    assert no_answer == 0 and {len(v) for v in slices.values()} == {5}
    again, _ = dev_slices(str(tasks_file), 5, seed=0)
    other, _ = dev_slices(str(tasks_file), 5, seed=1)
    ids = lambda s: [r["id"] for v in s.values() for r in v]  # noqa: E731
    assert ids(slices) == ids(again) and ids(slices) != ids(other)


def test_select_without_gold_answers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "task": "t", "messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(Orca2Error, match="no task records with gold answers"):
        run(load_config(SelectConfig, None, (), {"tasks": str(path), "output": str(tmp_path / "a.yaml"), "teacher": "openai:x"}))
