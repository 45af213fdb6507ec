import pytest

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.io import read_records, write_records
from orca2.stages.generate import GenerateConfig
from orca2.stages.generate import run as generate
from orca2.stages.select import SelectConfig, dev_slices, run
from orca2.stages.tasks import TasksConfig
from orca2.stages.tasks import run as make_tasks
from orca2.strategies import Assignment, get
from orca2.testing.loopback import LoopbackServer


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
                return f"1. Read the two numbers.\n2. Apply the operation carefully.\nThe answer is: {gold[user]}"
        if system == steps:
            return f"1. Start.\n2. Apply each change.\nThe answer is: {gold[user]}"
        return "The answer is: -1"

    return respond


def test_select_measures_and_assigns(tmp_path, tasks_file, monkeypatch, run_cli):
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with LoopbackServer(responder=teacher_that_prefers(tasks_file)) as server:
        result = run_cli(
            "select",
            "--tasks",
            str(tasks_file),
            "-o",
            str(tmp_path / "assign.yaml"),
            "--teacher",
            "openai:t",
            "--base-url",
            server.base_url,
            "--candidates",
            "direct-answer,step-by-step,explain-then-answer",
            "--dev-size",
            "8",
        )
        assert result.returncode == 0, result.stderr
        assert server.stats.ok == 2 * 3 * 8
        assignment = Assignment.load(tmp_path / "assign.yaml")
        assert assignment.strategy_for("synthetic/word-problem") == "step-by-step"
        assert assignment.strategy_for("synthetic/arithmetic") == "direct-answer"
        table = (tmp_path / "assign.table.md").read_text()
        assert "| synthetic/word-problem | 8 |" in table and "**100%" in table and "0% (" in table
        # generate under the chosen assignment: the 2 × 8 dev responses already paid for are reused
        before = server.stats.ok
        summary = generate(
            load_config(
                GenerateConfig,
                None,
                (),
                {
                    "tasks": str(tasks_file),
                    "output": str(tmp_path / "traces.jsonl"),
                    "teacher": "openai:t",
                    "assign": str(tmp_path / "assign.yaml"),
                    "client.base_url": server.base_url,
                },
            )
        )
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
        run(
            load_config(
                SelectConfig, None, (), {"tasks": str(path), "output": str(tmp_path / "a.yaml"), "teacher": "openai:x"}
            )
        )


# --- student probes -------------------------------------------------------------------------------------

TEACHER = {"a": {"mean_completion_tokens": 50}, "b": {"mean_completion_tokens": 10}, "c": {"mean_completion_tokens": 5}}


def summary(verdicts, logprobs=None, seeds=1):
    """A probe summary from per-item verdicts (1/0, or means over seeds) and answer log-probs."""
    ids = [f"i{k}" for k in range(len(verdicts))]
    logprobs = logprobs or [-1.0] * len(verdicts)
    n = len(ids)
    return {
        "accuracy": sum(verdicts) / n,
        "answer_logprob": sum(logprobs) / n,
        "n": n,
        "seeds": seeds,
        "verdicts": dict(zip(ids, verdicts)),
        "logprobs": dict(zip(ids, logprobs)),
    }


