"""`program:synthetic` — a worked-solution teacher for the built-in synthetic tasks; `program:persona` — the
offline rule judge and writer of the role-play stages (PersonaProgram, below).

The synthetic generator knows each task's computation (meta.synthetic: steps and facts), so this
teacher writes a correct solution *in the style of the requested strategy*: a bare answer under
direct-answer, numbered steps under step-by-step, the relevant facts first under recall-then-generate,
and so on. It is exact, instant and free — and labelled as what it is (teacher "program:synthetic"),
not passed off as a language model. The strategy is recognised from the system prompt it is sent, rendered for the
request's task.
"""

from __future__ import annotations

from typing import Any

from orca2.errors import Orca2Error
from orca2.models import ModelError, Response, Sampling
from orca2.strategies import Library


def write_solution(strategy: str, steps: list[str], facts: list[str], answer: str, question: str) -> str:
    """A correct solution in the style of `strategy`."""
    work = [s for s in steps if s]
    final = f"The answer is: {answer}"
    if strategy == "direct-answer":
        return answer
    if strategy == "step-by-step":
        return "\n".join(f"{i}. {s}" for i, s in enumerate(work, 1)) + f"\n{final}"
    if strategy == "explain-then-answer":
        return " ".join(work) + f" That settles it.\n{final}"
    if strategy == "recall-then-generate":
        return "Relevant facts:\n" + "\n".join(f"- {f}" for f in facts) + f"\nAnswer: {work[-1]}\n{final}"
    if strategy == "recall-reason-generate":
        return (
            "Relevant facts:\n"
            + "\n".join(f"- {f}" for f in facts)
            + "\nReasoning:\n"
            + "\n".join(f"{i}. {s}" for i, s in enumerate(work, 1))
            + f"\nAnswer: {answer}\n{final}"
        )
    if strategy == "extract-generate":
        quoted = list(facts) or [question]
        return "Extracted:\n" + "\n".join(f"- {q}" for q in quoted) + f"\nAnswer: {work[-1]}\n{final}"
    raise ModelError(f"program:synthetic cannot write in the style of strategy '{strategy}'", retryable=False)


class _Program:
    """A program model: `complete_one` per request, answered in order, instantly."""

    def complete_one(
        self, messages: list[dict[str, str]], context: dict[str, Any] | None, sampling: Sampling
    ) -> Response:
        raise NotImplementedError

    def answer_all(self, pending: list[tuple[str, Any]], sampling: Sampling, sink: Any) -> None:
        for key, request in pending:
            try:
                sink.done(key, self.complete_one(request.messages, request.context, sampling))
            except ModelError as exc:
                sink.failed(key, exc.reason)


class ProgramBackend(_Program):
    """Answers synthetic tasks exactly, from the generator's worked solution carried in the task's meta."""

    def __init__(self, name: str = "synthetic", library: Library | None = None):
        if name != "synthetic":
            raise Orca2Error(f"unknown program model 'program:{name}' (valid: program:synthetic, program:persona)")
        self.spec = f"program:{name}"
        self.library = library or Library.load()

    def strategy_of(self, messages: list[dict[str, str]], task: str | None = None) -> str:
        """The strategy whose system prompt, rendered for this task as generate renders it, opens the messages."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        for strategy in self.library:
            if strategy.system_text(task) == system:
                return strategy.name
        raise ModelError("program:synthetic: the system prompt is not one of the library's strategies", retryable=False)

    def complete_one(
        self, messages: list[dict[str, str]], context: dict[str, Any] | None, sampling: Sampling
    ) -> Response:
        context = context or {}
        synthetic = context.get("synthetic")
        if not synthetic or "answer" not in context:
            raise ModelError(
                "program:synthetic only answers built-in synthetic tasks (meta.synthetic missing)", retryable=False
            )
        text = write_solution(
            self.strategy_of(messages, context.get("task")),
            synthetic["steps"],
            synthetic.get("facts", []),
            context["answer"],
            messages[-1]["content"],
        )
        words = len(text.split())
        return Response(
            [text] * sampling.n,
            ["stop"] * sampling.n,
            prompt_tokens=sum(len(m["content"].split()) for m in messages),
            completion_tokens=words * sampling.n,
            latency_s=0.0,
            model=self.spec,
        )


def program_backend(name: str, library: Library | None = None) -> Any:
    """The program a `program:NAME` spec names."""
    return PersonaProgram() if name == "persona" else ProgramBackend(name, library)


class PersonaProgram(_Program):
    """`program:persona`: answers the role-play agents by rule, from the request's context (what the agent was
    given), so the persona chain runs offline — a stand-in that shows the mechanics, labelled as such. The
    rules live in orca2.roleplay.traits (rule_marks, rule_profile, rule_activity, rule_summary, rule_consistent)."""

    spec = "program:persona"

    def complete_one(
        self, messages: list[dict[str, str]], context: dict[str, Any] | None, sampling: Sampling
    ) -> Response:
        import json

        from orca2.roleplay import traits

        c = context or {}
        agent = c.get("agent")
        if agent == "infer":
            text = json.dumps({"shown": sorted(traits.rule_marks(c["posts"]))})
        elif agent == "profile":
            text = json.dumps(traits.rule_profile(c["posts"]))
        elif agent == "activity":
            text = json.dumps(traits.rule_activity(c["post"], c["profile"]))
        elif agent == "summary":
            text = traits.rule_summary(c["report"])
        elif agent == "consistency":
            text = json.dumps({"consistent": traits.rule_consistent(c["aspect"], c["reference"], c["post"])})
        else:
            raise ModelError(f"program:persona does not play the agent {agent!r}", retryable=False)
        return Response(
            [text] * sampling.n,
            ["stop"] * sampling.n,
            prompt_tokens=sum(len(m["content"].split()) for m in messages),
            completion_tokens=len(text.split()) * sampling.n,
            latency_s=0.0,
            model=self.spec,
        )
