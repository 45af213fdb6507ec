"""The DeepSpeed engine every objective trains on: distributed init, the DeepSpeed JSON, the LR schedule,
the engine itself (AdamW + schedule), checkpoints and resume, the final HF save, logging and progress.

Nothing here knows what is being optimised: an objective (train/sft.py, dpo.py, kto.py) gives a module
whose forward returns the micro-batch's share of the step loss, and the loop in train/trainer.py drives it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orca2.errors import Orca2Error

log = logging.getLogger(__name__)
TRAIN_DIR = Path(__file__).parent


# --- distributed setup ------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a lone process without a launcher becomes rank 0 of 1."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        from orca2.serve import free_port

        port = free_port()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _clear_stale_build_locks()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    import torch.distributed as dist

    atexit.register(_unlink_allreduce_buffer, allreduce_buffer(dist.get_rank()))
    return dist.get_rank(), dist.get_world_size()


def allreduce_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for this rank (csrc/cpu/comm/shm.cpp names it
    by user, rendezvous address and port, and rank) and never unlinks: 69 MB of RAM in /dev/shm per rank per
    training, kept until reboot."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_allreduce_buffer(path: Path) -> None:
    """At exit: the name goes; ranks still running keep their mapping of it (POSIX shared memory)."""
    try:
        path.unlink()
    except OSError:
        pass


def _clear_stale_build_locks(max_age: float = 600.0) -> None:
    """DeepSpeed JIT-builds its CPU shared-memory op at init under torch's build lock (a bare file). A process
    killed while holding it leaves the file behind, and every later training then waits on it forever; a build
    takes well under a minute, so a lock older than `max_age` seconds is stale and removed."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")] if root.is_dir() else []:  # <root>[/py311_cpu]/<op>/lock
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age:
                lock.unlink()
                log.warning(
                    "removed a stale build lock %s (%.0f s old: its process was killed while building)", lock, age
                )
        except OSError:
            pass


def deepspeed_config(cfg: Any, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with "auto" filled from cfg; an explicit value that contradicts cfg is an error."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else TRAIN_DIR / f"zero{cfg.zero_stage}.json"
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise Orca2Error(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as exc:
        raise Orca2Error(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    wanted = {
        ("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
        ("gradient_accumulation_steps",): cfg.grad_accum,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("bf16", "enabled"): bf16,
        ("zero_optimization", "stage"): cfg.zero_stage,
    }
    for keys, value in wanted.items():
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            raise Orca2Error(
                f"{path}: '{'.'.join(keys)}' is {current!r} but the training config says {value!r}; "
                'make them agree or set it to "auto"'
            )
    for key in ("train_batch_size", "optimizer", "scheduler", "fp16"):
        if key in ds and (key != "fp16" or ds[key].get("enabled")):
            raise Orca2Error(
                f"{path}: '{key}' is set by orca2 (batch sizes, AdamW and the LR schedule come from the "
                "training config); remove it from the DeepSpeed JSON"
            )
    return ds


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if schedule == "cosine" else max(0.0, 1 - progress)


def build_engine(module: Any, cfg: Any, lr: float, total: int, bf16: bool) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR scheduler): AdamW over the trainable parameters, warmup then cfg.schedule."""
    import deepspeed
    import torch

    warmup = int(cfg.warmup_ratio * total)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, bf16)
    )
    return engine, scheduler


def resume_step(engine: Any, ckpt_dir: Path) -> int:
    """Load the newest checkpoint in ckpt_dir (model, optimizer, schedule, RNG-free loop position); 0 if none."""
    if not (ckpt_dir / "latest").exists():
        return 0
    _, client = engine.load_checkpoint(str(ckpt_dir))
    return int(client["global_step"])


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int) -> None:
    engine.save_checkpoint(str(ckpt_dir), tag=f"step-{step}", client_state={"global_step": step})


def freeze_below(model: Any, top: int) -> None:
    """Leave only the top `top` decoder layers and the final norm trainable (Llama/Mistral/Qwen2 layout)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None or not 0 < top <= len(layers):
        raise Orca2Error(
            f"train_layers {top}: the model has {len(layers) if layers is not None else 'no'} decoder layers"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(layers[-top:]) + [getattr(base, "norm", None)]:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)


def save_hf(engine: Any, model: Any, tokenizer: Any, folder: Path, zero_stage: int, rank: int) -> None:
    """The final weights in HF format (safetensors + tokenizer + chat template), gathered from ZeRO-3 shards."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    if state is not None:  # keys carry the loss wrapper's path to the model ("lm.model." ...)
        prefix = next(name for name, m in engine.module.named_modules() if m is model) + "."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    folder.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa")  # the packing-only attention is not what a loader of the model should get
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)


class Logger:
    """Rank 0 writes train_log.jsonl and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, rank: int, stage: str):
        self.file = None
        self.tb = None
        if rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "train_log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{row['stage']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress(rank: int, total: int, start: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)
