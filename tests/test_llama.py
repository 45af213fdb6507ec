"""orca2.llama, the engine's own Llama, against transformers' LlamaForCausalLM: the same logits bit for bit, in the
model's forward and inside the engine, over the configs a Llama checkpoint comes in; and what it refuses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from orca2 import llama
from orca2.engine import stop_token_ids
from orca2.errors import Orca2Error
from orca2.models import load_local_model

sys.path.insert(0, os.path.dirname(__file__))
from conftest import RecordingEngine, build_tiny_model, chat_ids, conversations  # noqa: E402


def save_llama(folder, **overrides):
    """A random LlamaForCausalLM saved as safetensors (config as transformers writes it, then `overrides`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    return folder


CONFIGS = {
    "tied, GQA": {},
    "untied head": {"tie_word_embeddings": False},
    "MHA, biases": {"num_key_value_heads": 6, "attention_bias": True, "mlp_bias": True},
    "head_dim 16 of hidden 48 / 6 heads": {"head_dim": 16},
    "rope theta 500000, eps 1e-5": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_the_same_logits_as_transformers_bit_for_bit(tmp_path, config, dtype):
    from transformers import AutoModelForCausalLM

    folder = save_llama(tmp_path / "m", **CONFIGS[config])
    assert llama.supports(folder) is None
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    mine = llama.load(folder, dtype)
    ids = torch.randint(0, 97, (3, 41), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(41).expand(3, -1) + torch.tensor([[0], [7], [300]])  # rows at different offsets
    keep = torch.tensor([0, 17, 40])
    with torch.inference_mode():
        expected = reference(input_ids=ids, position_ids=positions, logits_to_keep=keep).logits
        got = mine(input_ids=ids, position_ids=positions, logits_to_keep=keep).logits
        assert torch.equal(got, expected)
        assert torch.equal(mine(ids).logits, reference(input_ids=ids).logits)  # default positions, every logit
    assert (mine.lm_head.weight is mine.model.embed_tokens.weight) == (config != "untied head")
    assert mine.dtype == dtype and not any(p.requires_grad for p in mine.parameters())


def test_an_older_config_with_rope_theta_at_the_top(tmp_path):
    """config.json written by transformers 4.x: rope_theta and rope_scaling at the top level, no head_dim."""
    from transformers import AutoModelForCausalLM

    folder = save_llama(tmp_path / "m", rope_theta=20000.0)
    raw = json.loads((folder / "config.json").read_text())
    theta = raw.pop("rope_parameters")["rope_theta"]
    raw.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps({**raw, "rope_theta": theta, "rope_scaling": None}))
    assert llama.supports(folder) is None and llama.read_config(folder).rope_theta == 20000.0
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
        assert torch.equal(llama.load(folder, torch.float32)(ids).logits, expected)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A chat model wide enough for the CPU's blocked GEMM paths (hidden 192), with its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("chat"), hidden=192, layers=3, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_engine_computes_the_same_logits_with_either_model(chat_folder, dtype, attention):
    """Every logit row each next token came from, over single-turn, system-prompt and multi-turn chats, in 5 slots
    (prefills packed, a shared prefix kept, slots reused): transformers' model and orca2.llama's, bit for bit."""
    reference, tok = load_local_model(str(chat_folder), "cpu", dtype)
    mine, _ = load_local_model(str(chat_folder), "cpu", dtype, engine=True)
    assert isinstance(mine, llama.LlamaForEngine) and not isinstance(reference, llama.LlamaForEngine)
    from orca2.engine import Job

    ids = chat_ids(tok, conversations())
    seen = []
    for model in (reference, mine):
        engine = RecordingEngine(model, stop_token_ids(tok, model), slots=5)
        engine.run([Job(str(i), x, 1, 12) for i, x in enumerate(ids)], lambda job: None, pytest.fail)
        assert engine.fused is not None and engine.prefill_tokens_saved > 0
        seen.append(engine.seen)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == len(ids)
    for key, rows in seen[0].items():
        assert len(rows) == len(seen[1][key])
        for step, (a, b) in enumerate(zip(rows, seen[1][key])):
            assert torch.equal(a, b), f"prompt {key} step {step}"
    assert stop_token_ids(tok, mine) == stop_token_ids(tok, reference)


def edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    "change,why",
    [
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model type 'qwen2'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE type 'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "model type"),
    ],
)
def test_what_it_does_not_cover_goes_to_transformers_with_the_reason(tmp_path, change, why):
    folder = edit_config(save_llama(tmp_path / "m"), **change)
    assert why in llama.supports(folder)


def test_a_sharded_checkpoint_goes_to_transformers_and_a_broken_one_fails_in_one_line(tmp_path, chat_folder):
    import shutil

    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(chat_folder, sharded)
    shard = "model-00001-of-00001.safetensors"
    (sharded / "model.safetensors").rename(sharded / shard)
    index = {"metadata": {}, "weight_map": {name: shard for name in load_file(sharded / shard)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "no model.safetensors" in llama.supports(sharded)
    model, _ = load_local_model(str(sharded), "cpu", torch.float32, engine=True)
    assert not isinstance(model, llama.LlamaForEngine)

    broken = tmp_path / "broken"
    shutil.copytree(chat_folder, broken)
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(Orca2Error, match=rf"model\.safetensors: {name} has shape \(384, 191\).*\(384, 192\)"):
        load_local_model(str(broken), "cpu", torch.float32, engine=True)
    del tensors[name]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(Orca2Error, match=rf"model\.safetensors: no tensor for {name}"):
        load_local_model(str(broken), "cpu", torch.float32, engine=True)


def test_a_local_teacher_starts_without_transformers_modelling_code(chat_folder, tmp_path):
    """`local:` in a fresh process: the engine's model is orca2.llama's and transformers' model classes (which import
    torch's compiler) are never imported; ORCA2_ENGINE_MODEL=transformers loads transformers' model instead."""
    script = textwrap.dedent(
        f"""
        import sys
        from orca2.backends.local import LocalBackend
        from orca2.models import ClientConfig, Sampling
        backend = LocalBackend({str(chat_folder)!r}, ClientConfig(dtype="float32", batch_size=4))
        heavy = sorted(m for m in ("transformers.modeling_utils", "torch._dynamo") if m in sys.modules)
        print(type(backend.model).__name__, heavy or "none")
        """
    )
    env = {**os.environ, "ORCA2_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["LlamaForEngine", "none"]
    env["ORCA2_ENGINE_MODEL"] = "transformers"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[0] == "LlamaForCausalLM"
