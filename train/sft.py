"""Stage `train`: DeepSpeed SFT of the student on erased traces, loss on the teacher's tokens only.

    python -m orca2.train --config train.yaml                                   # one process
    deepspeed --num_gpus 8 --module orca2.train --config train.yaml             # many GPUs
    deepspeed --hostfile hosts --module orca2.train --config train.yaml         # many nodes
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module orca2.train --config ... # 2 CPU ranks (gloo)

Loss normalisation: each micro-batch's loss is Σ ℓ over its supervised tokens ÷ the supervised tokens
of the whole optimizer step (all micro-batches, all ranks), × world size because DeepSpeed averages
gradients over ranks; DeepSpeed's own 1/GA scaling is off. So GA 4 × batch 1 equals batch 4, two ranks
equal one, and an all-masked micro-batch contributes exactly zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orca2.errors import Orca2Error

log = logging.getLogger(__name__)
TRAIN_DIR = Path(__file__).parent


@dataclass(frozen=True)
class StageConfig:
    data: tuple[str, ...]  # SFT JSONL files (orca2 erase output)
    name: str = "sft"
    epochs: int = 1
    lr: float = 2e-5
    max_steps: int | None = None  # stop this stage after this many optimizer steps


@dataclass(frozen=True)
class TrainConfig:
    model: str  # local:default | HF folder | file.gguf | hub name
    output: str  # run folder: checkpoints, logs, final model (HF format) in <output>/model
    data: tuple[str, ...] = ()  # one-stage shorthand for stages: [{data: ...}]
    stages: tuple[StageConfig, ...] = ()  # progressive learning: each starts from the previous stage's weights
    chat_template: Literal["tokenizer", "chatml"] = "tokenizer"  # chatml adds <|im_start|>/<|im_end|> tokens
    max_len: int = 2048  # tokens per packed row / example
    overlong: Literal["drop", "truncate"] = "drop"  # examples longer than max_len (counted either way)
    packing: bool = True  # best-fit-decreasing packing with block-diagonal attention
    micro_batch_size: int = 1  # rows per micro-batch (packed rows, or examples when packing is off)
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    epochs: int = 1  # default for stages that do not say
    lr: float = 2e-5  # default for stages that do not say
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    warmup_ratio: float = 0.03  # of each stage's steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    zero_stage: int = 2  # 0-3; picks train/zero<N>.json unless deepspeed_config is given
    deepspeed_config: str | None = None  # your DeepSpeed JSON; "auto" values are filled from this config
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    train_layers: int | None = None  # train only the top N transformer layers + final norm (embeddings frozen): CPU demos
    loss_impl: Literal["naive", "fused"] = "naive"  # fused: linear cross-entropy without logits (issue #6)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end of each stage)
    resume: bool = False  # continue from the newest checkpoint in <output>/checkpoints
    log_every: int = 1
    seed: int = 0
    mask_check: int = 8  # examples whose supervised spans are decoded and compared before training
    max_steps: int | None = None  # default for stages that do not say
    stop_after: int | None = None  # time-boxed jobs: checkpoint and stop after this many steps (resume later)

    def __post_init__(self) -> None:
        if bool(self.data) == bool(self.stages):
            raise Orca2Error("train: give either data (one stage) or stages (progressive), not both or neither")
        if self.zero_stage not in (0, 1, 2, 3):
            raise Orca2Error(f"train: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_len < 16 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise Orca2Error("train: max_len >= 16, micro_batch_size >= 1 and grad_accum >= 1 required")

    def resolved_stages(self) -> list[StageConfig]:
        if self.data:
            return [StageConfig(data=self.data, epochs=self.epochs, lr=self.lr, max_steps=self.max_steps)]
        return list(self.stages)


# --- distributed setup ------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a lone process without a launcher becomes rank 0 of 1."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with "auto" filled from cfg; an explicit value that contradicts cfg is an error."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else TRAIN_DIR / f"zero{cfg.zero_stage}.json"
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise Orca2Error(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as exc:
        raise Orca2Error(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    wanted = {("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
              ("gradient_accumulation_steps",): cfg.grad_accum,
              ("gradient_clipping",): cfg.max_grad_norm,
              ("bf16", "enabled"): bf16,
              ("zero_optimization", "stage"): cfg.zero_stage}
    for keys, value in wanted.items():
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            raise Orca2Error(f"{path}: '{'.'.join(keys)}' is {current!r} but the training config says {value!r}; "
                             "make them agree or set it to \"auto\"")
    for key in ("train_batch_size", "optimizer", "scheduler", "fp16"):
        if key in ds and (key != "fp16" or ds[key].get("enabled")):
            raise Orca2Error(f"{path}: '{key}' is set by orca2 (batch sizes, AdamW and the LR schedule come from the "
                             "training config); remove it from the DeepSpeed JSON")
    return ds


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if schedule == "cosine" else max(0.0, 1 - progress)


# --- one stage ----------------------------------------------------------------------------------------


def _read_stage_records(stage: StageConfig) -> list[tuple[str, dict[str, Any]]]:
    from orca2.io import read_numbered

    return [(f"{path}:{line}", r) for path in stage.data for line, r in read_numbered(path)]


def train_stage(cfg: TrainConfig, stage: StageConfig, index: int, model_spec: str, out_dir: Path,
                rank: int, world: int) -> dict[str, Any]:
    """Train one stage from `model_spec`; save the final model (HF format) in out_dir/model."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from orca2.train.data import empty_micro_batch, make_micro_batches, prepare_examples
    from orca2.train.model import CausalLMLoss, load_student, use_chatml

    device = get_accelerator().device_name()
    on_gpu = device != "cpu"
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and on_gpu)
    model, tokenizer = load_student(model_spec)
    if cfg.chat_template == "chatml" and index == 0:
        use_chatml(model, tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise Orca2Error(f"{model_spec}: the tokenizer has no chat template; set chat_template: chatml")
    if cfg.packing:  # padding-free rows: attention per example (varlen), no (T, T) mask
        from orca2.train.attention import register

        model.set_attn_implementation(register())
    if cfg.train_layers is not None:
        freeze_below(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    prepared = prepare_examples(_read_stage_records(stage), tokenizer, cfg.max_len, cfg.overlong, cfg.mask_check,
                                cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def rank_steps(epoch: int) -> list[list[Any]]:
        """This rank's micro-batches for one epoch, grouped by optimizer step (all ranks get the same count)."""
        batches = make_micro_batches(prepared.examples, max_len=cfg.max_len, micro_batch_size=cfg.micro_batch_size,
                                     packing=cfg.packing, pad_id=pad_id, seed=cfg.seed, epoch=epoch)
        per_rank = math.ceil(len(batches) / world)
        steps = math.ceil(per_rank / cfg.grad_accum)
        mine = batches[rank::world]
        mine += [empty_micro_batch(pad_id)] * (steps * cfg.grad_accum - len(mine))  # zero-loss fillers
        return [mine[i:i + cfg.grad_accum] for i in range(0, len(mine), cfg.grad_accum)]

    steps_per_epoch = len(rank_steps(0))
    total = steps_per_epoch * stage.epochs
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    warmup = int(cfg.warmup_ratio * total)
    wrapped = CausalLMLoss(model, cfg.loss_impl)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=stage.lr,
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))
    ckpt_dir = out_dir / "checkpoints"
    start = 0
    if cfg.resume and (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start = int(client["global_step"])
        if rank == 0:
            log.info("resumed stage %s at step %d of %d", stage.name, start, total)

    logger = _Logger(out_dir, rank, stage.name)
    bar = _progress(rank, total, start, f"train {stage.name}")
    step = start
    packed_tokens = capacity = 0
    for epoch in range(stage.epochs):
        if step >= total:
            break
        steps = rank_steps(epoch)
        for k, micro_batches in enumerate(steps):
            global_index = epoch * steps_per_epoch + k
            if global_index < step:
                continue  # already trained before the resume
            if step >= total:
                break
            t0 = time.perf_counter()
            counts = torch.tensor([sum(mb.supervised for mb in micro_batches), sum(mb.tokens for mb in micro_batches),
                                   sum(mb.capacity for mb in micro_batches)], dtype=torch.float64)
            dist.all_reduce(counts)  # supervised tokens of the whole step, all ranks
            step_supervised = max(1.0, float(counts[0]))
            lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
            loss_sum = torch.zeros((), dtype=torch.float64)
            for mb in micro_batches:
                loss = engine(mb.to(device))
                loss_sum += loss.detach().double().cpu()
                engine.backward(loss * (world / step_supervised), scale_wrt_gas=False)
                engine.step()
            dist.all_reduce(loss_sum)
            step += 1
            packed_tokens += float(counts[1])
            capacity += float(counts[2])
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                norm = engine.get_global_grad_norm()
                elapsed = time.perf_counter() - t0
                logger.write({"stage": stage.name, "step": step, "epoch": epoch, "loss": float(loss_sum) / step_supervised,
                              "lr": lr, "grad_norm": float(norm) if norm is not None else None,
                              "tokens_per_s": float(counts[1]) / elapsed, "supervised_fraction": float(counts[0] / max(1, counts[1])),
                              "packing_efficiency": float(counts[1] / max(1, counts[2]))})
                bar.set_postfix(loss=f"{float(loss_sum) / step_supervised:.4f}", refresh=False)
            bar.update(1)
            stopping = cfg.stop_after is not None and step >= cfg.stop_after and step < total
            if (cfg.save_every and step % cfg.save_every == 0 and step < total) or stopping:
                engine.save_checkpoint(str(ckpt_dir), tag=f"step-{step}", client_state={"global_step": step})
            if stopping:
                bar.close()
                logger.close()
                return {"stage": stage.name, "steps": step, "stopped": True, "examples": prepared.counts,
                        "packing_efficiency": packed_tokens / capacity if capacity else None, "model": None}
    bar.close()
    logger.close()
    final = out_dir / "model"
    _save_hf(engine, model, tokenizer, final, cfg.zero_stage, rank)
    dist.barrier()
    summary = {"stage": stage.name, "steps": step, "examples": prepared.counts,
               "packing_efficiency": packed_tokens / capacity if capacity else None, "model": str(final)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.destroy() if hasattr(engine, "destroy") else None
    return summary


def freeze_below(model: Any, top: int) -> None:
    """Leave only the top `top` decoder layers and the final norm trainable (Llama/Mistral/Qwen2 layout)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None or not 0 < top <= len(layers):
        raise Orca2Error(f"train_layers {top}: the model has {len(layers) if layers is not None else 'no'} decoder layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(layers[-top:]) + [getattr(base, "norm", None)]:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)


def _save_hf(engine: Any, model: Any, tokenizer: Any, folder: Path, zero_stage: int, rank: int) -> None:
    """The final weights in HF format (safetensors + tokenizer + chat template), gathered from ZeRO-3 shards."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    if state is not None:  # keys carry the wrapper's "model." prefix
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    folder.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa")  # the packing-only attention is not what a loader of the model should get
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)


class _Logger:
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


def _progress(rank: int, total: int, start: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train every stage in order (a finished stage is skipped on re-runs); the last stage's model is <output>/model."""
    from orca2.config import save_config

    import torch

    from orca2.models import check_student

    deepspeed_config(cfg, cfg.dtype == "bf16" or (cfg.dtype == "auto" and torch.cuda.is_available()))  # fail early
    check_student(cfg.model)  # before DeepSpeed builds its ops or starts processes
    for stage in cfg.resolved_stages():
        for path in stage.data:
            if not Path(path).is_file():
                raise Orca2Error(f"{path}: no such training data file (stage {stage.name})")
    rank, world = init_distributed()
    output = Path(cfg.output)
    stages = cfg.resolved_stages()
    model_spec = cfg.model
    summaries = []
    for i, stage in enumerate(stages):
        out_dir = output if len(stages) == 1 else output / f"stage-{i}-{stage.name}"
        done = out_dir / "summary.json"
        if done.exists() and (out_dir / "model" / "config.json").exists() and (cfg.resume or len(stages) > 1):
            summaries.append(json.loads(done.read_text()))
        else:
            summaries.append(train_stage(cfg, stage, i, model_spec, out_dir, rank, world))
            if summaries[-1].get("stopped"):
                return {"world_size": world, "stages": summaries, "model": None, "stopped": True}
        model_spec = str(out_dir / "model")
    if rank == 0:
        save_config(cfg, output / "config.yaml")
        if len(stages) > 1:
            final = output / "model"
            if final.is_symlink() or final.exists():
                final.unlink() if final.is_symlink() else None
            if not final.exists():
                final.symlink_to(Path(model_spec).resolve())
    return {"world_size": world, "stages": summaries, "model": str(output / "model")}
