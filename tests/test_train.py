"""Real DeepSpeed runs on CPU (gloo): 2-process ZeRO-2 and ZeRO-3 jobs, one-process runs in this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orca2.config import load_config
from orca2.errors import Orca2Error
from orca2.train import trainer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import child_env  # noqa: E402

BASE = {"max_len": 1024, "lr": 1e-3, "warmup_ratio": 0.0, "mask_check": 4, "log_every": 1}


def train_in_process(tmp_path, name, data, model, **kw):
    cfg = load_config(
        trainer.TrainConfig,
        None,
        (),
        {"model": str(model), "data": (str(data),), "output": str(tmp_path / name), **BASE, **kw},
    )
    trainer.run(cfg)
    return read_log(tmp_path / name)


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def train_two_ranks(tmp_path, name, data, model, zero, loss_impl="naive"):
    env = child_env()
    args = [
        sys.executable,
        "-m",
        "orca2",
        "train",
        "--nproc",
        "2",
        "--model",
        str(model),
        "--data",
        str(data),
        "-o",
        str(tmp_path / name),
        "--set",
        f"zero_stage={zero}",
        "--set",
        "grad_accum=2",
        "--set",
        "epochs=3",
        "--set",
        f"loss_impl={loss_impl}",
    ]
    args += [f"--set={k}={v}" for k, v in BASE.items()]
    shared = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    left = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shared
    assert not left, f"the ranks left DeepSpeed's all-reduce memory behind: {sorted(map(str, left))}"
    return read_log(tmp_path / name)


def weights(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("zero, loss_impl", [(2, "naive"), (3, "naive"), (3, "fused")])
def test_two_rank_job_learns_and_equals_one_rank(tmp_path, tiny_model, sft_file, zero, loss_impl):
    """Also: the fused loss under ZeRO-3 (lm_head gathered as an external parameter) equals the naive loss."""
    two = train_two_ranks(tmp_path, f"zero{zero}", sft_file, tiny_model, zero, loss_impl)
    one = train_in_process(tmp_path, "one", sft_file, tiny_model, grad_accum=4, epochs=3, zero_stage=zero)
    assert len(two) == len(one) == 3 * 3  # 24 examples → 12 packed rows → 3 steps of 4 rows per epoch
    assert two[-1]["loss"] < two[0]["loss"] - 0.2  # the loss falls
    for a, b in zip(two, one):  # two ranks × GA 2 = one rank × GA 4, step by step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w2, w1 = weights(tmp_path / f"zero{zero}" / "model"), weights(tmp_path / "one" / "model")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


def test_grad_accumulation_equals_batch(tmp_path, tiny_model, sft_file):
    ga = train_in_process(
        tmp_path, "ga", sft_file, tiny_model, packing=False, micro_batch_size=1, grad_accum=4, max_steps=3
    )
    batch = train_in_process(
        tmp_path, "batch", sft_file, tiny_model, packing=False, micro_batch_size=4, grad_accum=1, max_steps=3
    )
    for a, b in zip(ga, batch):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_resume_equals_straight_run(tmp_path, tiny_model, sft_file):
    common = {"packing": False, "micro_batch_size": 2, "max_steps": 10, "epochs": 2}
    straight = train_in_process(tmp_path, "straight", sft_file, tiny_model, **common)
    first = train_in_process(tmp_path, "resumed", sft_file, tiny_model, stop_after=5, **common)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5] and not (tmp_path / "resumed" / "model").exists()
    both = train_in_process(tmp_path, "resumed", sft_file, tiny_model, resume=True, **common)
    assert [r["step"] for r in both] == list(range(1, 11))  # the log goes on from step 6
    for a, b in zip(straight, both):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == pytest.approx(b["lr"])
    w_straight, w_resumed = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    for key in w_straight:
        torch.testing.assert_close(w_resumed[key], w_straight[key], rtol=1e-6, atol=1e-7)


def test_progressive_stages_and_chatml(tmp_path, tiny_model, sft_file):
    config = tmp_path / "train.yaml"
    config.write_text(f"""model: {tiny_model}
output: {tmp_path / "run"}
chat_template: chatml
max_len: 1024
warmup_ratio: 0.0
stages:
  - {{name: flan, data: [{sft_file}], epochs: 1, lr: 0.001}}
  - {{name: gpt4, data: [{sft_file}], epochs: 2, lr: 0.0005}}
""")
    cfg = load_config(trainer.TrainConfig, config)
    summary = trainer.run(cfg)
    assert [s["stage"] for s in summary["stages"]] == ["flan", "gpt4"]
    first = read_log(tmp_path / "run" / "stage-0-flan")
    second = read_log(tmp_path / "run" / "stage-1-gpt4")
    assert first[0]["lr"] == pytest.approx(0.001) and second[0]["lr"] == pytest.approx(0.0005)
    assert second[0]["loss"] < first[0]["loss"]  # stage 2 starts from stage 1's weights, not from scratch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "model"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_bad_configs_fail_before_training(tmp_path, tiny_model, sft_file):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = load_config(
        trainer.TrainConfig,
        None,
        (),
        {
            "model": str(tiny_model),
            "data": (str(sft_file),),
            "output": str(tmp_path / "x"),
            "deepspeed_config": str(ds),
        },
    )
    with pytest.raises(
        Orca2Error, match=r"ds.json: 'train_micro_batch_size_per_gpu' is 8 but the training config says 1"
    ):
        trainer.run(cfg)
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(Orca2Error, match="'optimizer' is set by orca2"):
        trainer.run(cfg)
    with pytest.raises(Orca2Error, match="no such training data file"):
        trainer.run(
            load_config(
                trainer.TrainConfig, None, (), {"model": str(tiny_model), "data": ("missing.jsonl",), "output": "x"}
            )
        )
    with pytest.raises(Orca2Error, match="either data .* or stages"):
        load_config(trainer.TrainConfig, None, (), {"model": "m", "output": "x"})
    assert not (tmp_path / "x").exists()


def test_train_layers_freezes_all_but_the_top(tmp_path, tiny_model, sft_file):
    train_in_process(tmp_path, "top", sft_file, tiny_model, train_layers=1, max_steps=2)
    before, after = weights(tiny_model), weights(tmp_path / "top" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    with pytest.raises(Orca2Error, match="train_layers 9: the model has 2 decoder layers"):
        train_in_process(tmp_path, "bad", sft_file, tiny_model, train_layers=9, max_steps=1)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """A process killed while DeepSpeed JIT-built its shared-memory op left torch's build lock behind, and every
    later training waited on it forever (seen: a test killed by its timeout mid-build)."""
    import os
    import time

    from orca2.train.engine import _clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    _clear_stale_build_locks()
    assert not stale.exists() and fresh.exists() and "removed a stale build lock" in caplog.text
