import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
DATA_DIR = Path(os.environ.get("ORCA2_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    """The shared GSM8K/BBH data (ORCA2_DATA_DIR, default ../shared/data); skips when absent."""
    if not (DATA_DIR / "gsm8k" / "test.jsonl").exists() or not (DATA_DIR / "bbh").is_dir():
        pytest.skip(f"shared eval data not found at {DATA_DIR} (set ORCA2_DATA_DIR)")
    return DATA_DIR


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m orca2 ARGS` in a subprocess, as a user would from a shell."""
    return subprocess.run([sys.executable, "-m", "orca2", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    """The `run_cli` helper as a fixture (test modules are imported by path, so conftest is not importable)."""
    return run_cli


@pytest.fixture
def repo() -> Path:
    return REPO
