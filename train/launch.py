"""Many ranks: `orca2 train --nproc N` (or --hostfile) starts the deepspeed launcher, whose every rank runs
`python -m orca2.train` with the same config — the command's flags passed on as `--set` overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from orca2.errors import Orca2Error


def launcher_command(nproc: int | None, hostfile: str | None) -> list[str]:
    """The deepspeed launcher with a free rendezvous port (its default 29500 may be held by another job)."""
    from orca2.serve import free_port

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    launcher += ["--hostfile", hostfile] if hostfile else ["--num_gpus", str(nproc)]
    return launcher + ["--master_port", os.environ.get("MASTER_PORT") or str(free_port())]


def launch(
    nproc: int | None, hostfile: str | None, config_path: str | None, overrides: tuple[str, ...], values: dict[str, Any]
) -> bool:
    """Start the ranks and wait for them (True), or say that this process should train itself (False: one rank)."""
    if not ((nproc and nproc > 1) or hostfile):
        return False
    args = ["--config", config_path] if config_path else []
    args += [f"--set={o}" for o in overrides]
    args += [f"--set={key}={json.dumps(value)}" for key, value in values.items() if value not in (None, ())]
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    code = subprocess.call(launcher_command(nproc, hostfile) + ["--module", "orca2.train", *args], env=env)
    if code:
        raise Orca2Error(f"the deepspeed launcher exited with code {code}")
    return True
