"""What a run's numbers depend on besides its config: the machine, the libraries, the threads, and what `auto`
dtypes resolve to. Recorded in a run's manifest; a re-run on a machine that differs is told so, in one line.

Greedy decoding of a small model flips on the last bit of a logit, so bf16 against fp32 changes results, and
so can a different BLAS, CPU instruction set or thread count (reductions are split differently). See
docs/reproducibility.md for what was measured to matter.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# CPU features that change which kernels run (and so the last bits of a result).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "fma")
# Variables that change numerics or kernel choice.
NUMERIC_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
)


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    from orca2.models import resolve_dtype

    config = torch.__config__.show()
    blas = re.findall(r"\b(?:BLAS_INFO|LAPACK_INFO)=[^,\s]+", config)
    blas += [
        line.strip("- ").split(" for ")[0]
        for line in config.splitlines()
        if line.strip().startswith(("- Intel(R) oneAPI Math Kernel Library", "- Intel(R) MKL-DNN", "- OpenBLAS"))
    ]
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas": blas,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_dtype": {"cpu": str(resolve_dtype("auto", "cpu")).removeprefix("torch.")},
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        out["auto_dtype"]["cuda"] = str(resolve_dtype("auto", "cuda")).removeprefix("torch.")
    return out


def environment() -> dict[str, Any]:
    """The machine and libraries a run's numbers depend on (small, JSON-ready)."""
    env = {"python": platform.python_version(), "machine": platform.machine(), **_cpu(), **_torch()}
    env["numeric_env"] = {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}
    return env


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two environments, one short phrase each ('threads 2 → 1')."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        before, after = recorded.get(key), current.get(key)
        if before != after:
            out.append(f"{key} {_short(before)} → {_short(after)}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "none" if value is None else str(value)
