"""The `orca2` command: one thin click command per stage (parse → load config → stage.run).

Heavy imports (torch, transformers, deepspeed, openai) happen inside the command that needs them,
so `orca2 --help` stays fast.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from orca2 import __version__
from orca2.errors import Orca2Error

log = logging.getLogger("orca2")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # One line per HTTP request is noise at info level (and 2,000 lines in a run of 2,000 requests).
    for name in ("httpx", "httpx2", "openai", "urllib3", "datasets", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


def common_options(fn: Callable[..., Any] | None = None, *, seed: bool = True) -> Any:
    """Options that mean the same in every command: --config, --set, --seed, --log-level, --debug.

    `seed=False` for a command that draws nothing at random (erase): there --seed is refused, not ignored."""
    if fn is None:
        return functools.partial(common_options, seed=seed)

    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="YAML config; its keys are this command's options.",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one config key (repeatable), e.g. --set client.concurrency=64.",
    )
    @click.option(
        "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
    )
    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args: Any, log_level: str, debug: bool, **kwargs: Any) -> Any:
        _setup_logging(log_level)
        return fn(*args, **kwargs)

    if seed:
        return click.option("--seed", type=int, default=None, help="Random seed (default: the config's, else 0).")(
            wrapper
        )
    return wrapper


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    columns = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise Orca2Error(f"--columns {text!r}: expected KEY=COLUMN pairs, e.g. prompt=question,answer=answer")
        columns[key.strip()] = value.strip()
    return columns


def _not_yet(stage: str, issue: int) -> None:
    raise Orca2Error(f"the '{stage}' stage is not implemented yet (tracked in issue #{issue})")


# Client and sampling flags come from the fields of orca2.models.ClientConfig and Sampling: one declaration,
# so names, help texts and defaults cannot drift apart. A stage's own default (eval's max_tokens) shows as such.
_HIDDEN_CLIENT_FLAGS = ("api_key",)  # keys belong in the environment; `--set client.api_key=...` still works


def _field_flags(cls: type, section: str, defaults: Any) -> list[tuple[str, click.Option]]:
    """(config key, click option) for every field of a client/sampling dataclass."""
    import dataclasses

    flags = []
    for f in dataclasses.fields(cls):
        if f.name in _HIDDEN_CLIENT_FLAGS:
            continue
        flag = "--" + ("n" if f.name == "n" else f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        kind = {int: int, float: float}.get(type(default)) if default is not None else None
        if kind is None:
            hint = str(f.type)
            kind = int if hint.startswith("int") else float if hint.startswith("float") else None
        shown = "" if default is None else f" (default {default})"
        flags.append(
            (
                f"{section}.{f.name}",
                click.Option(
                    [flag, f"{section}_{f.name}"], type=kind, default=None, help=f.metadata.get("help", "") + shown
                ),
            )
        )
    return flags


def teacher_options(
    stage: str, with_teacher: bool = True, with_strategies: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Model, client and sampling options shared by select, generate and eval, derived from the config classes.

    Only recorded here: StageCommand builds them when the command is parsed or its help shown, so listing the
    commands (`orca2 --help`) imports no stage."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__orca2_stage_options__ = (stage, with_teacher, with_strategies)  # type: ignore[attr-defined]
        return fn

    return decorate


def _stage_options(stage: str, with_teacher: bool, with_strategies: bool) -> list[click.Option]:
    import dataclasses
    import importlib

    from orca2.models import SPEC_FORMS, ClientConfig, Sampling

    module, _, name = stage.partition(":")
    stage_config = getattr(importlib.import_module(module), name)
    fields = {f.name: f for f in dataclasses.fields(stage_config)}
    defaults = {name: f.default_factory() for name, f in fields.items() if name in ("client", "sampling")}
    specs = _field_flags(ClientConfig, "client", defaults["client"]) + _field_flags(
        Sampling, "sampling", defaults["sampling"]
    )
    options = [click.Option(["--teacher"], default=None, help=SPEC_FORMS)] if with_teacher else []
    options += [opt for key, opt in specs if key != "sampling.seed"]  # the common --seed sets it
    if with_strategies:
        options.append(
            click.Option(
                ["--strategies", "user_strategies"],
                multiple=True,
                type=click.Path(),
                help="Extra strategy YAML file or folder.",
            )
        )
    return options


class _StageOptions:
    """A command whose model, client and sampling options come from its stage's config (teacher_options): built on
    first use — parsing its arguments or showing its help — and placed before the common options."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        spec = getattr(self.callback, "__orca2_stage_options__", None)  # type: ignore[attr-defined]
        if spec is not None and not getattr(self, "_stage_options_built", False):
            self._stage_options_built = True
            params = self.params  # type: ignore[attr-defined]
            at = next((i for i, p in enumerate(params) if p.name in ("seed", "config_path")), len(params))
            params[at:at] = _stage_options(*spec)
        return super().get_params(ctx)  # type: ignore[misc]


