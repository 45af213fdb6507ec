import json
import subprocess
import sys

import pytest

from orca2 import __version__


def test_help_and_version(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("tasks", "select", "generate", "erase", "train", "eval", "run", "strategies"):
        assert command in result.stdout
        assert run_cli(command, "--help").returncode == 0
    assert __version__ in run_cli("--version").stdout


def test_light_imports():
    code = (
        "import sys; import orca2.strategies, orca2.prompts, orca2.cli; from orca2.cli import cli; "
        "from click.testing import CliRunner; r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
        "r = CliRunner().invoke(cli, ['strategies', 'list']); assert r.exit_code == 0, r.output; "
        "print([m for m in ('torch', 'transformers', 'openai', 'deepspeed', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_strategies_commands(run_cli):
    listed = run_cli("strategies", "list")
    assert listed.returncode == 0 and "step-by-step" in listed.stdout and "recall-reason-generate" in listed.stdout
    shown = run_cli("strategies", "show", "step-by-step")
    assert shown.returncode == 0 and "The answer is:" in shown.stdout


def test_tasks_command_with_config_and_override(tmp_path, run_cli):
    config = tmp_path / "tasks.yaml"
    config.write_text("sources: [synthetic]\nper_kind: 4\nseed: 1\n")
    out = tmp_path / "t.jsonl"
    result = run_cli("tasks", "--config", str(config), "--set", "per_kind=2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2 * 6 and json.loads(lines[0])["id"] == "synthetic/arithmetic/train/1/0"
    assert "seed: 1" in (tmp_path / "t.config.yaml").read_text()


def test_errors_are_one_line_and_debug_shows_traceback(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [synthetic]\nbogus: 1\n")
    result = run_cli("tasks", "--config", str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert f"{bad}:2: key 'bogus': unknown key" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()
    debug = run_cli("tasks", "--config", str(bad), "-o", str(tmp_path / "o.jsonl"), "--debug")
    assert "Traceback" in debug.stderr
    assert run_cli("strategies", "show", "nope").stderr.startswith("error: unknown strategy 'nope' (valid: ")


def test_bad_record_file_error(tmp_path, run_cli):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "task": "t", "messages": [{"role": "robot", "content": "x"}]}\n')
    result = run_cli("tasks", f"jsonl:{src}", "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"error: {src}:1: field 'messages[0].role' must be one of system, user, assistant, got 'robot'"
    )


def test_run_needs_a_config(run_cli):
    result = run_cli("run")
    assert (
        result.returncode == 1
        and result.stderr.strip() == "error: run: give --config pipeline.yaml (see configs/demo.yaml)"
    )


def test_package_data_in_wheel(tmp_path, repo):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        check=True,
        capture_output=True,
    )
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("orca2-*.whl"))).namelist()
    assert "orca2/strategies/step-by-step.yaml" in names
    assert "orca2/prompts/generic/cautious.txt" in names
    assert "orca2/cli.py" in names and "orca2/train/__init__.py" in names and "orca2/eval/__init__.py" in names


def test_client_and_sampling_flags_derive_from_the_config_fields(run_cli):
    import dataclasses

    from orca2.models import ClientConfig, Sampling

    generate, evaluate = run_cli("generate", "--help").stdout, run_cli("eval", "--help").stdout
    for f in dataclasses.fields(ClientConfig) + dataclasses.fields(Sampling):
        if f.name in ("api_key", "seed"):
            continue  # keys belong in the environment; --seed is the common option
        flag = "--" + f.name.replace("_", "-")
        assert flag in generate and flag in evaluate, flag
    squash = lambda text: " ".join(text.split())  # noqa: E731 - click wraps help lines
    assert "Completion tokens per sample. (default 1024)" in squash(generate)
    assert "Completion tokens per sample. (default 512)" in squash(evaluate)  # eval's own default, as the code uses it


def test_an_option_that_would_do_nothing_is_refused(tmp_path, run_cli):
    """erase draws nothing at random: --seed is not an option of it (it was accepted and ignored)."""
    result = run_cli("erase", str(tmp_path / "t.jsonl"), "--seed", "3")
    assert result.returncode != 0 and "No such option '--seed'" in result.stderr
    assert "--seed" not in run_cli("erase", "--help").stdout
    for command in ("tasks", "select", "generate", "sample", "judge", "pairs", "train", "eval", "instruct", "run"):
        assert "--seed" in run_cli(command, "--help").stdout, command


HEAVY = (
    "torch",
    "transformers",
    "deepspeed",
    "openai",
    "datasets",
    "numpy",
    "asyncio",
    "tqdm",
    "yaml",
    "regex",
    "matplotlib",
    "aiohttp",
    "jsonlines",
)
STAGE_MODULES = ("orca2.stages.", "orca2.train.trainer", "orca2.eval.evaluate", "orca2.pipeline")


def loaded_by(args: list[str]) -> list[str]:
    """Modules a fresh interpreter loads to run `orca2 ARGS` (beyond what it had before importing the CLI)."""
    code = (
        "import sys; before = set(sys.modules); from orca2.cli import main\n"
        f"try: main({args!r})\nexcept SystemExit: pass\n"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1].split()


def test_help_loads_no_heavy_module_and_no_other_stage():
    """`orca2 --help` loads no stage and nothing heavy; `orca2 STAGE --help` loads that stage's module only, and still
    nothing heavy (numpy, asyncio, tqdm, yaml and regex load when work starts). Timings: docs/benchmarks.md."""
    from orca2.cli import STAGES

    top = loaded_by(["--help"])
    assert not [m for m in top if m.startswith(STAGE_MODULES) or m.split(".")[0] in HEAVY], top
    commands = [(command, where.partition(":")[0]) for command, (where, _) in STAGES.items()]
    for command, module in commands + [("run", None), ("persona", None)]:
        found = loaded_by([*command.split(), "--help"])
        assert not [m for m in found if m.split(".")[0] in HEAVY], (command, found)
        stages = {m for m in found if m.startswith(STAGE_MODULES)}
        assert stages == ({module} if module else set()), (command, stages)


def test_gpu_check_says_in_one_line_that_there_is_no_gpu(repo):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the whole check (make gpu-check), minutes long")
    done = subprocess.run(
        [sys.executable, str(repo / "scripts" / "gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"
    ]


COMMON = {"config_path", "overrides", "log_level", "debug", "help", "seed"}


def sample_value(tp, default):
    """(command-line words, the value the config should get) for one field of this type, unlike its default."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    if tp is bool:
        return (["--no-{}"] if default else ["--{}"]), not default
    if origin is typing.Literal:
        choice = next(c for c in typing.get_args(tp) if c != default)
        return ["--{}", str(choice)], choice
    if tp in (int, float, str):
        value = {int: 7, float: 0.25, str: "abc"}[tp]
        return ["--{}", str(value)], value
    if origin is tuple and typing.get_args(tp)[0] in (str, float, int) and len(typing.get_args(tp)) == 2:
        item = typing.get_args(tp)[0]
        values = {str: ("a", "b"), float: (0.5, 0.25), int: (3, 4)}[item]
        return ["--{}", str(values[0]), "--{}", str(values[1])], values
    if origin is dict and typing.get_args(tp) == (str, str):
        return ["--{}", "k=v,x=y"], {"k": "v", "x": "y"}
    return ["--{}", "{a: 1}"], {"a": 1}  # any other shape is given as YAML


def test_every_config_field_has_a_flag_that_sets_it_and_every_flag_a_field():
    """For every stage command: each config field (each field of a flattened section) has exactly the flag its name
    says, parsing that flag yields the field's value under its dotted key, secrets have no flag, seeds are the common
    --seed; and the command has no flag that is not a field, a common option or a declared CLI-only extra."""
    import dataclasses
    import typing

    from orca2 import cli as cli_module
    from orca2 import flags

    for command in cli_module.STAGES:
        stage = cli_module.load_stage(command)
        cmd = cli_module.stage_command(command)
        by_name = {p.name: p for p in cmd.params}
        extras = {p.name for p in cli_module.EXTRAS.get(command, [])}
        expected = set()
        hints = typing.get_type_hints(stage.config)
        sections = [("", stage.config, hints)]
        for f in dataclasses.fields(stage.config):
            if f.metadata.get("flatten"):
                sections.append((f.name + ".", hints[f.name], typing.get_type_hints(hints[f.name])))
        for prefix, cls, types_ in sections:
            for f in dataclasses.fields(cls):
                key = prefix + f.name
                if prefix == "" and f.metadata.get("flatten"):
                    continue
                if f.metadata.get("secret"):
                    assert key.replace(".", "__") not in by_name, (command, key)
                    assert not [p for p in cmd.params if "--" + f.name.replace("_", "-") in p.opts], (command, key)
                    continue
                if f.name == "seed":
                    assert "seed" in by_name, (command, key)
                    assert key in flags.seed_keys(stage.config), (command, key)
                    continue
                dest = key.replace(".", "__")
                expected.add(dest)
                assert dest in by_name, (command, key)
                param = by_name[dest]
                flag = "--" + f.name.replace("_", "-")
                if f.metadata.get("argument"):
                    assert param.param_type_name == "argument", (command, key)
                    continue
                assert flag in param.opts, (command, key, param.opts)
                default = f.default if f.default is not dataclasses.MISSING else None
                if prefix and f.default_factory is dataclasses.MISSING:
                    parent = next(g for g in dataclasses.fields(stage.config) if g.name == prefix[:-1])
                    default = getattr(parent.default_factory(), f.name)
                words, value = sample_value(types_[f.name], default)
                args = [w.replace("{}", f.name.replace("_", "-")) if w.startswith("--") else w for w in words]
                ctx = cmd.make_context(command, args, resilient_parsing=True)
                got = flags.values(stage.config, dict(ctx.params))
                assert got.get(key) == value, (command, key, args, got.get(key))
        unexpected = set(by_name) - expected - COMMON - extras
        assert not unexpected, (command, unexpected)
        assert ("seed" in by_name) == bool(flags.seed_keys(stage.config)), command


def test_flags_given_through_the_command_reach_the_stage_config(tmp_path):
    """End to end through `orca2 tasks`: positional sources, -o, a mapping, a bool, and --seed reach the config."""
    from click.testing import CliRunner

    from orca2.cli import cli

    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(
        cli, ["tasks", "synthetic:arithmetic", "-o", str(out), "--per-kind", "3", "--seed", "5", "--skip-invalid"]
    )
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "t.config.yaml").read_text()
    assert "per_kind: 3" in saved and "seed: 5" in saved and "skip_invalid: true" in saved
    assert "wrote 3 task records" in result.output
