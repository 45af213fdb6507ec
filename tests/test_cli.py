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
    top = loaded_by(["--help"])
    assert not [m for m in top if m.startswith(STAGE_MODULES) or m.split(".")[0] in HEAVY], top
    for command, module in (
        ("generate", "orca2.stages.generate"),
        ("select", "orca2.stages.select"),
        ("eval", "orca2.eval.evaluate"),
        ("instruct", "orca2.stages.instruct"),
        ("sample", "orca2.stages.sample"),
        ("judge", "orca2.stages.judge"),
        ("erase", None),
        ("train", None),
        ("run", None),
        ("persona", None),
    ):
        found = loaded_by([command, "--help"])
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