class StageCommand(_StageOptions, click.Command):
    pass


class StageGroup(_StageOptions, click.Group):
    command_class = StageCommand
    group_class = type  # sub-groups are StageGroups too


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orca2")
def cli() -> None:
    """orca2: teach small language models how to reason.

    A teacher answers tasks under strategy-specific system prompts, prompt erasure swaps those
    prompts for one generic prompt, and the student is fine-tuned on the erased traces.
    Every stage reads and writes the same JSONL record format:

      tasks → select → generate → erase → train → eval
    """


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output tasks file (.jsonl or .jsonl.gz).")
@click.option("--per-kind", type=int, default=None, help="Synthetic items per kind (default 100).")
@click.option("--split", default=None, help="Synthetic split name; each split draws its own items (default train).")
@click.option("--limit", type=int, default=None, help="Keep at most this many records per source.")
@click.option(
    "--columns",
    default=None,
    metavar="KEY=COL,...",
    help="Row mapping for jsonl:/hf: sources (prompt, answer, id, task).",
)
@click.option("--task", default=None, help="Task name for jsonl:/hf: rows without a task column.")
@click.option("--skip-invalid", is_flag=True, default=None, help="Send bad rows to <output>.rejects.jsonl and go on.")
@common_options
def tasks(
    sources: tuple[str, ...],
    output: str | None,
    per_kind: int | None,
    split: str | None,
    limit: int | None,
    columns: str | None,
    task: str | None,
    skip_invalid: bool | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
) -> None:
    """Build task records from SOURCES (gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME, synthetic[:KIND,...])."""
    from orca2.config import load_config
    from orca2.stages import tasks as stage

    flags = {
        "sources": sources,
        "output": output,
        "per_kind": per_kind,
        "split": split,
        "limit": limit,
        "columns": _parse_columns(columns),
        "task": task,
        "skip_invalid": skip_invalid,
        "seed": seed,
    }
    cfg = load_config(stage.TasksConfig, config_path, overrides, flags)
    summary = stage.run(cfg)
    for spec, tally in summary["sources"].items():
        click.echo(f"{spec}: {tally['kept']} kept, {tally['rejected']} rejected of {tally['read']} read")
    click.echo(f"wrote {summary['total']['kept']} task records to {summary['output']}")
    if "rejects" in summary:
        click.echo(f"rejected rows listed in {summary['rejects']}")


@cli.group()
def strategies() -> None:
    """Browse the strategy library (reasoning strategies as system prompts)."""


@strategies.command("list")
@click.option(
    "--strategies", "user_paths", multiple=True, type=click.Path(), help="Extra strategy YAML file or folder."
)
def strategies_list(user_paths: tuple[str, ...]) -> None:
    """List the strategies with their descriptions."""
    from orca2.strategies import Library

    for strategy in Library.load(user_paths):
        click.echo(f"{strategy.name:<24} {strategy.description}")


@strategies.command("show")
@click.argument("name")
@click.option(
    "--strategies", "user_paths", multiple=True, type=click.Path(), help="Extra strategy YAML file or folder."
)
def strategies_show(name: str, user_paths: tuple[str, ...]) -> None:
    """Print a strategy's full system prompt."""
    from orca2.strategies import Library

    strategy = Library.load(user_paths).get(name)
    click.echo(f"# {strategy.name}  ({strategy.source})\n# {strategy.description}\n")
    click.echo(strategy.system_text())


