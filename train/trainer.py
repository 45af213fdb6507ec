"""Stage `train`: fine-tune the student with DeepSpeed under one objective — sft, dpo or kto.

    orca2 train --objective dpo --data pairs.jsonl -o runs/dpo                  # one process
    deepspeed --num_gpus 8 --module orca2.train --config train.yaml             # many GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module orca2.train --config ... # 2 CPU ranks (gloo)

The loop is the same for every objective; an objective is a recipe (train/sft.py, dpo.py, kto.py)
that prepares its data, gives the micro-batches of an epoch, and a module whose forward returns the
micro-batch's share of the optimizer step's loss. Shares are normalised by counts of the *whole* step
(all micro-batches, all ranks; `Recipe.step_context`), × world size because DeepSpeed averages
gradients over ranks, with DeepSpeed's own 1/GA scaling off: GA 4 × batch 1 equals batch 4, two ranks
equal one, and a filler micro-batch (a rank with fewer micro-batches) contributes exactly zero.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from orca2.config import option
from orca2.errors import Orca2Error
from orca2.stages import Stage

log = logging.getLogger(__name__)
OBJECTIVES = ("sft", "dpo", "kto")


@dataclass(frozen=True)
class StageConfig:
    data: tuple[str, ...] = option(
        help="JSONL files: SFT records (orca2 erase output) or preference records (dpo, kto)."
    )
    name: str = option("sft", "The stage's name in logs and checkpoints.")
    epochs: int = option(1, "Passes over the stage's data.")
    lr: float = option(2e-5, "Peak learning rate.")
    max_steps: int | None = option(None, "Stop this stage after this many optimizer steps.")


PREFERENCE_KEYS = (
    "beta",
    "label_smoothing",
    "sft_weight",
    "desirable_weight",
    "undesirable_weight",
    "reference",
    "reference_mode",
    "reference_logps",
)  # TrainConfig keys that only dpo and kto read


@dataclass(frozen=True)
class TrainConfig:
    model: str = option(help="The student: local:default | HF folder | file.gguf | hub name.")
    output: str = option(help="Run folder: checkpoints, logs, final model (HF format) in <output>/model.", short="-o")
    data: tuple[str, ...] = option((), "Training JSONL (one stage; repeatable); progressive stages: stages.")
    stages: tuple[StageConfig, ...] = option(
        (), "Progressive learning: a list of {data, name, epochs, lr, max_steps}, each from the previous weights."
    )
    objective: Literal["sft", "dpo", "kto"] = option(
        "sft", "sft: erased traces; dpo: chosen/rejected pairs; kto: replies labelled desirable/undesirable."
    )
    chat_template: Literal["tokenizer", "chatml"] = option(
        "tokenizer", "The tokenizer's own template, or ChatML (adds <|im_start|>/<|im_end|> tokens)."
    )
    max_len: int = option(2048, "Tokens per packed row / example.")
    overlong: Literal["drop", "truncate"] = option("drop", "Examples longer than max_len (counted either way).")
    packing: bool = option(True, "Best-fit-decreasing packing with per-example attention.")
    attention: Literal["auto", "loop", "flex", "flash"] = option(
        "auto", "Packed rows' kernel; auto: flash/flex on GPU, loop on CPU."
    )
    micro_batch_size: int = option(1, "Rows per micro-batch (packed rows, or examples / preference groups unpacked).")
    grad_accum: int = option(1, "Micro-batches per optimizer step (per rank).")
    epochs: int = option(1, "Epochs, for stages that do not say.")
    lr: float = option(2e-5, "Peak learning rate, for stages that do not say.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: tuple[float, ...] = option((0.9, 0.95), "AdamW betas.")
    warmup_ratio: float = option(0.03, "Warm-up share of each stage's steps.")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate schedule after warm-up.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3; picks train/zero<N>.json unless deepspeed_config is given.")
    deepspeed_config: str | None = option(None, 'Your DeepSpeed JSON; "auto" values are filled from this config.')
    dtype: Literal["auto", "bf16", "fp32"] = option("auto", "Training dtype; auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).")
    train_layers: int | None = option(
        None, "Train only the top N transformer layers + final norm (embeddings frozen): CPU demos."
    )
    loss_impl: Literal["naive", "fused"] = option(
        "naive", "fused: log-probs / cross-entropy from hidden states, no logits."
    )
    # --- preference objectives (dpo, kto) ---
    beta: float = option(0.1, "DPO/KTO temperature of the implicit reward β·log(π/π_ref).")
    label_smoothing: float = option(0.0, "DPO: assumed probability that a pair's label is flipped (conservative DPO).")
    sft_weight: float = option(0.0, "DPO: weight of the NLL of chosen replies per token added to the loss (RPO's α).")
    desirable_weight: float = option(1.0, "KTO λ_D.")
    undesirable_weight: float = option(1.0, "KTO λ_U.")
    reference: str | None = option(None, "dpo/kto reference model (default: the policy each stage starts from).")
    reference_mode: Literal["precomputed", "resident"] = option(
        "precomputed", "Reference log-probs once before training, or a reference model kept in memory."
    )
    reference_logps: str | None = option(None, "Where stored reference log-probs live (default: beside the data).")
    # ---
    save_every: int = option(0, "Checkpoint every N optimizer steps (0: only at the end of each stage).")
    resume: bool = option(False, "Continue from the newest checkpoint in <output>/checkpoints.")
    log_every: int = option(1, "Log every N optimizer steps.")
    seed: int = option(0, "Seed of the data order and initialisation.")
    mask_check: int = option(8, "Examples whose supervised spans are decoded and compared before training.")
    max_steps: int | None = option(None, "Optimizer steps, for stages that do not say.")
    stop_after: int | None = option(None, "Time-boxed jobs: checkpoint and stop after this many steps (resume later).")

    def __post_init__(self) -> None:
        if bool(self.data) == bool(self.stages):
            raise Orca2Error("train: give either data (one stage) or stages (progressive), not both or neither")
        if self.zero_stage not in (0, 1, 2, 3):
            raise Orca2Error(f"train: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_len < 16 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise Orca2Error("train: max_len >= 16, micro_batch_size >= 1 and grad_accum >= 1 required")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.sft_weight < 0:
            raise Orca2Error("train: beta > 0, 0 <= label_smoothing < 0.5 and sft_weight >= 0 required")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise Orca2Error("train: desirable_weight and undesirable_weight must be > 0")

    def resolved_stages(self) -> list[StageConfig]:
        if self.data:
            return [
                StageConfig(
                    data=self.data, epochs=self.epochs, lr=self.lr, max_steps=self.max_steps, name=self.objective
                )
            ]
        return list(self.stages)


class Batch(Protocol):
    tokens: int  # real tokens
    capacity: int  # token slots it stands for (packing efficiency = tokens / capacity)

    def to(self, device: Any) -> Batch: ...


class Recipe(Protocol):
    """What an objective gives the loop (see train/sft.py for the smallest one)."""

    counts: dict[str, int]  # accounting: records read, kept, dropped by reason
    module: Any  # nn.Module; forward(batch, ctx) -> (loss share, {stat name: share of the step's value})

    def batches(self, epoch: int) -> list[Batch]: ...  # every micro-batch of an epoch (the same list on every rank)

    def empty(self) -> Batch: ...  # a filler that contributes nothing

    def step_context(self, engine: Any, micro_batches: list[Batch], device: Any) -> dict[str, Any]: ...


def all_reduced(values: dict[str, float]) -> dict[str, float]:
    """Sum named numbers over ranks (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _read_stage_records(stage: StageConfig) -> list[tuple[str, dict[str, Any]]]:
    from orca2.io import read_numbered

    return [(f"{path}:{line}", r) for path in stage.data for line, r in read_numbered(path)]


def prepare_model(cfg: TrainConfig, model_spec: str, first_stage: bool) -> tuple[Any, Any]:
    """The student as every objective trains it: chat template, packed attention, frozen layers, checkpointing."""
    from orca2.train.model import load_student, use_chatml

    model, tokenizer = load_student(model_spec)
    if cfg.chat_template == "chatml" and first_stage:
        use_chatml(model, tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise Orca2Error(f"{model_spec}: the tokenizer has no chat template; set chat_template: chatml")
    if cfg.packing:  # padding-free rows: attention per example (varlen), no (T, T) mask
        from orca2.train.attention import register

        model.set_attn_implementation(register(cfg.attention))
    if cfg.train_layers is not None:
        from orca2.train.engine import freeze_below

        freeze_below(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer


def _rank_steps(recipe: Any, epoch: int, rank: int, world: int, grad_accum: int) -> list[list[Batch]]:
    """This rank's micro-batches for one epoch, grouped by optimizer step (all ranks get the same count).
    Global step k holds micro-batches [k·GA·world, (k+1)·GA·world) of the epoch on any layout."""
    batches = recipe.batches(epoch)
    per_rank = math.ceil(len(batches) / world)
    steps = math.ceil(per_rank / grad_accum)
    mine = batches[rank::world]
    mine += [recipe.empty()] * (steps * grad_accum - len(mine))  # zero-loss fillers
    return [mine[i : i + grad_accum] for i in range(0, len(mine), grad_accum)]


def _optimizer_step(
    engine: Any, recipe: Any, micro_batches: list[Batch], device: str, world: int
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """One optimizer step over this rank's micro-batches: (loss and stats summed over ranks, tokens and capacity
    over ranks, the recipe's step context)."""
    size = all_reduced(
        {"tokens": sum(mb.tokens for mb in micro_batches), "capacity": sum(mb.capacity for mb in micro_batches)}
    )
    ctx = recipe.step_context(engine, micro_batches, device)
    sums: dict[str, float] = {}
    for mb in micro_batches:
        loss, stats = engine(mb.to(device), ctx)
        for name, value in {"loss": loss, **stats}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()
    return all_reduced(sums), size, ctx


def train_stage(
    cfg: TrainConfig, stage: StageConfig, index: int, model_spec: str, out_dir: Path, rank: int, world: int
) -> dict[str, Any]:
    """Train one stage from `model_spec`; save the final model (HF format) in out_dir/model."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from orca2.train import engine as ds

    device = get_accelerator().device_name()
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device != "cpu")
    model, tokenizer = prepare_model(cfg, model_spec, index == 0)
    started = time.perf_counter()
    recipe_module = importlib.import_module(f"orca2.train.{cfg.objective}")
    records = _read_stage_records(stage)
    recipe: Recipe = recipe_module.Recipe(
        cfg, stage, model, tokenizer, records, model_spec=model_spec, rank=rank, world=world, device=device
    )

    def rank_steps(epoch: int) -> list[list[Batch]]:
        return _rank_steps(recipe, epoch, rank, world, cfg.grad_accum)

    steps_per_epoch = len(rank_steps(0))
    total = steps_per_epoch * stage.epochs
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    engine, scheduler = ds.build_engine(recipe.module, cfg, stage.lr, total, bf16)
    ckpt_dir = out_dir / "checkpoints"
    start = ds.resume_step(engine, ckpt_dir) if cfg.resume else 0
    if start and rank == 0:
        log.info("resumed stage %s at step %d of %d", stage.name, start, total)

    logger = ds.Logger(out_dir, rank, stage.name)
    bar = ds.progress(rank, total, start, f"train {stage.name}")
    step = start
    packed_tokens = capacity = 0.0
    for epoch in range(stage.epochs):
        if step >= total:
            break
        for k, micro_batches in enumerate(rank_steps(epoch)):
            if epoch * steps_per_epoch + k < step:
                continue  # already trained before the resume
            if step >= total:
                break
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
            sums, size, ctx = _optimizer_step(engine, recipe, micro_batches, device, world)
            step += 1
            packed_tokens += size["tokens"]
            capacity += size["capacity"]
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                norm = engine.get_global_grad_norm()
                row = {"stage": stage.name, "step": step, "epoch": epoch, **sums, "lr": lr}
                row["grad_norm"] = float(norm) if norm is not None else None
                row["tokens_per_s"] = size["tokens"] / (time.perf_counter() - t0)
                row.update(ctx.get("log", {}), packing_efficiency=size["tokens"] / max(1.0, size["capacity"]))
                logger.write(row)
                bar.set_postfix(loss=f"{sums['loss']:.4f}", refresh=False)
            bar.update(1)
            stopping = cfg.stop_after is not None and step >= cfg.stop_after and step < total
            if (cfg.save_every and step % cfg.save_every == 0 and step < total) or stopping:
                ds.save_checkpoint(engine, ckpt_dir, step)
            if stopping:
                bar.close()
                logger.close()
                summary = {"stage": stage.name, "objective": cfg.objective, "steps": step, "stopped": True}
                efficiency = packed_tokens / capacity if capacity else None
                return {**summary, "examples": recipe.counts, "model": None, "packing_efficiency": efficiency}
    bar.close()
    logger.close()
    ds.save_hf(engine, model, tokenizer, out_dir / "model", cfg.zero_stage, rank)
    dist.barrier()
    efficiency = packed_tokens / capacity if capacity else None
    summary = _summary(cfg, stage, recipe, step, efficiency, out_dir / "model", time.perf_counter() - started)
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.destroy() if hasattr(engine, "destroy") else None
    return summary


def _summary(
    cfg: TrainConfig, stage: StageConfig, recipe: Any, steps: int, efficiency: float | None, final: Path, seconds: float
) -> dict[str, Any]:
    """A finished stage: its steps, examples, packing, model, and seconds (data, reference pass, steps and save)."""
    reference = getattr(recipe, "reference", None)
    return {
        "stage": stage.name,
        "objective": cfg.objective,
        "steps": steps,
        "examples": recipe.counts,
        "packing_efficiency": efficiency,
        "model": str(final),
        "reference_seconds": round(reference.seconds if reference is not None else 0.0, 2),
        "seconds": round(seconds, 2),
    }


def check_data_kind(cfg: TrainConfig) -> None:
    """A preference file given to sft, or SFT records given to dpo/kto: one line naming the file and line, before
    any step."""
    from orca2.io import iter_json_lines
    from orca2.records import is_preference

    for stage in cfg.resolved_stages():
        for path in stage.data:
            if not Path(path).is_file():
                raise Orca2Error(f"{path}: no such training data file (stage {stage.name})")
            for line, obj in iter_json_lines(path):
                if not isinstance(obj, dict):
                    break  # the record reader names this error
                preference = is_preference(obj)
                if cfg.objective == "sft" and preference:
                    raise Orca2Error(
                        f"{path}:{line}: a preference record (chosen/rejected replies) but objective is sft; "
                        "use --objective dpo or kto"
                    )
                if cfg.objective != "sft" and not preference:
                    raise Orca2Error(
                        f"{path}:{line}: an SFT record (no chosen/rejected replies) but objective is "
                        f"{cfg.objective}; use --objective sft or give preference records"
                    )
                break


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train every stage in order (a finished stage is skipped on re-runs); the last stage's model is <output>/model."""
    import torch

    from orca2.config import save_config
    from orca2.models import check_student
    from orca2.train.engine import deepspeed_config, init_distributed

    deepspeed_config(cfg, cfg.dtype == "bf16" or (cfg.dtype == "auto" and torch.cuda.is_available()))  # fail early
    check_student(cfg.model)  # before DeepSpeed builds its ops or starts processes
    if cfg.attention in ("flex", "flash") and not torch.cuda.is_available():
        raise Orca2Error(
            f"train: attention {cfg.attention} needs a CUDA GPU (PyTorch's flex attention has no CPU backward; "
            "flash-attn is CUDA only); use attention: auto or loop"
        )
    if cfg.reference is not None:
        check_student(cfg.reference)
    check_data_kind(cfg)
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


def show(summary: dict[str, Any], cfg: TrainConfig) -> str:
    """What `orca2 train` prints (rank 0 only): each stage's steps and packing, then the final model."""
    if int(os.environ.get("RANK", "0")) != 0:
        return ""
    lines = [
        f"stage {s['stage']}: {s['steps']} steps, examples {s['examples']}, "
        f"packing efficiency {s['packing_efficiency'] or 0:.3f}"
        for s in summary["stages"]
    ]
    return "\n".join(lines + [f"final model (HF format): {summary['model']}"])


def wire(run_: Any) -> TrainConfig:
    """In `orca2 run`: the run's training data (erase's SFT data unless another stage says) → <run>/student."""
    from orca2.models import check_student

    wired = {"data": (str(run_.paths["train_data"]),), "output": str(run_.paths["student"])}
    cfg = run_.build(TrainConfig, run_.section("train", wired), "train.")
    try:
        check_student(cfg.model)
    except Orca2Error as exc:
        raise Orca2Error(f"{run_.source}:{run_.lines.get('train.model', 1)}: train.model: {exc}") from None
    return cfg


def files(run_: Any, cfg: TrainConfig) -> tuple[list[Path], list[Path]]:
    return [run_.paths["train_data"]], [run_.paths["student"] / "model"]


def step(run_: Any, cfg: TrainConfig, resume: bool) -> dict[str, Any]:
    """A changed config or input starts the student afresh; a killed attempt with the same config resumes."""
    import shutil

    if not resume and run_.paths["student"].exists():
        shutil.rmtree(run_.paths["student"])
    summary = run(dataclasses.replace(cfg, resume=resume or cfg.resume))
    if summary.get("stopped"):
        raise Orca2Error("training stopped early (stop_after); run again to resume it")
    return {
        "stages": [{"stage": s["stage"], "steps": s["steps"], "examples": s["examples"]} for s in summary["stages"]]
    }


STAGE = Stage("train", TrainConfig, run, show, wire, files, step)