def test_the_paired_rule_on_hand_built_verdicts():
    from orca2.stages.select import decide

    # 24 items: a right on 12 that b misses, b right on 1 that a misses — McNemar p < 0.05: decided
    a = [1] * 12 + [0] * 1 + [1] * 3 + [0] * 8
    b = [0] * 12 + [1] * 1 + [1] * 3 + [0] * 8
    d = decide({"a": summary(a), "b": summary(b)}, TEACHER, ["a", "b"])
    assert d["winner"] == "a" and d["decided"] and d["comparisons"]["b"]["test"] == "McNemar"
    assert (d["comparisons"]["b"]["leader_only"], d["comparisons"]["b"]["other_only"]) == (12, 1)
    assert "vs b 12:1 items, p 0.00" in d["rule"]
    # a leads by one item (8 % vs 4 %, the README's old arithmetic probe): undecided; the leader stands, and the
    # rule says it was not decided — whatever the candidates' order, and whatever the answer log-probs say
    a = [1, 1] + [0] * 22
    b = [1, 0] + [0] * 22
    d = decide({"a": summary(a, [-3.0] * 24), "b": summary(b, [-1.0] * 24)}, TEACHER, ["a", "b"])
    assert not d["decided"] and d["winner"] == "a" and d["rule"].startswith("undecided at the budget")
    assert "vs b 1:0 items, p 1" in d["rule"] and "the leader by accuracy stands" in d["rule"]
    assert decide({"b": summary(b, [-1.0] * 24), "a": summary(a, [-3.0] * 24)}, TEACHER, ["b", "a"])["winner"] == "a"
    # several seeds: per-item means, a paired bootstrap of the mean difference
    a = [1.0, 1.0, 0.5, 1.0] * 6
    b = [0.0, 0.5, 0.0, 0.0] * 6
    d = decide({"a": summary(a, seeds=2), "b": summary(b, seeds=2)}, TEACHER, ["a", "b"])
    assert d["decided"] and d["comparisons"]["b"]["test"] == "paired bootstrap" and d["comparisons"]["b"]["ci95"][0] > 0
    # deciding by answer log-prob: the continuous signal separates what the verdicts cannot
    same = [0] * 24
    d = decide(
        {"a": summary(same, [-2.0 + 0.1 * (k % 3) for k in range(24)]), "b": summary(same, [-2.5] * 24)},
        TEACHER,
        ["a", "b"],
        decide_by="answer_logprob",
    )
    assert d["decided"] and d["winner"] == "a" and d["signal"] == "answer_logprob"
    # a failed probe is out and named; every probe failed is an error
    d = decide(
        {"a": {"failed": "no supervised tokens"}, "b": summary([1] * 24), "c": summary([0] * 24)},
        TEACHER,
        ["a", "b", "c"],
    )
    assert d["winner"] == "b" and d["decided"] and "probe failed: a" in d["rule"]
    with pytest.raises(Orca2Error, match="every probe of this task failed"):
        decide({"a": {"failed": "x"}}, TEACHER, ["a"])


class HandProbes:
    """Probes whose scoring is a table: (strategy, seed) → per-item verdicts and log-probs; counts what is scored."""

    def __new__(cls, verdicts, logprobs, dev_size, max_dev, max_seeds):
        from orca2.stages.select import ProbeConfig, Probes, SelectConfig

        class Scripted(Probes):
            def score(self, name, seed, dev):
                self.meta.setdefault((name, seed), {"traces": 8, "steps": 1, "seconds": 0.0, "cached": False})
                got = self.items.setdefault((name, seed), {})
                for r in dev:
                    if r["id"] not in got:
                        k = int(r["id"][1:])
                        got[r["id"]] = {
                            "correct": bool(verdicts[(name, seed)][k]),
                            "logprob": logprobs[(name, seed)][k],
                        }
                        self.scored.append((name, seed, r["id"]))

        cfg = SelectConfig(
            tasks="t",
            output="o",
            teacher="program:synthetic",
            dev_size=dev_size,
            student=ProbeConfig(model="local:default", max_dev=max_dev, max_seeds=max_seeds),
        )
        dev = [{"id": f"i{k}", "answer": "1", "messages": []} for k in range(max_dev or dev_size)]
        from pathlib import Path

        traces = {("t", name): [] for name, _ in verdicts}
        probes = Scripted(cfg, cfg.student, "t", dev, traces, Path("/nonexistent/probes"), {}, "s", "")
        probes.scored = []
        return probes