def _teacher_flags(kw: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """Map the shared model options onto config keys (client.*, sampling.*)."""
    flags = {"sampling.seed": seed}
    if "teacher" in kw:
        flags["teacher"] = kw.pop("teacher")
    if "user_strategies" in kw:
        flags["strategies"] = kw.pop("user_strategies")
    for dest in [k for k in kw if k.startswith(("client_", "sampling_"))]:
        section, _, name = dest.partition("_")
        flags[f"{section}.{name}"] = kw.pop(dest)
    return flags


@cli.command()
@click.option(
    "--docs", multiple=True, help="Document source (repeatable): a file or folder, jsonl:PATH, hf:NAME[@SPLIT]."
)
@click.option(
    "--flow", default=None, help="A built-in flow (reading-comprehension, text-modification, orca-math) or a flow YAML."
)
@click.option("-o", "--output", default=None, help="Task records to write (the input of generate).")
@click.option(
    "--model", default=None, help="The model every agent asks (default local:default); models.AGENT overrides one."
)
@click.option("--text-field", default=None, help="jsonl/hf documents: the text column (default text).")
@click.option("--passage-size", type=int, default=None, help="Characters per passage at most (default 2000).")
@click.option("--rounds", type=int, default=None, help="Suggester/editor rounds (default: the flow's).")
@click.option(
    "--decontaminate", multiple=True, metavar="SOURCE", help="Eval set to decontaminate against (repeatable)."
)
@click.option("--list", "list_flows", is_flag=True, help="List the built-in flows and the 17 skills, then exit.")
@teacher_options("orca2.stages.instruct:InstructConfig", with_teacher=False, with_strategies=False)
@common_options
def instruct(
    docs: tuple[str, ...],
    flow: str | None,
    output: str | None,
    model: str | None,
    text_field: str | None,
    passage_size: int | None,
    rounds: int | None,
    decontaminate: tuple[str, ...],
    list_flows: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **options: Any,
) -> None:
    """Documents → agent flows (transformation, seed instructions, suggester/editor rounds) → task records."""
    from orca2.config import load_config

    if list_flows:
        from orca2.flows import builtin_flows, load_flow, skills

        for name in builtin_flows():
            f = load_flow(name)
            click.echo(
                f"{name}: {f.description} ({len(f.transformations)} transformations, {len(f.types)} types, "
                f"{f.refine.rounds} refinement rounds)"
            )
        click.echo("\nskills (AgentInstruct's 17):")
        for skill in skills():
            click.echo(f"  {skill['name']}: {skill['flow'] or 'no flow yet'}")
        return
    from orca2.stages import instruct as stage

    flags = {
        "docs": docs or None,
        "flow": flow,
        "output": output,
        "model": model,
        "text_field": text_field,
        "passage_size": passage_size,
        "rounds": rounds,
        "decontaminate": decontaminate or None,
        "seed": seed,
        **_teacher_flags(options, seed),
    }
    r = stage.run(load_config(stage.InstructConfig, config_path, overrides, flags))
    dropped = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items() if v) or "none"
    click.echo(
        f"{r['documents']} documents → {r['passages']} passages → {r['candidates']} candidates "
        f"({r['agent_requests']['sent']} agent requests sent, {r['agent_requests']['cached']} from the cache) → "
        f"{r['kept']} task records in {r['output']} (dropped: {dropped})"
    )
    from orca2.io import sidecar

    click.echo(f"report: {sidecar(r['output'], 'report.md')}")


@cli.group()
def persona() -> None:
    """Personality-conditioned role-play: synth, infer, augment, build (then train; OrcaBench in eval)."""


@persona.command("synth")
@click.option("-o", "--output", default=None, help="Posts to write; the truth goes beside them (<output>.truth.jsonl).")
@click.option("--users", type=int, default=None, help="Synthetic users (default 60).")
@click.option("--posts", type=int, default=None, help="Posts per user (default 30).")
@common_options
def persona_synth(
    output: str | None,
    users: int | None,
    posts: int | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
) -> None:
    """Synthetic users with known BigFive levels; their posts written by a program from facet phrase banks."""
    from orca2.config import load_config
    from orca2.stages import persona as stage

    r = stage.synth(
        load_config(
            stage.SynthConfig, config_path, overrides, {"output": output, "users": users, "posts": posts, "seed": seed}
        )
    )
    click.echo(f"wrote {r['posts']} posts of {r['users']} users to {r['output']} (truth: {r['truth']})")


@persona.command("infer")
@click.option("--posts", "posts_path", default=None, help="Posts JSONL: user, text, time?, media?")
@click.option("-o", "--output", default=None, help="Traits JSONL (one row per user: 35 numbers and a report).")
@click.option("--judge", default=None, help="The judge model (default program:persona, the offline rule judge).")
@click.option("--chunk", type=int, default=None, help="Posts per judge call (default 10).")
@click.option("--truth", default=None, help="A truth file (persona synth): Spearman's rho per domain in the report.")
@teacher_options("orca2.stages.persona:InferConfig", with_teacher=False, with_strategies=False)
@common_options
def persona_infer(
    posts_path: str | None,
    output: str | None,
    judge: str | None,
    chunk: int | None,
    truth: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **options: Any,
) -> None:
    """Each user's BigFive facets from their posts, judged chunk by chunk."""
    from orca2.config import load_config
    from orca2.stages import persona as stage

    flags = {
        "posts": posts_path,
        "output": output,
        "judge": judge,
        "chunk": chunk,
        "truth": truth,
        "seed": seed,
        **_teacher_flags(options, seed),
    }
    r = stage.infer(load_config(stage.InferConfig, config_path, overrides, flags))
    click.echo(f"traits of {r['users']} users → {r['output']}")
    from orca2.io import sidecar

    click.echo(sidecar(r["output"], "report.md").read_text(), nl=False)


