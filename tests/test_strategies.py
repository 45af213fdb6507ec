import dataclasses

import pytest

from orca2 import strategies
from orca2.errors import Orca2Error
from orca2.prompts import GENERIC_NAMES, PROMPTS_DIR, generic_prompt, read_prompt, render_template, template_fields
from orca2.strategies import Assignment, Library, load_strategies

REQUIRED = {
    "direct-answer",
    "step-by-step",
    "explain-then-answer",
    "recall-then-generate",
    "recall-reason-generate",
    "extract-generate",
}
CAUTIOUS = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. You carefully "
    "follow instructions. You are helpful and harmless and you follow ethical guidelines and promote positive behavior."
)


def test_library_has_the_required_strategies():
    assert REQUIRED <= set(strategies.names())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_strategy_renders(name):
    strategy = strategies.get(name)
    messages = strategies.render_messages(name, "What is 6 x 7?", task="synthetic/arithmetic")
    assert messages[1] == {"role": "user", "content": "What is 6 x 7?"}
    system = messages[0]["content"]
    assert system.startswith(strategy.system_prompt) and "{" not in system
    if strategy.answer_format:
        assert system.endswith(strategy.answer_format)
    assert len(strategy.description) > 20


def test_strategy_prompts_differ():
    texts = [strategies.get(n).system_prompt for n in strategies.names()]
    assert len(set(texts)) == len(texts)


def test_every_shipped_prompt_file_renders():
    files = sorted(PROMPTS_DIR.rglob("*.txt"))
    assert files
    for path in files:
        text = read_prompt(path.relative_to(PROMPTS_DIR).as_posix())
        values = {name: f"<{name}>" for name in template_fields(text)}
        rendered = render_template(text, source=str(path), **values)
        for name in values:
            assert f"<{name}>" in rendered


def test_generic_prompts():
    assert generic_prompt("cautious") == CAUTIOUS
    assert generic_prompt("empty") == ""
    assert set(GENERIC_NAMES) == {"cautious", "empty"}
    with pytest.raises(Orca2Error, match="valid: cautious, empty"):
        generic_prompt("polite")


def test_generic_prompt_from_user_file(tmp_path):
    (tmp_path / "mine.txt").write_text("You are a careful tutor.\n")
    assert generic_prompt(str(tmp_path / "mine.txt")) == "You are a careful tutor."


def test_strict_templates():
    assert render_template("Q: {question}", question="x") == "Q: x"
    assert render_template("literal {{braces}}") == "literal {braces}"
    with pytest.raises(Orca2Error, match=r"no value for placeholder \{question\}"):
        render_template("Q: {question}")
    with pytest.raises(Orca2Error, match="has no placeholder"):
        render_template("Q", question="x")
    with pytest.raises(Orca2Error, match="plain name"):
        template_fields("{a.b}")


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(Orca2Error) as exc:
        strategies.get("think-hard")
    assert "unknown strategy 'think-hard'" in str(exc.value)
    for name in REQUIRED:
        assert name in str(exc.value)