def test_escalation_by_hand_more_items_then_more_seeds():
    # 8 items tie; the next 16 favour a: decided after escalating to 24 items, with one seed
    a = [1, 0] * 4 + [1] * 16
    b = [1, 0] * 4 + [0] * 16
    probes = HandProbes({("a", 0): a, ("b", 0): b}, {("a", 0): [-1.0] * 24, ("b", 0): [-1.0] * 24}, 8, 24, 3)
    out, d = probes.escalate(["a", "b"], TEACHER, 0)
    assert d["decided"] and d["winner"] == "a" and d["escalation"] == {"dev_items": 24, "seeds": 1}
    assert len(probes.scored) == 2 * 24 and out["a"]["n"] == 24
    # decided on the first 8 items: nothing more is scored
    a = [1] * 8 + [0] * 16
    b = [0] * 24
    probes = HandProbes({("a", 0): a, ("b", 0): b}, {("a", 0): [-1.0] * 24, ("b", 0): [-1.0] * 24}, 8, 24, 3)
    assert probes.escalate(["a", "b"], TEACHER, 0)[1]["escalation"] == {"dev_items": 8, "seeds": 1}
    assert len(probes.scored) == 2 * 8
    # never decided: 24 items, then seeds 0, 1000 and 2000 (3 probes each); a tie in accuracy: the higher answer
    # log-prob leads, and stands
    flat = [1, 0] * 12
    verdicts = {(n, s): flat for n in "ab" for s in (0, 1000, 2000)}
    logprobs = {(n, s): [-1.0 if n == "b" else -2.0] * 24 for n in "ab" for s in (0, 1000, 2000)}
    probes = HandProbes(verdicts, logprobs, 8, 24, 3)
    out, d = probes.escalate(["a", "b"], TEACHER, 0)
    assert not d["decided"] and d["winner"] == "b" and d["escalation"] == {"dev_items": 24, "seeds": 3}
    assert {(name, seed) for name, seed, _ in probes.scored} == set(verdicts) and out["a"]["seeds"] == 3


def secret_tasks(path, n=40):
    write_records(
        path,
        [
            {
                "id": f"secret/{i}",
                "task": "secret",
                "answer": "blue",
                "meta": {"answer_type": "text"},
                "messages": [{"role": "user", "content": f"Secret question number {i}?"}],
            }
            for i in range(n)
        ],
    )


def test_a_probe_rejects_the_strategy_whose_traces_the_student_cannot_learn_and_reruns_train_nothing(
    tmp_path, tiny_model, monkeypatch
):
    """The teacher is right under both strategies; under step-by-step its traces open with 60 random characters, so
    a student answering in 24 tokens never reaches the answer. Teacher accuracy ties; the probes do not."""
    import random

    from orca2.strategies import Library
    from orca2.train import model as student_module

    loads = []
    real_load = student_module._load_student
    monkeypatch.setattr(student_module, "_load_student", lambda *a: loads.append(a) or real_load(*a))

    library = Library.load()
    direct = library.get("direct-answer").system_text("secret")
    rng = random.Random(0)

    def teacher(body):
        if body["messages"][0]["content"] == direct:
            return "The answer is: blue"
        noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(60))
        return f"{noise}\nThe answer is: blue"

    secret_tasks(tmp_path / "tasks.jsonl")
    with LoopbackServer(teacher) as server:

        def select(**kw):
            flags = {
                "tasks": str(tmp_path / "tasks.jsonl"),
                "output": str(tmp_path / "assign.yaml"),
                "teacher": "openai:teacher",
                "candidates": ("direct-answer", "step-by-step"),
                "dev_size": 8,
                "client.base_url": server.base_url,
                "client.api_key": "x",
                "client.cache_dir": str(tmp_path / "cache"),
                "student.model": str(tiny_model),
                "student.traces": 16,
                "student.steps": 150,
                "student.lr": 0.01,
                "student.max_tokens": 24,
                **kw,
            }
            return run(load_config(SelectConfig, None, ("student.train_layers=null",), flags))  # every layer learns

        report = select()
        assert [a[0] for a in loads].count(
            str(tiny_model)
        ) == 1  # two probes, one load of the student: each trains a copy
        probes = report["probes"]["secret"]
        assert (
            report["table"]["secret"]["direct-answer"]["accuracy"]
            == report["table"]["secret"]["step-by-step"]["accuracy"]
            == 1.0
        )
        assert probes["direct-answer"]["accuracy"] >= 0.75 and probes["step-by-step"]["accuracy"] == 0.0, probes
        assert report["chosen"] == {"secret": "direct-answer"} and report["rules"]["secret"].startswith(
            "best student probe"
        )
        decision = report["decisions"]["secret"]
        assert decision["decided"] and decision["comparisons"]["step-by-step"]["test"] == "McNemar"
        assert probes["direct-answer"]["answer_logprob"] > probes["step-by-step"]["answer_logprob"]
        assert "8 dev items, 1 probe seed(s)" in report["rules"]["secret"]
        assert "student" in (tmp_path / "assign.table.md").read_text() and (tmp_path / "assign.table.png").exists()
        assert not any(
            p.name == "train" for p in (tmp_path / "assign.probes").glob("*/*")
        )  # weights deleted, results kept
        asked = server.stats.ok
        again = select()
        assert all(p["cached"] for p in again["probes"]["secret"].values()) and server.stats.ok == asked
        assert again["chosen"] == report["chosen"]


