"""The `orca2` command: one command per declared stage, its flags generated from the stage's config (orca2.flags).

A stage command is parse → load config → stage.run → print stage.show. Listing the commands imports no stage;
showing or running one imports that stage's module only. Heavy imports (torch, transformers, deepspeed, openai)
happen inside the stages, so `orca2 --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from orca2 import __version__, flags, stages
from orca2.errors import Orca2Error
from orca2.stages import REGISTRY

log = logging.getLogger("orca2")

# The commands of the declared stages: the registry's entries with a help line (orca2.stages.REGISTRY).
STAGES = {name: (where, line) for name, (where, line) in REGISTRY.items() if line is not None}


def load_stage(command: str) -> Any:
    """The Stage declared for a command (imports its module)."""
    return stages.load(command)


def stage_command(command: str, group: bool = False) -> click.Command:
    """The command of a declared stage, built from its Stage (orca2.flags.stage_command)."""
    return flags.stage_command(
        load_stage(command), STAGES[command][1], EXTRAS.get(command, []), HOOKS.get(command), group
    )


class StageGroup(click.Group):
    """Lists declared stages without importing them; builds a stage's command when it is asked for."""

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def _lazy(self) -> dict[str, str]:
        n = len(self.prefix.split()) if self.prefix else 0
        return {c.split()[n]: c for c in STAGES if c.startswith(self.prefix) and len(c.split()) == n + 1}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        lazy = self._lazy()
        if name in lazy and name not in self.commands:
            self.add_command(stage_command(lazy[name], group=name in GROUPS))
            for sub in GROUPS.get(name, ()):
                self.commands[name].add_command(sub)  # type: ignore[attr-defined]
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            full = (self.prefix + " " + name).strip()
            if full in STAGES:
                rows.append((name, STAGES[full][1]))
            elif name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(limit=formatter.width)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orca2")
def cli() -> None:
    """orca2: teach small language models how to reason.

    A teacher answers tasks under strategy-specific system prompts, prompt erasure swaps those
    prompts for one generic prompt, and the student is fine-tuned on the erased traces.
    Every stage reads and writes the same JSONL record format:

      tasks → select → generate → erase → train → eval
    """


@cli.group(cls=StageGroup, prefix="persona")
def persona() -> None:
    """Personality-conditioned role-play: synth, infer, augment, build (then train; OrcaBench in eval)."""


@cli.group()
def strategies() -> None:
    """Browse the strategy library (reasoning strategies as system prompts)."""


_USER_STRATEGIES = click.option(
    "--strategies", "user_paths", multiple=True, type=click.Path(), help="Extra strategy YAML file or folder."
)


@strategies.command("list")
@_USER_STRATEGIES
def strategies_list(user_paths: tuple[str, ...]) -> None:
    """List the strategies with their descriptions."""
    from orca2.strategies import Library

    for strategy in Library.load(user_paths):
        click.echo(f"{strategy.name:<24} {strategy.description}")


@strategies.command("show")
@click.argument("name")
@_USER_STRATEGIES
def strategies_show(name: str, user_paths: tuple[str, ...]) -> None:
    """Print a strategy's full system prompt."""
    from orca2.strategies import Library

    strategy = Library.load(user_paths).get(name)
    click.echo(f"# {strategy.name}  ({strategy.source})\n# {strategy.description}\n")
    click.echo(strategy.system_text())


@click.command("compare")
@click.argument("reports", nargs=-1, required=True)
@click.option("-o", "--output", default="compare", show_default=True, help="Folder for compare.md and compare.png.")
def eval_compare(reports: tuple[str, ...], output: str) -> None:
    """Render one table and plot from several finished report folders."""
    from orca2.eval.report import compare

    click.echo(compare(list(reports), output), nl=False)


GROUPS = {"eval": (eval_compare,)}  # stage commands that also hold sub-commands


# CLI-only options of a stage: what to do instead of (or around) running it, not part of its config.
EXTRAS = {
    "instruct": [
        click.Option(["--list", "list_flows"], is_flag=True, help="List the built-in flows and skills; exit.")
    ],
    "train": [
        click.Option(["--nproc"], type=int, help="Ranks to start with the deepspeed launcher (GPUs or CPU ranks)."),
        click.Option(["--hostfile"], help="DeepSpeed hostfile for many nodes (implies the launcher)."),
        click.Option(["--local_rank", "--local-rank", "local_rank"], type=int, hidden=True),
    ],
}


def _list_flows(extra: dict[str, Any], *_: Any) -> bool:
    if extra["list_flows"]:
        from orca2.stages import instruct

        click.echo(instruct.list_flows())
    return bool(extra["list_flows"])


def _launch(extra: dict[str, Any], cfg: Any, config_path: str | None, overrides: Any, values: dict[str, Any]) -> bool:
    from orca2.models import check_student
    from orca2.train.launch import launch

    check_student(cfg.model)  # a wrong model fails here, before any process starts
    return launch(extra["nproc"], extra["hostfile"], config_path, overrides, values)


# What a stage's extras do: answer before any config is read (instruct --list), or run it another way (train ranks).
HOOKS = {"instruct": {"before_config": _list_flows}, "train": {"instead_of_run": _launch}}


@cli.command(params=flags.common_params(seed=True))
@click.option("-o", "--output", default=None, help="Run folder (overrides the config's output).")
@click.option("--from", "from_stage", default=None, help="Redo this stage and every one after it.")
def run(
    output: str | None, from_stage: str | None, config_path: str | None, overrides: tuple[str, ...], **o: Any
) -> None:
    """Run the whole chain from one pipeline config, skipping stages whose inputs and config are unchanged."""
    flags.setup_logging(o["log_level"])
    from orca2 import pipeline

    if config_path is None:
        raise Orca2Error("run: give --config pipeline.yaml (see configs/demo.yaml)")
    overrides = overrides + ((f"seed={o['seed']}",) if o["seed"] is not None else ())
    result = pipeline.run(config_path, overrides, from_stage, output)
    ran, skipped = ", ".join(result["ran"]) or "nothing", ", ".join(result["skipped"]) or "nothing"
    click.echo(f"ran: {ran}; skipped (unchanged): {skipped}\nmanifest: {result['manifest']}")


@cli.group("cache", invoke_without_command=True)
@click.pass_context
def cache(ctx: click.Context) -> None:
    """List what orca2 keeps in its cache ($ORCA2_CACHE_DIR): converted models, native kernels, teacher responses."""
    if ctx.invoked_subcommand is None:
        from orca2.cache import describe_cache

        click.echo(describe_cache())


@cache.command("clear")
@click.option("--models", "models_", is_flag=True, help="Remove the converted models (rebuilt on next use).")
@click.option("--responses", is_flag=True, help="Remove the cached teacher responses (asked again, and paid, then).")
@click.option("--kernels", is_flag=True, help="Remove the built native kernels (rebuilt on next use, ≈ 1 s).")
def cache_clear(models_: bool, responses: bool, kernels: bool) -> None:
    """Remove converted models, native kernels and/or cached responses."""
    from orca2.cache import clear_cache

    if not (models_ or responses or kernels):
        raise Orca2Error("cache clear: say what to clear: --models, --kernels, --responses, or several")
    click.echo(clear_cache(models_, responses, kernels))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line and a non-zero exit on errors; the traceback only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="orca2", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
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
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into a line
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