def test_user_strategies_from_file_and_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.yaml").write_text(
        "name: socratic\ndescription: Ask and answer sub-questions first.\n"
        "system_prompt: Ask yourself the sub-questions for {task}, answer each, then conclude.\n"
    )
    (tmp_path / "many.yaml").write_text(
        "- name: terse\n  description: Very short answers.\n  system_prompt: Be terse.\n"
        "- name: step-by-step\n  description: Replaced.\n  system_prompt: My own steps.\n"
    )
    lib = Library.load([folder, tmp_path / "many.yaml"])
    assert {"socratic", "terse"} <= set(lib.names())
    assert lib.get("step-by-step").system_prompt == "My own steps."  # a user file may replace a built-in
    assert "for gsm8k," in lib.get("socratic").system_text(task="gsm8k")


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\ndescription: d\n", "field 'system_prompt'"),
        ("name: x\ndescription: d\nsystem_prompt: p\ncolour: red\n", "unknown key 'colour'"),
        ("name: Bad Name\ndescription: d\nsystem_prompt: p\n", "field 'name'"),
        ("name: x\ndescription: d\nsystem_prompt: 'use {tool}'\n", r"placeholder \{tool\}"),
    ],
)
def test_invalid_user_strategy(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(Orca2Error, match=message) as exc:
        load_strategies([path])
    assert str(path) in str(exc.value)


def test_duplicate_user_strategy(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("name: twin\ndescription: d\nsystem_prompt: p\n")
    with pytest.raises(Orca2Error, match="already defined"):
        load_strategies([tmp_path])


def test_assignment_globs_first_match_and_default(tmp_path):
    path = tmp_path / "assign.yaml"
    path.write_text(
        "default: direct-answer\ntasks:\n  gsm8k: step-by-step\n  'bbh/logical_*': recall-reason-generate\n"
        "  'bbh/*': explain-then-answer\n"
    )
    assignment = Assignment.load(path)
    assert assignment.strategy_for("gsm8k") == "step-by-step"
    assert assignment.strategy_for("bbh/logical_deduction_five_objects") == "recall-reason-generate"
    assert assignment.strategy_for("bbh/snarks") == "explain-then-answer"
    assert assignment.strategy_for("synthetic/arithmetic") == "direct-answer"
    (tmp_path / "again.yaml").write_text(assignment.to_yaml())
    assert Assignment.load(tmp_path / "again.yaml").rules == assignment.rules


def test_assignment_errors_name_file_line_and_valid_names(tmp_path):
    path = tmp_path / "assign.yaml"
    path.write_text("tasks:\n  gsm8k: step-by-step\n  bbh/*: think-harder\n")
    with pytest.raises(
        Orca2Error,
        match=r"assign.yaml:3: field 'tasks.bbh/\*': unknown strategy 'think-harder' \(valid: .*step-by-step",
    ):
        Assignment.load(path)
    path.write_text("tasks:\n  gsm8k: step-by-step\n")
    with pytest.raises(Orca2Error, match="no pattern matches task 'bbh/snarks'"):
        Assignment.load(path).strategy_for("bbh/snarks")
    path.write_text("defaults: step-by-step\n")
    with pytest.raises(Orca2Error, match=r"assign.yaml:1: unknown key 'defaults'"):
        Assignment.load(path)


def test_assignment_mix_spreads_a_task_over_strategies_by_record_id(tmp_path):
    path = tmp_path / "assign.yaml"
    path.write_text("default: [direct-answer, step-by-step]\ntasks:\n  gsm8k: step-by-step\n")
    assignment = Assignment.load(path)
    picks = [assignment.strategy_for("synthetic/word-problem", f"item-{i}") for i in range(1000)]
    assert set(picks) == {"direct-answer", "step-by-step"} and 450 <= picks.count("direct-answer") <= 550
    again = Assignment.load(path)  # the same record gets the same strategy in every run
    assert picks == [again.strategy_for("synthetic/word-problem", f"item-{i}") for i in range(1000)]
    assert assignment.strategy_for("gsm8k", "item-1") == "step-by-step"
    (tmp_path / "again.yaml").write_text(assignment.to_yaml())
    assert Assignment.load(tmp_path / "again.yaml") == dataclasses.replace(
        assignment, source=str(tmp_path / "again.yaml")
    )
    path.write_text("default: {direct-answer: 3, step-by-step: 1}\n")  # weights
    weighted = Assignment.load(path)
    picks = [weighted.strategy_for("t", f"item-{i}") for i in range(2000)]
    assert 1400 <= picks.count("direct-answer") <= 1600
    path.write_text("default: {direct-answer: 0, step-by-step: 1}\n")
    with pytest.raises(Orca2Error, match=r"assign.yaml:1: field 'default': a mix maps strategies to positive weights"):
        Assignment.load(path)
    path.write_text("default: [direct-answer, direct-answer]\n")
    with pytest.raises(Orca2Error, match=r"assign.yaml:1: field 'default': a mix lists distinct strategies"):
        Assignment.load(path)
    path.write_text("tasks:\n  gsm8k: [step-by-step, think-harder]\n")
    with pytest.raises(Orca2Error, match=r"assign.yaml:2: field 'tasks.gsm8k': unknown strategy 'think-harder'"):
        Assignment.load(path)
