"""A Llama-style causal LM for the local engine, built by orca2 from a model folder (config.json + safetensors)
without transformers' modelling code.

Why: importing transformers' model classes pulls in torch's compiler and distributed-tensor packages (≈ 1.5 s of a
2-core machine's start-up) and from_pretrained builds and initialises every module before loading; this loads
SmolLM2-135M in ≈ 0.1 s. It computes as transformers' LlamaForCausalLM (5.x) does, op for op — the same norm,
rotary embedding, products and residual order — so greedy replies and logits are the same bit for bit; the tests
hold it to that against the transformers model. Only what the engine runs is here: no training, no cache, no
masks (the engine's attention, orca2.engine.slot_attention, knows each sequence's keys). A folder this does not
cover (another architecture, RoPE scaling, a sharded or .bin checkpoint) is loaded through transformers instead
(`supports` says why not, in words).

The module tree has transformers' names (model.layers[i].self_attn.q_proj, mlp.gate_proj, input_layernorm, ...,
lm_head), so the engine's decode step (orca2.engine._Fused) runs either model the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# LlamaConfig's defaults (transformers 5.x) for keys a config.json may leave out
DEFAULTS = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_theta": 10000.0,
}
WEIGHTS = "model.safetensors"


class Config(SimpleNamespace):
    """The config.json keys the engine reads, with LlamaConfig's defaults."""

    def get_text_config(self) -> Config:
        return self


def read_config(folder: Path) -> Config:
    raw = json.loads((folder / "config.json").read_text())
    cfg = Config(**{**DEFAULTS, **raw})
    cfg.num_key_value_heads = raw.get("num_key_value_heads") or cfg.num_attention_heads
    cfg.head_dim = raw.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
    rope = raw.get("rope_parameters") or {}
    cfg.rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", DEFAULTS["rope_theta"])))
    cfg.rope_type = rope.get("rope_type") or (raw.get("rope_scaling") or {}).get("rope_type") or "default"
    return cfg


def supports(folder: Path) -> str | None:
    """None if this module loads the model in `folder`, else why not (the engine then loads it through
    transformers)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json: {exc}"
    if raw.get("model_type") != "llama" or raw.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        return f"model type {raw.get('model_type')!r} (covered: llama)"
    cfg = read_config(folder)
    if cfg.rope_type != "default" or raw.get("rope_scaling"):
        return f"RoPE type {cfg.rope_type!r} (covered: default)"
    if cfg.hidden_act != "silu":
        return f"activation {cfg.hidden_act!r} (covered: silu)"
    if raw.get("pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if not (folder / WEIGHTS).is_file():
        return f"no {WEIGHTS} (a sharded or .bin checkpoint)"
    return None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32, rounded back to the input's dtype before the weight, as transformers' LlamaRMSNorm
        wide = x.to(torch.float32)
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * wide.to(x.dtype)


class Rotary(nn.Module):
    """cos and sin (rows, tokens, head_dim) of positions (rows, tokens), computed in fp32, returned in x's dtype."""

    def __init__(self, cfg: Config):
        super().__init__()
        # on the CPU even when the model is built on the meta device (there arange goes through torch's compiler)
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu") / cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta**exponents), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: Any, sin: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (rows, heads, tokens, dim) rotated by cos/sin (rows, tokens, dim): x·cos + rotate_half(x)·sin,
    where rotate_half(x) = (-x[half:], x[:half])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, cfg.head_dim
        self.scaling = self.head_dim**-0.5
        heads, kv, width, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=bias)

    def forward(self, x: torch.Tensor, cos: Any, sin: Any, step: Any, attend: Any) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, k, cos, sin)
        if step is not None:  # the engine's attention over its slot buffers
            out, _ = attend(self, q, k, v, None, scaling=self.scaling, orca2_step=step)
        else:  # outside the engine (tests, a look at the model): plain causal attention
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.scaling)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        width, inner, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(width, inner, bias=bias)
        self.up_proj = nn.Linear(width, inner, bias=bias)
        self.down_proj = nn.Linear(inner, width, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg, layer_idx), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: Any, sin: Any, step: Any, attend: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        # given a weight, so none is drawn (on the meta device a normal_ draw imports torch's compiler: ≈ 1.2 s)
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id, _weight=weight)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Rotary(cfg)


class LlamaForEngine(nn.Module):
    """LlamaForCausalLM's inference forward: ids and positions (rows, tokens) → logits of the kept positions."""

    orca2_engine_model = True  # the engine hands it its attention (set_attention), not transformers' registry

    def __init__(self, cfg: Config, generation: Any = None):
        super().__init__()
        self.config, self.generation_config = cfg, generation
        self.attention: Any = None  # called as transformers calls an attention function, where a step is given
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def set_attention(self, attend: Any) -> None:
        """The function a forward with an engine step attends with: attend(module, q, k, v, mask, scaling=,
        orca2_step=) → (output (rows, tokens, heads, dim), None), as transformers calls a registered attention."""
        self.attention = attend

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        orca2_step: Any = None,
        logits_to_keep: Any = 0,
        **_: Any,
    ) -> SimpleNamespace:
        if orca2_step is not None and self.attention is None:
            raise RuntimeError("an engine step needs the engine's attention: call set_attention first")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, orca2_step, self.attention)
        hidden = self.model.norm(hidden)
        if isinstance(logits_to_keep, int):  # the last n positions (0: all)
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        return SimpleNamespace(logits=self.lm_head(hidden))


def load(folder: Path, dtype: torch.dtype, device: str = "cpu") -> LlamaForEngine:
    """The model in `folder` (see `supports`), its weights in `dtype` on `device`. Built on the meta device and
    filled from the safetensors file, so no weight is initialised only to be overwritten."""
    from safetensors import safe_open

    cfg = read_config(folder)
    generation = SimpleNamespace(eos_token_id=cfg.eos_token_id)  # as transformers falls back to the config's
    if (folder / "generation_config.json").is_file():
        generation = SimpleNamespace(**json.loads((folder / "generation_config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForEngine(cfg, generation)
    names = {name for name, _ in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / WEIGHTS), framework="pt", device="cpu") as f:
        for name in f.keys():
            if name in names:
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
            elif not name.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"{folder / WEIGHTS}: unexpected tensor {name!r} for a {cfg.model_type} model")
    if "lm_head.weight" not in tensors and cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
    missing = sorted(names - {n for n, t in tensors.items() if t is not None})
    if missing:
        raise ValueError(f"{folder / WEIGHTS}: no tensor for {', '.join(missing[:3])}")
    for name, tensor in tensors.items():
        want = model.get_parameter(name).shape
        if tensor.shape != want:
            shape = tuple(tensor.shape)
            raise ValueError(f"{folder / WEIGHTS}: {name} has shape {shape}, the config says {tuple(want)}")
    model.load_state_dict(tensors, assign=True, strict=True)
    model.model.rotary_emb.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