def test_probe_bad_inputs_fail_in_one_line_before_any_probe(tmp_path, tiny_model):
    secret_tasks(tmp_path / "tasks.jsonl", n=8)
    base = {
        "tasks": str(tmp_path / "tasks.jsonl"),
        "output": str(tmp_path / "assign.yaml"),
        "teacher": "program:synthetic",
        "candidates": ("direct-answer",),
        "dev_size": 8,
        "client.cache_dir": str(tmp_path / "cache"),
        "student.model": str(tiny_model),
    }
    with pytest.raises(Orca2Error, match="leaves no training step"):
        load_config(SelectConfig, None, (), {**base, "student.steps": 0})
    with pytest.raises(Orca2Error, match="is served, and a probe fine-tunes the student"):
        load_config(SelectConfig, None, (), {**base, "student.model": "openai:gpt-4o"})
    with pytest.raises(Orca2Error, match="task 'secret' has no items with gold answers beyond its dev slice"):
        run(load_config(SelectConfig, None, (), base))


def test_probe_inputs_without_gold_or_without_traces_fail_before_any_probe(tmp_path, tiny_model):
    from orca2.io import write_records as write

    secret_tasks(tmp_path / "tasks.jsonl", n=30)
    rows = list(read_records(tmp_path / "tasks.jsonl"))
    write(
        tmp_path / "mixed.jsonl",
        rows
        + [
            {
                "id": "open/0",
                "task": "open",
                "answer": None,
                "messages": [{"role": "user", "content": "Tell me a story."}],
            }
        ],
    )

    def teacher(body):  # right under direct-answer, always wrong under step-by-step
        return "The answer is: blue" if "step" not in body["messages"][0]["content"].lower() else "The answer is: red"

    with LoopbackServer(teacher) as server:
        base = {
            "tasks": str(tmp_path / "tasks.jsonl"),
            "output": str(tmp_path / "assign.yaml"),
            "teacher": "openai:t",
            "candidates": ("direct-answer", "step-by-step"),
            "dev_size": 8,
            "client.base_url": server.base_url,
            "client.api_key": "x",
            "client.cache_dir": str(tmp_path / "cache"),
            "student.model": str(tiny_model),
        }
        with pytest.raises(
            Orca2Error, match="task 'open' has no items with gold answers, so its probes cannot be scored"
        ):
            run(load_config(SelectConfig, None, (), {**base, "tasks": str(tmp_path / "mixed.jsonl")}))
        with pytest.raises(Orca2Error, match="strategy 'step-by-step' has no correct teacher traces for task 'secret'"):
            run(load_config(SelectConfig, None, (), base))
    assert not (tmp_path / "assign.probes").exists()  # no probe started