@persona.command("augment")
@click.option("--posts", "posts_path", default=None, help="Posts JSONL.")
@click.option("--traits", default=None, help="persona infer output.")
@click.option("-o", "--output", default=None, help="Augmented posts JSONL.")
@click.option("--model", default=None, help="The model that writes profiles and activities (default program:persona).")
@teacher_options("orca2.stages.persona:AugmentConfig", with_teacher=False, with_strategies=False)
@common_options
def persona_augment(
    posts_path: str | None,
    traits: str | None,
    output: str | None,
    model: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **options: Any,
) -> None:
    """Per user a profile and knowledge; per post its psychological activity and what it relates to."""
    from orca2.config import load_config
    from orca2.stages import persona as stage

    flags = {"posts": posts_path, "traits": traits, "output": output, "model": model, **_teacher_flags(options, seed)}
    r = stage.augment(load_config(stage.AugmentConfig, config_path, overrides, flags))
    click.echo(f"{r['counts'].get('posts_augmented', 0)} posts augmented → {r['output']}")


@persona.command("build")
@click.option("--augmented", default=None, help="persona augment output.")
@click.option("--traits", default=None, help="persona infer output.")
@click.option("-o", "--output", default=None, help="PCIP training records.")
@click.option(
    "--variant", type=click.Choice(["ptit", "psit"]), default=None, help="Traits as text (ptit) or a summary (psit)."
)
@click.option("--holdout", type=float, default=None, help="Share of users held out for OrcaBench (default 0).")
@common_options
def persona_build(
    augmented: str | None,
    traits: str | None,
    output: str | None,
    variant: str | None,
    holdout: float | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
) -> None:
    """PCIP records (PTIT or PSIT) in the one record format, for orca2 train."""
    from orca2.config import load_config
    from orca2.stages import persona as stage

    flags = {
        "augmented": augmented,
        "traits": traits,
        "output": output,
        "variant": variant,
        "holdout": holdout,
        "seed": seed,
    }
    r = stage.build(load_config(stage.BuildConfig, config_path, overrides, flags))
    click.echo(
        f"{r['train_records']} training records → {r['output']}; {r['heldout_records']} held-out → {r['heldout']}"
    )


@cli.command()
@click.option("--tasks", "tasks_path", default=None, help="Task records (from `orca2 tasks`).")
@click.option("--assign", default=None, help="Assignment YAML: task pattern → strategy.")
@click.option("--strategy", default=None, help="One strategy for every task (instead of --assign).")
@click.option("-o", "--output", default=None, help="Output traces file.")
@click.option("--limit", type=int, default=None, help="Only the first N tasks.")
@click.option("--allow-failures", is_flag=True, default=None, help="Exit 0 even if some requests failed for good.")
@teacher_options("orca2.stages.generate:GenerateConfig")
@common_options
def generate(
    tasks_path: str | None,
    assign: str | None,
    strategy: str | None,
    output: str | None,
    limit: int | None,
    allow_failures: bool | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **teacher: Any,
) -> None:
    """Send tasks to the teacher under their strategy prompts (writes traces)."""
    from orca2.config import load_config
    from orca2.stages import generate as stage

    flags = {
        "tasks": tasks_path,
        "assign": assign,
        "strategy": strategy,
        "output": output,
        "limit": limit,
        "allow_failures": allow_failures,
        **_teacher_flags(teacher, seed),
    }
    cfg = load_config(stage.GenerateConfig, config_path, overrides, flags)
    s = stage.run(cfg)
    cost = (
        f", cost ≈ ${s['cost_this_run_usd']:.4f} (total ${s['cost_total_usd']:.4f})"
        if s["cost_total_usd"] is not None
        else ""
    )
    click.echo(
        f"{s['answered']}/{s['tasks']} tasks answered ({s['cached_at_start']} from cache, {s['done_this_run']} new, "
        f"{s['failed']} failed, {s['retries']} retries); tokens this run: {s['usage_this_run']['prompt_tokens']} "
        "prompt + "
        f"{s['usage_this_run']['completion_tokens']} completion{cost}"
    )
    click.echo(f"wrote {s['records']} traces to {s['output']}")
    if s["failed"]:
        message = (
            f"{s['failed']} of {s['tasks']} tasks failed (listed in {s['errors']}); "
            f"finished responses are cached, so re-running the same command retries only these"
        )
        if s.get("aborted"):
            message = f"run stopped early: {s['aborted']}; " + message
        if not cfg.allow_failures:
            raise Orca2Error(message)
        click.echo(f"warning: {message}", err=True)


