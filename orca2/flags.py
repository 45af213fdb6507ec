"""Command-line flags generated from a stage's config dataclass: one flag per field, declared once (config.option).

    field `dev_size`                          → --dev-size (its help, its default shown)
    a flattened section (client, sampling)    → one flag per field of the section: --temperature, --concurrency
    `argument=True`                           → the command's positional argument(s)
    bool                                      → --plots / --no-plots
    Literal                                   → a choice
    tuple of scalars                          → repeatable (and comma-separated where `split` says so)
    dict[str, str]                            → KEY=VALUE,...
    anything else (a nested section, a list)  → a YAML value: --student '{model: local:default, steps: 8}'

Every field named `seed` (top level, or in a flattened section) is set by the common --seed: the run's one seed
rule (`seed_keys`). Secret fields (API keys) get no flag: they belong in the environment (or `--set`). This module
imports click only when flags are built, and nothing of torch or the stages.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import typing
from typing import Any

from orca2.errors import Orca2Error

NESTED = "__"  # dest of a flattened section's field: client__concurrency


def _unwrap(tp: Any) -> Any:
    """X for X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


def flag_fields(cls: type) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted config key, field, its type) for every field that gets a flag or an argument, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("secret") or f.name == "seed":
            continue
        if f.metadata.get("flatten"):
            inner = typing.get_type_hints(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                if not (g.metadata.get("secret") or g.name == "seed"):
                    out.append((f"{f.name}.{g.name}", g, inner[g.name]))
        else:
            out.append((f.name, f, hints[f.name]))
    return out


def seed_keys(cls: type) -> list[str]:
    """The dotted keys a run's seed reaches: a top-level `seed`, and `seed` inside each flattened section."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            keys.append("seed")
        elif f.metadata.get("flatten") and any(g.name == "seed" for g in dataclasses.fields(hints[f.name])):
            keys.append(f"{f.name}.seed")
    return keys


def _default(cls: type, key: str) -> Any:
    """The default a field shows in --help (the stage's own: eval's max_tokens 512, not Sampling's 1024)."""
    section, _, name = key.rpartition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[section or name]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return getattr(value, name) if section else value


def _shown(default: Any) -> str:
    if default is dataclasses.MISSING or default is None or default in ((), {}):
        return ""
    if isinstance(default, bool):
        return f" (default {'on' if default else 'off'})"
    if isinstance(default, tuple):
        return f" (default {','.join(map(str, default))})"
    return f" (default {default})"


def _kind(tp: Any) -> str:
    """How a type is given on the command line: scalar, choice, many, mapping or yaml."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bool) or origin is typing.Literal:
        return "scalar"
    if origin is tuple and all(a in (str, int, float, Ellipsis) for a in typing.get_args(tp)):
        return "many"
    if origin is dict and typing.get_args(tp) == (str, str):
        return "mapping"
    return "yaml"


def params(cls: type) -> list[Any]:
    """The click parameters of a config class: one per field (see the module docstring)."""
    import click

    out: list[Any] = []
    seen: dict[str, str] = {}
    for key, f, tp in flag_fields(cls):
        name = key.rsplit(".", 1)[-1]
        dest = key.replace(".", NESTED)
        flag = "--" + name.replace("_", "-")
        if flag in seen:
            raise Orca2Error(f"{cls.__name__}: fields {seen[flag]} and {key} would share the flag {flag}")
        seen[flag] = key
        default = _default(cls, key)
        help_text = f.metadata.get("help", "") + _shown(default)
        kind, base = _kind(tp), _unwrap(tp)
        if f.metadata.get("argument"):
            many = kind == "many"
            out.append(click.Argument([dest], nargs=-1 if many else 1, required=False, metavar=name.upper()))
            continue
        names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        if base is bool:
            out.append(click.Option([f"{flag}/--no-{flag[2:]}", dest], default=None, help=help_text))
        elif typing.get_origin(base) is typing.Literal:
            choices = [str(c) for c in typing.get_args(base)]
            out.append(click.Option([*names, dest], type=click.Choice(choices), default=None, help=help_text))
        elif kind == "scalar":
            out.append(click.Option([*names, dest], type=base, default=None, help=help_text))
        elif kind == "many":
            item = typing.get_args(base)[0]
            sep = f.metadata.get("split")
            more = f" (repeatable{', or comma-separated' if sep else ''})"
            out.append(click.Option([*names, dest], type=item, multiple=True, default=None, help=help_text + more))
        elif kind == "mapping":
            out.append(click.Option([*names, dest], metavar="KEY=VALUE,...", default=None, help=help_text))
        else:
            out.append(click.Option([*names, dest], metavar="YAML", default=None, help=help_text + " (YAML)"))
    return out


def values(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Dotted config keys → values from parsed flags (None and () mean not given; load_config skips them)."""
    out: dict[str, Any] = {}
    for key, f, tp in flag_fields(cls):
        value = given.pop(key.replace(".", NESTED), None)
        if value is None or value == ():
            continue
        kind, flag = _kind(tp), "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        if kind == "many" and f.metadata.get("split"):
            value = tuple(part.strip() for v in value for part in str(v).split(f.metadata["split"]) if part.strip())
        elif kind == "mapping":
            value = _mapping(flag, value)
        elif kind == "yaml":
            value = _yaml(flag, value)
        out[key] = value
    return out


def _mapping(flag: str, text: str) -> dict[str, str]:
    if text.lstrip().startswith("{"):
        return _yaml(flag, text)
    mapping = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise Orca2Error(f"{flag} {text!r}: expected KEY=VALUE pairs, e.g. prompt=question,answer=answer")
        mapping[key.strip()] = value.strip()
    return mapping


def _yaml(flag: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise Orca2Error(f"{flag}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # One line per HTTP request is noise at info level (and 2,000 lines in a run of 2,000 requests).
    for name in ("httpx", "httpx2", "openai", "urllib3", "datasets", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


def common_params(seed: bool) -> list[Any]:
    """Options that mean the same in every command. --seed only where the config draws something at random (the
    fields seed_keys names): elsewhere it is refused, not ignored."""
    import click

    return [
        click.Option(["--config", "config_path"], type=click.Path(dir_okay=False), help="YAML config (config keys)."),
        click.Option(
            ["--set", "overrides"],
            multiple=True,
            metavar="KEY=VALUE",
            help="Override one config key (repeatable), e.g. --set client.concurrency=64.",
        ),
        *(
            [click.Option(["--seed"], type=int, help="Every seed of the config (default: the config's, else 0).")]
            if seed
            else []
        ),
        click.Option(["--log-level"], type=click.Choice(["debug", "info", "warning", "error"]), default="info"),
        click.Option(["--debug"], is_flag=True, help="Show the full traceback on errors."),
    ]


def stage_command(
    stage: Any, help: str, extras: list[Any], hooks: dict[str, Any] | None = None, group: bool = False
) -> Any:
    """The click command of a declared stage: its config's flags, the CLI-only extras, the common options; run →
    print show. `hooks`: before_config(extra) or instead_of_run(extra, cfg, config_path, overrides, values), each
    returning True when it has done the command's work."""
    import click

    seeds, hooks = seed_keys(stage.config), hooks or {}

    def callback(
        config_path: str | None,
        overrides: tuple[str, ...],
        log_level: str,
        debug: bool,
        seed: int | None = None,
        **given: Any,
    ) -> None:
        if group and click.get_current_context().invoked_subcommand is not None:
            return
        setup_logging(log_level)
        extra = {p.name: given.pop(p.name) for p in extras}
        if "before_config" in hooks and hooks["before_config"](extra):
            return
        from orca2.config import load_config

        given_values = values(stage.config, given) | {key: seed for key in seeds}
        cfg = load_config(stage.config, config_path, overrides, given_values)
        if "instead_of_run" in hooks and hooks["instead_of_run"](extra, cfg, config_path, overrides, given_values):
            return
        text = stage.show(stage.run(cfg), cfg)
        if text:
            click.echo(text)

    name, every = stage.name.split()[-1], params(stage.config) + extras + common_params(bool(seeds))
    if group:
        return click.Group(name, callback=callback, help=help, params=every, invoke_without_command=True)
    return click.Command(name, callback=callback, help=help, params=every)