@cli.command()
@click.option("--tasks", "tasks_path", default=None, help="Task records with gold answers.")
@click.option("-o", "--output", default=None, help="Assignment YAML to write.")
@click.option("--candidates", default=None, metavar="NAME,...", help="Strategies to compare (default: all).")
@click.option("--dev-size", type=int, default=None, help="Items per task (default 32).")
@teacher_options("orca2.stages.select:SelectConfig")
@common_options
def select(
    tasks_path: str | None,
    output: str | None,
    candidates: str | None,
    dev_size: int | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **teacher: Any,
) -> None:
    """Pick the best strategy per task by scoring the teacher on a dev slice (writes an assignment)."""
    from orca2.config import load_config
    from orca2.stages import select as stage

    flags = {
        "tasks": tasks_path,
        "output": output,
        "dev_size": dev_size,
        "candidates": tuple(c.strip() for c in candidates.split(",") if c.strip()) if candidates else None,
        **_teacher_flags(teacher, seed),
    }
    cfg = load_config(stage.SelectConfig, config_path, overrides, flags)
    report = stage.run(cfg)
    from orca2.io import sidecar

    click.echo(sidecar(cfg.output, "table.md").read_text(), nl=False)
    click.echo(f"wrote the assignment to {cfg.output} (default: {report['default']})")


@cli.command()
@click.argument("input_path", required=False)
@click.option("-o", "--output", default=None, help="Output SFT file.")
@click.option("--generic", default=None, help="Generic system prompt: cautious (default), empty, or a text file.")
@click.option(
    "--leak", type=click.Choice(["drop", "flag", "off"]), default=None, help="Responses that reveal the erased prompt."
)
@click.option("--verify", type=click.Choice(["drop", "label", "off"]), default=None, help="Wrong answers against gold.")
@click.option(
    "--dedup", type=click.Choice(["near", "exact", "off"]), default=None, help="Duplicate prompts (default near)."
)
@click.option(
    "--decontaminate",
    multiple=True,
    metavar="SOURCE",
    help="Eval set to decontaminate against (repeatable): gsm8k:PATH, bbh:PATH, ...",
)
@click.option("--max-tokens", type=int, default=None, help="Drop records longer than this (the training max_len).")
@click.option(
    "--tokenizer", default=None, help="Tokenizer for --max-tokens (HF folder, .gguf, default); else ≈4 chars/token."
)
@click.option(
    "--skip-invalid", is_flag=True, default=None, help="Send malformed lines to <output>.rejects.jsonl and go on."
)
@click.option(
    "--strategies", "user_strategies", multiple=True, type=click.Path(), help="Extra strategy YAML file or folder."
)
@common_options(seed=False)
def erase(
    input_path: str | None,
    output: str | None,
    generic: str | None,
    leak: str | None,
    verify: str | None,
    dedup: str | None,
    decontaminate: tuple[str, ...],
    max_tokens: int | None,
    tokenizer: str | None,
    skip_invalid: bool | None,
    user_strategies: tuple[str, ...],
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Replace strategy prompts by one generic prompt and curate the traces (writes SFT data)."""
    from orca2.config import load_config
    from orca2.stages import erase as stage

    flags = {
        "input": input_path,
        "output": output,
        "generic": generic,
        "leak": leak,
        "verify": verify,
        "dedup": dedup,
        "decontaminate": decontaminate,
        "max_tokens": max_tokens,
        "tokenizer": tokenizer,
        "skip_invalid": skip_invalid,
        "strategies": user_strategies,
    }
    cfg = load_config(stage.EraseConfig, config_path, overrides, flags)
    r = stage.run(cfg)
    reasons = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items()) or "none"
    click.echo(f"read {r['read']} = kept {r['kept']} + dropped {r['dropped']} ({reasons}) + rejected {r['rejected']}")
    if r["notes"]:
        click.echo("notes: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))
    click.echo(f"wrote {r['kept']} records to {r['output']}; report: {stage.sidecar(cfg.output, 'report.md')}")


@cli.command()
@click.option(
    "--tasks", "tasks_path", default=None, help="Prompts: task records (or traces / SFT records: the reply is dropped)."
)
@click.option(
    "--student", default=None, help="The student: local:<folder|.gguf|default> (engine) or openai:<name> (served)."
)
@click.option("-o", "--output", default=None, help="Sampled replies (one record per sample).")
@click.option(
    "--generic", default=None, help="System prompt the student answers under: cautious (default), empty, a file."
)
@click.option("--limit", type=int, default=None, help="Only the first N prompts.")
@teacher_options("orca2.stages.sample:SampleConfig", with_teacher=False, with_strategies=False)
@common_options
def sample(
    tasks_path: str | None,
    student: str | None,
    output: str | None,
    generic: str | None,
    limit: int | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **model: Any,
) -> None:
    """The student writes K replies per prompt (default K = 4, T = 0.7, top_p = 0.95)."""
    from orca2.config import load_config
    from orca2.stages import sample as stage

    flags = {
        "tasks": tasks_path,
        "student": student,
        "output": output,
        "generic": generic,
        "limit": limit,
        **_teacher_flags(model, seed),
    }
    s = stage.run(load_config(stage.SampleConfig, config_path, overrides, flags))
    click.echo(
        f"{s['samples']} replies to {s['prompts'] - s['failed']}/{s['prompts']} prompts ({s['cached_at_start']} "
        f"from cache, {s['failed']} failed) → {s['output']}"
    )
    if s["failed"]:
        raise Orca2Error(
            f"{s['failed']} prompts failed (listed in {s['errors']}); re-running the same command retries only these"
        )


@cli.command()
@click.argument("replies", nargs=-1)
@click.option("--teacher", "teacher_traces", multiple=True, help="Teacher traces for the same prompts (repeatable).")
@click.option("-o", "--output", default=None, help="Judged replies (teacher replies included).")
@click.option(
    "--judge",
    "judge_kind",
    type=click.Choice(["answer", "llm", "rubric"]),
    default=None,
    help="answer: final answer vs gold, else the teacher's (offline); llm: a judge model's verdict; "
    "rubric: DNO's 6-point rubric over all replies of a prompt, two orders averaged.",
)
@click.option("--model", default=None, help="The judge model for llm and rubric (openai:NAME, batch:NAME, local:PATH).")
@teacher_options("orca2.stages.judge:JudgeConfig", with_teacher=False, with_strategies=False)
@common_options
def judge(
    replies: tuple[str, ...],
    teacher_traces: tuple[str, ...],
    output: str | None,
    judge_kind: str | None,
    model: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **options: Any,
) -> None:
    """Score sampled replies (meta.judge), teacher replies joined as positives-to-be."""
    from orca2.config import load_config
    from orca2.stages import judge as stage

    flags = {
        "replies": replies or None,
        "teacher": teacher_traces or None,
        "output": output,
        "judge": judge_kind,
        "model": model,
        **_teacher_flags(options, seed),
    }
    s = stage.run(load_config(stage.JudgeConfig, config_path, overrides, flags))
    click.echo(
        f"judged {s.get('student_replies', 0)} student replies ({s.get('correct', 0)} correct, {s.get('wrong', 0)} "
        f"wrong where the judge says so), {s.get('unjudged', 0)} unjudged ({s.get('unjudged_no_reference', 0)} "
        f"without a reference answer); {s.get('teacher_replies', 0)} teacher replies → {s['output']}"
    )


@cli.command()
@click.argument("judged", nargs=-1)
@click.option("-o", "--output", default=None, help="Preference records (the input of train --objective dpo|kto).")
@click.option(
    "--recipe",
    type=click.Choice(["orca-math", "dno"]),
    default=None,
    help="orca-math: teacher and correct replies over wrong ones; dno: 6-point rubric scores with margins.",
)
@click.option(
    "--objective", type=click.Choice(["dpo", "kto"]), default=None, help="Pairs (dpo) or labelled replies (kto)."
)
@click.option(
    "--cut",
    type=click.Choice(["none", "first-difference"]),
    default=None,
    help="dpo: cut each pair after the first line its replies differ in (partial replies).",
)
@click.option("--replay", multiple=True, help="An earlier round's pairs file, newest first (repeatable).")
@common_options
def pairs(
    judged: tuple[str, ...],
    output: str | None,
    recipe: str | None,
    objective: str | None,
    cut: str | None,
    replay: tuple[str, ...],
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
) -> None:
    """Judged replies → preference records (DPO pairs or KTO labels), with replay of earlier rounds."""
    from orca2.config import load_config
    from orca2.stages import pairs as stage

    flags = {
        "judged": judged or None,
        "output": output,
        "recipe": recipe,
        "objective": objective,
        "cut": cut,
        "replay": replay or None,
        "seed": seed,
    }
    r = stage.run(load_config(stage.PairsConfig, config_path, overrides, flags))
    unit = (
        f"{r.get('pairs', 0)} pairs"
        if r["objective"] == "dpo"
        else f"{r.get('desirable', 0)} desirable + {r.get('undesirable', 0)} undesirable replies"
    )
    click.echo(
        f"read {r.get('replies_read', 0)} replies of {r['prompts']} prompts; wrote {unit} for "
        f"{r.get('prompts_with_pairs', 0)} prompts ({r.get('prompts_without_pairs', 0)} without) to {r['output']}"
    )


@cli.command()
@click.option("--model", default=None, help="Student: local:default | HF folder | file.gguf | hub name.")
@click.option(
    "--data", multiple=True, help="Training JSONL (one stage; repeatable). Progressive stages go in the config."
)
@click.option(
    "--objective",
    type=click.Choice(["sft", "dpo", "kto"]),
    default=None,
    help="sft: erased traces (default); dpo: chosen/rejected pairs; kto: replies labelled desirable/undesirable.",
)
@click.option("--reference", default=None, help="dpo/kto reference model (default: the policy training starts from).")
@click.option("-o", "--output", default=None, help="Run folder (checkpoints, logs, final model in <output>/model).")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest checkpoint.")
@click.option(
    "--nproc", type=int, default=None, help="Start this many ranks with the deepspeed launcher (GPUs, or CPU ranks)."
)
@click.option("--hostfile", default=None, help="DeepSpeed hostfile for many nodes (implies the launcher).")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
@common_options
def train(
    model: str | None,
    data: tuple[str, ...],
    objective: str | None,
    reference: str | None,
    output: str | None,
    resume: bool | None,
    nproc: int | None,
    hostfile: str | None,
    local_rank: int | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
) -> None:
    """Fine-tune the student with DeepSpeed: SFT on erased traces (loss on assistant tokens only), DPO or KTO."""
    import os

    from orca2.config import load_config
    from orca2.train import trainer

    flags = {
        "model": model,
        "data": data,
        "output": output,
        "resume": resume,
        "seed": seed,
        "objective": objective,
        "reference": reference,
    }
    cfg = load_config(trainer.TrainConfig, config_path, overrides, flags)  # validate before any process starts
    from orca2.models import check_student

    check_student(cfg.model)
    if (nproc and nproc > 1) or hostfile:
        import subprocess

        launcher = launcher_command(nproc, hostfile)
        args = (["--config", config_path] if config_path else []) + [f"--set={o}" for o in overrides]
        for key, value in (
            ("--model", model),
            ("--output", output),
            ("--seed", seed),
            ("--objective", objective),
            ("--reference", reference),
        ):
            args += [key, str(value)] if value is not None else []
        args += [f"--data={d}" for d in data] + (["--resume"] if resume else [])
        env = dict(os.environ)
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        code = subprocess.call(launcher + ["--module", "orca2.train", *args], env=env)
        if code:
            raise Orca2Error(f"the deepspeed launcher exited with code {code}")
        return
    summary = trainer.run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        for stage in summary["stages"]:
            click.echo(
                f"stage {stage['stage']}: {stage['steps']} steps, examples {stage['examples']}, "
                f"packing efficiency {stage['packing_efficiency'] or 0:.3f}"
            )
        click.echo(f"final model (HF format): {summary['model']}")


@cli.group("eval", invoke_without_command=True)
@click.option("--model", default=None, help="HF folder | local:default | local:<path> | openai:<model>.")
@click.option(
    "--bench", default=None, metavar="NAME,...", help="Benchmarks (gsm8k, bbh, bbh/<task>, arc-challenge, mmlu, ...)."
)
@click.option(
    "--system",
    "system_prompts",
    default=None,
    metavar="COND,...",
    help="System-prompt conditions: empty, cautious, strategy:NAME, or a text file (default empty).",
)
@click.option("-o", "--output", default=None, help="Report folder.")
@click.option("--label", default=None, help="The model's name in reports.")
@click.option("--limit", type=int, default=None, help="Items per task.")
@click.option("--benchmarks", "extra_benchmarks", multiple=True, help="Extra benchmark YAML file (repeatable).")
@click.option("--data-dir", default=None, help="Benchmark data folder (default $ORCA2_DATA_DIR or ../shared/data).")
@teacher_options("orca2.eval.evaluate:EvalConfig", with_teacher=False)
@common_options
@click.pass_context
def eval_(
    ctx: click.Context,
    model: str | None,
    bench: str | None,
    system_prompts: str | None,
    output: str | None,
    label: str | None,
    limit: int | None,
    extra_benchmarks: tuple[str, ...],
    data_dir: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    seed: int | None,
    **teacher: Any,
) -> None:
    """Evaluate a model on benchmarks under empty, cautious and strategy system prompts (`eval compare` to combine)."""
    if ctx.invoked_subcommand is not None:
        return
    from orca2.config import load_config
    from orca2.eval import evaluate as stage

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip()) if text else None  # noqa: E731
    flags = {
        "model": model,
        "bench": split(bench),
        "system": split(system_prompts),
        "output": output,
        "label": label,
        "limit": limit,
        "benchmarks": extra_benchmarks,
        "data_dir": data_dir,
        **_teacher_flags(teacher, seed),
    }
    cfg = load_config(stage.EvalConfig, config_path, overrides, flags)
    report = stage.run(cfg)
    for name, bench in report.get("orcabench", {}).items():
        m = bench["metrics"]
        click.echo(
            f"{report['model']} | {name}: BLEU {m['bleu']['value']:.2f}, ROUGE-L {m['rougeL']['value']:.3f}, "
            f"BigFive cosine {m['cosine']['value']:.3f} ({bench['users']} users); "
            f"report: {cfg.output}/orcabench/report.md"
        )
    for condition, summary in report.get("benchmarks", {}).items():
        for name, o in summary["overall"].items():
            click.echo(
                f"{report['model']} | {condition} | {name}: {100 * o['accuracy']:.1f}% "
                f"[{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}] over {o['n']} items"
            )
    if "benchmarks" in report:
        click.echo(f"report: {cfg.output}/report.md")


@eval_.command("compare")
@click.argument("reports", nargs=-1, required=True)
@click.option("-o", "--output", default="compare", show_default=True, help="Folder for compare.md and compare.png.")
def eval_compare(reports: tuple[str, ...], output: str) -> None:
    """Render one table and plot from several finished report folders."""
    from orca2.eval.report import compare

    click.echo(compare(list(reports), output), nl=False)


@cli.command()
@click.option("-o", "--output", default=None, help="Run folder (overrides the config's output).")
@click.option("--from", "from_stage", default=None, help="Redo this stage and every one after it.")
@common_options
def run(
    output: str | None, from_stage: str | None, config_path: str | None, overrides: tuple[str, ...], seed: int | None
) -> None:
    """Run the whole chain from one pipeline config, skipping stages whose inputs and config are unchanged."""
    from orca2 import pipeline

    if config_path is None:
        raise Orca2Error("run: give --config pipeline.yaml (see configs/demo.yaml)")
    overrides = overrides + ((f"seed={seed}",) if seed is not None else ())
    result = pipeline.run(config_path, overrides, from_stage, output)
    click.echo(
        f"ran: {', '.join(result['ran']) or 'nothing'}; skipped (unchanged): "
        f"{', '.join(result['skipped']) or 'nothing'}"
    )
    click.echo(f"manifest: {result['manifest']}")


@cli.group("cache", invoke_without_command=True)
@click.pass_context
def cache(ctx: click.Context) -> None:
    """List what orca2 keeps in its cache ($ORCA2_CACHE_DIR): converted models and teacher responses."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from orca2.cache import default_cache_dir
    from orca2.weights import list_entries

    rows = [
        (r["what"] + ("" if r["whole"] else " (incomplete)"), r["bytes"], r["last_used"], r["folder"])
        for r in list_entries()
    ]
    responses = default_cache_dir() / "responses.jsonl"
    if responses.exists():
        lines = sum(1 for _ in open(responses, "rb"))
        rows.append(
            (f"responses ({lines} cached)", responses.stat().st_size, responses.stat().st_mtime, str(responses))
        )
    if not rows:
        click.echo("the cache is empty")
    for what, size, used, where in rows:
        click.echo(
            f"{_size(size):>9}  last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}  {what}  {where}"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@cache.command("clear")
@click.option("--models", "models_", is_flag=True, help="Remove the converted models (rebuilt on next use).")
@click.option(
    "--responses", is_flag=True, help="Remove the cached teacher responses (asked again, and paid, on next use)."
)
def cache_clear(models_: bool, responses: bool) -> None:
    """Remove converted models and/or cached responses."""
    import shutil

    from orca2.cache import default_cache_dir
    from orca2.weights import list_entries

    if not (models_ or responses):
        raise Orca2Error("cache clear: say what to clear: --models, --responses or both")
    if models_:
        entries = list_entries()
        for row in entries:
            shutil.rmtree(row["folder"], ignore_errors=True)
        click.echo(f"removed {len(entries)} converted model(s)")
    if responses:
        path = default_cache_dir() / "responses.jsonl"
        if path.exists():
            path.unlink()
        click.echo(f"removed the cached responses ({path})")


def launcher_command(nproc: int | None, hostfile: str | None) -> list[str]:
    """The deepspeed launcher with a free rendezvous port (its default 29500 may be held by another job)."""
    import os

    from orca2.serve import free_port

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    launcher += ["--hostfile", hostfile] if hostfile else ["--num_gpus", str(nproc)]
    return launcher + ["--master_port", os.environ.get("MASTER_PORT") or str(free_port())]


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line and a non-zero exit on errors; the traceback only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="orca2", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Orca2Error as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into a line
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
