"""The continuous-batching decode engine behind `local:` models (orca2.backends.local) and the engine benchmark.

The engine keeps one KV buffer per layer of shape (slots, kv_heads, capacity, head_dim); every running
sequence owns a slot and its own length, so there is no padding: a sequence that stops frees its slot
at once and the next waiting prompt joins on the next step. Joining prompts are prefilled together as
one packed row (positions restart per prompt, attention stays inside each prompt), and the n samples
of one request share that prefill: its keys and values are written into n slots. Active sequences
always occupy slots 0..B-1 (a finished one is replaced by the last), so each decode step attends over
a view of the buffers, never a copy.

Prompts that share a prefix of at least 16 tokens with another prompt (a strategy's system prompt, a chat
template's default one) share its prefill too: the prefix is computed once, kept while a waiting
prompt still needs it, and copied into each slot; only the rest of each prompt is prefilled. Waiting
prompts are admitted in token order, so prompts with one prefix run together.

Prefills run the model's own forward (but for a Llama-style model under bf16 on CPU, where the decode step's layers
run them with the native small ops: `_Fused.prefill`); attention is ours, registered under "orca2_slots" in
transformers' AttentionInterface (a registry, not a patch). Decode steps of a Llama-style model (llama, mistral,
qwen2) are run by the engine from the layers' own modules (`_Fused`), with q/k/v and gate/up joined into one product
each, and under bf16 on CPU every product reading weights packed once for oneDNN (the same numbers, a second copy
of the weights); other models decode through their own forward too. Under a bf16 model scores, softmax and the weighted
sum are computed in fp32, so scores are not rounded to bf16 before the softmax. On CPU attention is a native kernel
(orca2.native, csrc/decode_attention.c): a decode step's sequences each over their own keys only, a prefill's
queries each over their own causal span of the prompt's slot, reading the buffers in the model's dtype (bf16
widened exactly as it is read); under bf16 the decode step's norms, rotary embedding and gated activation are
native calls too (csrc/decode_ops.c). Without it (no C compiler, ORCA2_NATIVE=0, a GPU) attention is plain matrix
products and an fp32 softmax (`attend`, not the CPU flash kernel, which ran 5-12x slower in bf16 at decode shapes),
and the buffers hold fp32 under a bf16 model (`cache_dtype`), which torch's products read in place (its bf16
batched product copies a strided slice first, and ran these small products at half the fp32 speed on CPU).

A sequence's numbers do not depend on the batch layout: alone or among 63 others, in any slot count or
arrival order, its logits are the same bit for bit (fp32, and bf16 on a CPU that computes it natively).
The shapes the products see are kept to those that compute every row alike (KEY_ALIGN, padded_rows).
Greedy decoding equals `model.generate` token for token in fp32; sampling draws from a per-sequence
generator seeded from (seed, request, sample), so a request's samples do not depend on the batch either.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orca2 import native
from orca2.errors import Orca2Error

NAME = "orca2_slots"
# Shapes under which every batch layout computes a sequence's numbers alike (measured with torch 2.13's CPU GEMMs:
# an fp32 product rounds differently with fewer than 12 rows unless they are a multiple of 4, and when its column
# count is not a multiple of 8; bf16 products did not vary; tests/test_local_engine.py holds the engine to it).
KEY_ALIGN = 16  # keys attended: a multiple of this (masked beyond each sequence's length)
MIN_QUERY_ROWS = 4  # query rows per head group in a prefill piece
SCORES_PER_PIECE = 1 << 22  # a long prompt's prefill scores are computed in pieces of about this many per head

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: a tokenised prompt and how to sample it (n sequences)."""

    key: str
    prompt: list[int]
    n: int = 1
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    grammar: Any = None  # a compiled grammar (orca2.constrain): every sample's tokens are held to it
    unstarted: int = 0  # samples not yet given a slot
    outputs: dict[int, tuple[list[int], str]] = field(default_factory=dict)  # sample → (tokens, finish reason)
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.unstarted = self.n


@dataclass
class _Seq:
    job: Job
    sample: int
    tokens: list[int]
    generator: Any  # torch.Generator for sampled decoding, None for greedy
    matcher: Any = None  # the grammar's state for a constrained sequence (orca2.constrain), else None


@dataclass
class _Segment:
    """One prompt (or shared prefix) in a packed prefill row."""

    start: int  # its tokens are [start, end) of the row
    end: int
    slots: Any = None  # slots that receive (prefix +) its keys and values; None for a prefix computed for later use
    prefix: tuple[int, ...] | None = None  # the stored prefix it continues (its positions start after it)
    store: tuple[int, ...] | None = None  # keep its keys and values as this prefix
    bias: Any = None  # its causal mask as 0 / -inf, (query rows, keys): the same at every layer, built at the first


@dataclass
class _Packing:
    """A packed prefill row as the native kernel takes it, the same at every layer: where each token's key and value
    are written, and over which slot each token's query attends. One kernel call per layer attends every token; each
    row's numbers are those of the token alone (its keys only), as a decode row's are."""

    slots: Any  # (tokens,) int64: the slot token t attends over (its prompt's; a prefix's first user's)
    lengths: Any  # (tokens,) int64: keys it attends (its position + 1; padding tokens: 1)
    source: Any  # (writes,) int64: row t < tokens is token t's key, tokens + i row i of `earlier`'s keys
    dest_slot: Any  # (writes,) int64: where each written key goes
    dest_pos: Any  # (writes,) int64
    earlier: list[tuple[int, ...]]  # prefixes kept by an earlier row that this row's prompts continue
    stores: list[tuple[tuple[int, ...], int, int]]  # prefixes this row computes and keeps: (prefix, start, end)


def _packing(segments: list[_Segment], device: Any) -> _Packing:
    """Where a packed row's keys go and what each token attends: a prompt's tokens into each of its slots after its
    prefix; a prefix computed in the row into the slots of the prompts that continue it in the row, its queries
    over the first of them; a prefix from an earlier row copied into its prompts' slots; padding over one key."""
    import torch

    here = {seg.store for seg in segments if seg.store is not None}
    users: dict[tuple[int, ...], list[int]] = {}
    for seg in segments:
        if seg.prefix in here and seg.slots is not None:
            users.setdefault(seg.prefix, []).extend(seg.slots.tolist())
    tokens = segments[-1].end
    slots: list[int] = []
    lengths: list[int] = []
    source: list[int] = []
    dest_slot: list[int] = []
    dest_pos: list[int] = []
    earlier: dict[tuple[int, ...], int] = {}  # prefix → its first row in `source` numbering
    stores = []
    for seg in segments:
        n, first = seg.end - seg.start, len(seg.prefix) if seg.prefix is not None else 0
        if seg.store is not None:
            targets = users[seg.store]  # the prompt after it continues it, so there is one
            stores.append((seg.store, seg.start, seg.end))
        else:
            targets = seg.slots.tolist() if seg.slots is not None else []
        for slot in targets:
            source.extend(range(seg.start, seg.end))
            dest_slot.extend([slot] * n)
            dest_pos.extend(range(first, first + n))
        if seg.prefix is not None and seg.prefix not in here:  # its prefix's keys, from the row that computed them
            at = earlier.setdefault(seg.prefix, tokens + sum(map(len, earlier)))
            for slot in targets:
                source.extend(range(at, at + first))
                dest_slot.extend([slot] * first)
                dest_pos.extend(range(first))
        if targets:
            slots.extend([targets[0]] * n)
            lengths.extend(range(first + 1, first + n + 1))
        else:  # padding (dropped): over the first token's slot's first key, which the row writes
            slots.extend([slots[0]] * n)
            lengths.extend([1] * n)

    def tensor(values: list[int]) -> Any:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return _Packing(
        tensor(slots), tensor(lengths), tensor(source), tensor(dest_slot), tensor(dest_pos), list(earlier), stores
    )


def _write_packed(step: _Step, layer: int, k: Any, v: Any) -> None:
    """Write a packed prefill row's keys and values k, v (tokens, kv_heads, head_dim), in the buffers' dtype, where
    step.packing says, at `layer`; keep the prefixes the row computes for later rows."""
    import torch

    plan = step.packing
    for prefix, start, end in plan.stores:
        step.prefixes[prefix][layer] = (k[start:end].transpose(0, 1).clone(), v[start:end].transpose(0, 1).clone())
    if plan.earlier:
        k = torch.cat([k, *(step.prefixes[p][layer][0].transpose(0, 1) for p in plan.earlier)])
        v = torch.cat([v, *(step.prefixes[p][layer][1].transpose(0, 1) for p in plan.earlier)])
    native.write_keys(step.keys[layer], plan.dest_slot, plan.dest_pos, k[plan.source])
    step.values[layer][plan.dest_slot, :, plan.dest_pos] = v[plan.source]


@dataclass
class _Step:
    """What the attention layers need for the forward pass under way."""

    keys: list[Any]  # per layer: (slots, kv_heads, width, head_dim), cache_dtype's; native: a key_buffer, the model's
    values: list[Any]  # the same
    prefixes: dict[tuple[int, ...], list[Any]]  # prefix tokens → per layer (keys, values), each (kv_heads, P, head_dim)
    segments: list[_Segment] = field(default_factory=list)  # prefill: the packed row's prompts
    packing: _Packing | None = None  # prefill on the native kernel: the row's writes and spans
    active: int = 0  # decode: rows 0..active-1
    rows: Any = None  # decode: arange(active)
    positions: Any = None  # decode: (active,) where each new key goes
    bias: Any = None  # decode: (active, 1, 1, 1, span), 0 where a key is valid, -inf elsewhere (one for all layers)
    span: int = 0  # decode: keys attended (the longest sequence + 1, up to a multiple of KEY_ALIGN)
    native: Any = None  # orca2.native's library: decode attends with its kernel (each row over its own keys)


def slot_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    orca2_step: _Step | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention over the engine's slot buffers: query (B, H, q, D), key/value (B, H_kv, q, D) → (B, q, H, D)."""
    if orca2_step is None:  # the model used outside the engine: plain causal SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    import torch

    step, layer = orca2_step, module.layer_idx
    keys, values = step.keys[layer], step.values[layer]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.packing is not None:  # prefill on the native kernel: every token at once, each over its causal span
        k, v = (x[0].transpose(0, 1).to(keys.dtype) for x in (key, value))  # (tokens, kv_heads, head_dim)
        _write_packed(step, layer, k, v)
        plan = step.packing
        out = native.decode_attention(
            step.native, query.transpose(0, 2), None, None, keys, values, plan.lengths, scale, plan.slots
        ).transpose(0, 1)
    elif step.segments:  # prefill: one packed row, each segment causal within itself (after its prefix, if any)
        parts = []
        for seg in step.segments:  # in order: a prefix is stored (at this layer) before the segments that read it
            k = key[0, :, seg.start : seg.end].to(keys.dtype)
            v, q = value[0, :, seg.start : seg.end].to(values.dtype), query[:, :, seg.start : seg.end]
            if seg.store is not None:
                step.prefixes[seg.store][layer] = (k.clone(), v.clone())
            p = 0
            if seg.prefix is not None:
                pk, pv = step.prefixes[seg.prefix][layer]
                k, v, p = torch.cat([pk, k], 1), torch.cat([pv, v], 1), pk.shape[1]
            if seg.slots is not None:
                keys[seg.slots, :, : k.shape[1]] = k
                values[seg.slots, :, : v.shape[1]] = v
            wide = cache_dtype(k.dtype)  # scores in fp32 under a 16-bit model (the buffers may hold its dtype)
            parts.append(_prefill_attention(seg, q, k.to(wide), v.to(wide), p, scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    else:  # decode: one new token per active slot, written at its own length (rows past `active` are padding)
        active, span = step.active, step.span
        if step.native is not None:  # the kernel writes each row's new key and value itself, then attends
            new_key, new_value = key[:active, :, 0], value[:active, :, 0]
            out = native.decode_attention(
                step.native, query[:active], new_key, new_value, keys, values, step.positions + 1, scale
            )
        else:
            keys[step.rows, :, step.positions] = key[:active, :, 0].to(keys.dtype)
            values[step.rows, :, step.positions] = value[:active, :, 0].to(values.dtype)
            out = attend(query[:active], keys[:active, :, :span], values[:active, :, :span], step.bias, scale)
        if query.shape[0] > active:
            out = torch.cat([out, out.new_zeros((query.shape[0] - active, *out.shape[1:]))])
    return out, None


def _prefill_attention(seg: _Segment, q: Any, k: Any, v: Any, p: int, scale: float) -> Any:
    """One prompt's queries (1, H, n, D) at positions p.. over its keys and values (H_kv, p + n, D), causal.

    Shapes are kept to those every layout computes alike: keys padded to a multiple of KEY_ALIGN (masked), at least
    MIN_QUERY_ROWS query rows per head group (padding rows dropped), and a long prompt's scores in pieces."""
    import torch

    n, total = q.shape[2], k.shape[1]
    width = -(-total // KEY_ALIGN) * KEY_ALIGN
    if width > total:
        k = torch.cat([k, k.new_zeros((k.shape[0], width - total, k.shape[2]))], 1)
        v = torch.cat([v, v.new_zeros((v.shape[0], width - total, v.shape[2]))], 1)
    short = -(-MIN_QUERY_ROWS // (q.shape[1] // k.shape[0])) - n
    if short > 0:  # a segment of a token or two: padded with copies of its last query
        q = torch.cat([q, q[:, :, -1:].expand(-1, -1, short, -1)], 2)
    if seg.bias is None:
        rows = p + torch.arange(n, device=q.device)  # query i (position p + i) sees keys 0 .. p + i
        if short > 0:
            rows = torch.cat([rows, rows[-1:].expand(short)])
        visible = torch.arange(width, device=q.device)[None, :] <= rows[:, None]
        seg.bias = torch.zeros(visible.shape, device=q.device).masked_fill_(~visible, float("-inf"))
    piece = max(64, SCORES_PER_PIECE // width)  # queries per piece; the last takes the remainder (never a sliver)
    starts = list(range(0, max(1, q.shape[2] - piece), piece))
    bounds = list(zip(starts, starts[1:] + [q.shape[2]]))
    out = [attend(q[:, :, a:b], k[None], v[None], seg.bias[a:b], scale) for a, b in bounds]
    return (out[0] if len(out) == 1 else torch.cat(out, 1))[:, :n]


def available_memory() -> int:
    """Bytes a process can still take: MemAvailable (free memory plus what the page cache would give back), else
    the free pages alone."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def padded_rows(rows: int) -> int:
    """Rows a decode step computes for `rows` sequences: below 12, the next multiple of 4 (see KEY_ALIGN)."""
    return rows if rows >= 12 else -(-rows // 4) * 4


def cache_dtype(dtype: Any) -> Any:
    """The dtype keys and values are kept in: fp32 under a 16-bit model (twice the memory), else the model's own.

    Measured on a 2-core CPU with native bf16 (torch 2.13), one layer's decode attention at 64 rows over 256 keys:
    2.0 ms with bf16 values (their strided slice is copied before the product), 1.3 ms fp32 from the same slice."""
    import torch

    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def attend(query: Any, keys: Any, values: Any, bias: Any, scale: float) -> Any:
    """Softmax attention, (B, H, q, D) queries over (B, H_kv, S, D) keys and values → (B, q, H, D).

    Scores, softmax and the weighted sum are computed in the cache's dtype (fp32 under a bf16 model, so scores are
    not rounded to bf16 before the softmax); the output comes back in the query's dtype. `bias` (0 or
    -inf, broadcast to (B, 1, 1, q, S)) says which keys each query sees. Every output row is a function of its own
    query, keys and values only: the number of rows, of sequences and of masked keys beyond a row's own do not change
    a bit of it (the engine's batch-layout invariance rests on this; tests/test_local_engine.py checks it)."""
    import torch

    b, heads, n, d = query.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    group = heads // kv_heads  # query heads kv*group .. kv*group + group - 1 read kv head kv
    q = query.reshape(b, kv_heads, group * n, d).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).view(b, kv_heads, group, n, span)
    probs = torch.softmax(scores * scale + bias, dim=-1).to(values.dtype).view(b, kv_heads, group * n, span)
    out = torch.matmul(probs, values).view(b, heads, n, d)
    return out.transpose(1, 2).to(query.dtype).contiguous()


def sample_seed(seed: int | None, key: str, sample: int) -> int:
    """A sequence's own seed: reproducible per (seed, request, sample), independent of batch composition."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{sample}".encode()).digest()[:8], "little") >> 1


def shared_prefixes(ordered: deque, min_prefix: int) -> tuple[dict[int, tuple[int, ...]], dict[tuple[int, ...], int]]:
    """Per job (by id), the longest prefix (≥ min_prefix tokens, ≤ prompt - 1) it shares with a neighbour in token
    order, kept only where two or more jobs share exactly that prefix; and each prefix's user count."""
    jobs = list(ordered)

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    shared = [common(a.prompt, b.prompt) for a, b in zip(jobs, jobs[1:])]
    prefix_of: dict[int, tuple[int, ...]] = {}
    for i, job in enumerate(jobs):
        p = min(max(shared[i - 1] if i else 0, shared[i] if i < len(shared) else 0), len(job.prompt) - 1)
        if p >= min_prefix:
            prefix_of[id(job)] = tuple(job.prompt[:p])
    users: dict[tuple[int, ...], int] = {}
    for prefix in prefix_of.values():
        users[prefix] = users.get(prefix, 0) + 1
    prefix_of = {j: p for j, p in prefix_of.items() if users[p] > 1}
    return prefix_of, {p: n for p, n in users.items() if n > 1}


FUSABLE = ("llama", "mistral", "qwen2")  # decoder layers of one shape: norm, attention, norm, gated MLP


class _Product:
    """One linear product of the decode step: x @ weight.T + bias, through oneDNN's prepacked weight where packed."""

    def __init__(self, weight: Any, bias: Any = None):
        self.weight, self.bias, self.packed = weight, bias, None

    def __call__(self, x: Any) -> Any:
        import torch

        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return self.plain(x)

    def plain(self, x: Any) -> Any:
        """Through F.linear, as the model's own forward computes it (a prefill: not the decode step's packing)."""
        import torch.nn.functional as F

        return F.linear(x, self.weight, self.bias)


class _Fused:
    """A Llama-style model's decode step, run by the engine with q/k/v and gate/up as one product each.

    The layers' own modules do the norms, the rotary embedding and the activation, in the order the model's forward
    runs them; the projections that read one input are joined: their weights are laid into one tensor each and the
    modules' weights become views of it (same values, no extra memory). Under bf16 on a CPU, `pack` lays every
    product's weight out once in oneDNN's blocked format (a second copy of the weights), which the step's products
    then read without re-laying them at each call; the numbers are the same bit for bit (checked when packing)."""

    def __init__(self, model: Any):
        import torch

        self.model, self.layers = model, list(model.model.layers)
        self.sizes: list[tuple[int, int, int]] = []
        self.products: list[tuple[_Product, _Product, _Product, _Product]] = []  # per layer: qkv, o, gate_up, down
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.sizes.append(tuple(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)))
            qkv = _Product(*_join(torch, [attn.q_proj, attn.k_proj, attn.v_proj]))
            gate_up = _Product(*_join(torch, [mlp.gate_proj, mlp.up_proj]))
            o, down = (_Product(m.weight, m.bias) for m in (attn.o_proj, mlp.down_proj))
            self.products.append((qkv, o, gate_up, down))
        head = model.lm_head
        self.head = _Product(head.weight, head.bias)
        self.packed_for: Any = None  # the dtype the products are packed for
        self.ops: Any = None  # orca2.native's library where its small ops replace the modules' (bf16 on CPU)
        self.ops_agree: bool | None = None  # whether they compute as the bf16 modules do (checked on first use)

    @staticmethod
    def fits(model: Any) -> bool:
        import torch

        inner = getattr(model, "model", None)
        if getattr(model.config, "model_type", None) not in FUSABLE or not hasattr(inner, "layers"):
            return False
        needed = ("q_proj", "k_proj", "v_proj", "o_proj")
        return isinstance(getattr(model, "lm_head", None), torch.nn.Linear) and all(
            all(isinstance(getattr(layer.self_attn, n, None), torch.nn.Linear) for n in needed)
            and all(isinstance(getattr(layer.mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj"))
            and not hasattr(layer.self_attn, "q_norm")
            for layer in inner.layers
        )

    def current(self) -> bool:
        """Whether the joined weights are still the model's (not replaced since, e.g. by model.to(dtype))."""
        attn = self.layers[0].self_attn
        qkv, o = self.products[0][0], self.products[0][1]
        return attn.q_proj.weight.data_ptr() == qkv.weight.data_ptr() and attn.o_proj.weight is o.weight

    def pack(self, rows: int) -> bool:
        """Pack every product's weight for oneDNN (bf16 on CPU) where that gives the same numbers and the copy fits
        in a quarter of the free memory; True if the products are packed."""
        import torch
        import torch.nn.functional as F

        dtype = self.head.weight.dtype
        if self.packed_for == dtype:
            return True
        everything = [p for layer in self.products for p in layer] + [self.head]
        size = sum(p.weight.numel() * p.weight.element_size() for p in everything)
        free = available_memory()
        usable = (
            dtype == torch.bfloat16
            and self.head.weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and size < free // 4
        )
        if not usable:
            return False
        first = everything[0]
        probe = torch.randn(rows, 1, first.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(first.weight.detach(), rows)
        same = torch.ops.mkldnn._linear_pointwise(probe, packed, first.bias, "none", [], "")
        if not torch.equal(same, F.linear(probe, first.weight, first.bias)):
            log.info("local engine: oneDNN's packed products round differently here; the step uses plain products")
            return False
        for p in everything:
            p.packed = torch.ops.mkldnn._reorder_linear_weight(p.weight.detach(), rows)
        self.packed_for = dtype
        log.info("local engine: the step's products read weights packed for oneDNN (%.0f MB more memory)", size / 1e6)
        return True

    def use_ops(self, lib: Any) -> bool:
        """Run the step's norms, rotary embedding and gated activation with orca2.native's small ops (lib: its
        library, or None) where the model is bf16 on a CPU and the ops compute as its modules do (checked once, on
        this model's own first layer); True if they are used."""
        import torch

        dtype, device = self.head.weight.dtype, self.head.weight.device
        self.ops = None
        if lib is None or dtype != torch.bfloat16 or device.type != "cpu":
            return False
        if self.ops_agree is None:
            self.ops_agree = self._ops_agree(lib)
            if not self.ops_agree:
                log.info("local engine: the native small ops do not compute as this model's modules; not used")
        self.ops = lib if self.ops_agree else None
        return self.ops is not None

    def _ops_agree(self, lib: Any) -> bool:
        """Whether the native ops give the first layer's results on a probe: the rotary embedding bit for bit, the
        norm and the gated activation within one bf16 step (an fp32 sum of squares or exp may round differently from
        torch's)."""
        import torch

        from orca2.llama import apply_rotary

        layer, inner, dtype = self.layers[0], self.model.model, self.head.weight.dtype
        norm, attn, mlp = layer.input_layernorm, layer.self_attn, layer.mlp
        eps = getattr(norm, "variance_epsilon", None)
        dim, (q_size, k_size, _) = attn.head_dim, self.sizes[0]
        act = getattr(getattr(self.model.config, "get_text_config", lambda: self.model.config)(), "hidden_act", None)
        if eps is None or getattr(norm, "weight", None) is None or act != "silu" or dim > 512 or dim % 2:
            return False
        g = torch.Generator().manual_seed(0)
        rows, width = 8, self.products[0][0].weight.shape[0]
        hidden = torch.randn(rows, 1, norm.weight.shape[0], generator=g).to(dtype)
        positions = torch.randint(0, 4096, (rows, 1), generator=g)
        cos, sin = inner.rotary_emb(hidden, positions)
        joined = torch.randn(rows, 1, width, generator=g).to(dtype)
        q, k = (
            x.view(rows, 1, -1, dim).transpose(1, 2) for x in joined[..., : q_size + k_size].split([q_size, k_size], -1)
        )
        q, k = apply_rotary(q, k, cos, sin)
        rotated = native.rope_(lib, joined.clone(), cos, sin, (q_size + k_size) // dim, dim)
        mine_q, mine_k = rotated[..., :q_size], rotated[..., q_size : q_size + k_size]
        gated = (torch.randn(rows, 1, 2 * mlp.gate_proj.weight.shape[0], generator=g) * 4).to(dtype)
        gate, up = gated.chunk(2, -1)
        step = 2**-7  # bf16's relative spacing
        return (
            torch.allclose(native.rms_norm(lib, hidden, norm.weight, eps).float(), norm(hidden).float(), rtol=step)
            and torch.equal(mine_q, q.transpose(1, 2).reshape(rows, 1, -1))
            and torch.equal(mine_k, k.transpose(1, 2).reshape(rows, 1, -1))
            and torch.allclose(native.silu_mul(lib, gated).float(), (mlp.act_fn(gate) * up).float(), rtol=step)
        )

    def decode(self, ids: Any, positions: Any, step: _Step) -> Any:
        """Logits (rows, vocabulary) for one token per row: ids and positions (rows, 1)."""
        return self.head(self._layers(ids, positions, step, packed=True))[:, -1]

    def prefill(self, ids: Any, positions: Any, step: _Step, keep: Any) -> Any:
        """Logits (len(keep), vocabulary) of a packed prefill row's tokens `keep`: ids and positions (1, n). Run
        where the native small ops are (bf16 on CPU), in place of the model's own forward: the same layers, with
        the products through F.linear on the joined weights (a bf16 row's numbers do not depend on the columns)."""
        return self.head.plain(self._layers(ids, positions, step, packed=False)[0, keep])

    def _layers(self, ids: Any, positions: Any, step: _Step, packed: bool) -> Any:
        """The last layer's hidden states after the model's final norm, (rows, tokens, hidden), for ids and positions
        (rows, tokens)."""
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        if self.ops is None:
            return inner.norm(self._module_layers(hidden, cos, sin, step, packed))
        return self._native_layers(hidden, cos, sin, step, packed)

    def _module_layers(self, hidden: Any, cos: Any, sin: Any, step: _Step, packed: bool) -> Any:
        """The layers with their own modules for the norms, rotary embedding and activation (fp32, or no native
        library)."""
        from orca2.llama import apply_rotary  # as transformers' apply_rotary_pos_emb computes it

        rows, tokens = hidden.shape[:2]
        for layer, sizes, products in zip(self.layers, self.sizes, self.products):
            qkv, o, gate_up, down = (p if packed else p.plain for p in products)
            attn, mlp, dim = layer.self_attn, layer.mlp, layer.self_attn.head_dim
            joined = qkv(layer.input_layernorm(hidden))
            q, k, v = (x.view(rows, tokens, -1, dim).transpose(1, 2) for x in joined.split(sizes, -1))
            q, k = apply_rotary(q, k, cos, sin)
            out, _ = slot_attention(attn, q, k, v, None, scaling=attn.scaling, orca2_step=step)
            hidden = hidden + o(out.reshape(rows, tokens, -1))
            gate, up = gate_up(layer.post_attention_layernorm(hidden)).chunk(2, -1)
            hidden = hidden + down(mlp.act_fn(gate) * up)
        return hidden

    def _native_layers(self, hidden: Any, cos: Any, sin: Any, step: _Step, packed: bool) -> Any:
        """The layers under bf16 with orca2.native's ops: each residual add is one call with the norm after it
        (hidden is added into in place), the rotary embedding works in place on the joined q/k/v product, and a
        decode step attends straight from that product (decode_attention_joined): no copy or conversion around it."""
        ops, rows, tokens = self.ops, hidden.shape[0], hidden.shape[1]
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.model.model.norm]
        lean = step.native is not None and not step.segments  # a decode step on the native kernel
        lengths = step.positions + 1 if lean else None
        first = self.layers[0].input_layernorm
        normed = native.rms_norm(ops, hidden, first.weight, first.variance_epsilon)
        for layer, sizes, after, products in zip(self.layers, self.sizes, norms, self.products):
            qkv, o, gate_up, down = (p if packed else p.plain for p in products)
            attn, dim = layer.self_attn, layer.self_attn.head_dim
            joined = qkv(normed)
            native.rope_(ops, joined, cos, sin, (sizes[0] + sizes[1]) // dim, dim)  # queries and keys, in place
            index = attn.layer_idx
            if lean:
                out = native.decode_attention_joined(
                    step.native, joined, sizes, step.keys[index], step.values[index], lengths, attn.scaling
                )
            elif step.packing is not None:  # a prefill on the native kernel: every token of the row in one call
                _, k, v = (x.view(tokens, -1, dim) for x in joined[0].split(sizes, -1))
                _write_packed(step, index, k, v)
                plan = step.packing
                out = native.decode_attention_joined(
                    step.native,
                    joined.view(tokens, 1, -1),
                    sizes,
                    step.keys[index],
                    step.values[index],
                    plan.lengths,
                    attn.scaling,
                    plan.slots,
                ).view(1, tokens, -1)
            else:
                q, k, v = (x.view(rows, tokens, -1, dim).transpose(1, 2) for x in joined.split(sizes, -1))
                out, _ = slot_attention(attn, q, k, v, None, scaling=attn.scaling, orca2_step=step)
                out = out.reshape(rows, tokens, -1)
            mid = layer.post_attention_layernorm
            normed = native.add_rms_norm(ops, hidden, o(out), mid.weight, mid.variance_epsilon)
            gated = native.silu_mul(ops, gate_up(normed))
            normed = native.add_rms_norm(ops, hidden, down(gated), after.weight, after.variance_epsilon)
        return normed


def _join(torch: Any, linears: list[Any]) -> tuple[Any, Any]:
    """One weight (and bias) for linear layers that read the same input; each layer's weight becomes a view of it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat([b.detach() for b in biases])
    start = 0
    for m in linears:
        end = start + m.weight.shape[0]
        m.weight.data = weight[start:end]
        if bias is not None:
            m.bias.data = bias[start:end]
        start = end
    return weight, bias


class Engine:
    """Continuous batching over a causal LM whose attention goes through transformers' AttentionInterface (or an
    orca2.llama model, which calls the engine's attention itself)."""

    def __init__(
        self,
        model: Any,
        stop_ids: list[int],
        slots: int = 64,
        prefill_tokens: int = 2048,
        min_prefix: int = 16,
        grammars: Any = None,
    ):
        cfg = model.config
        if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "sliding_window_pattern", None):
            raise Orca2Error(
                f"the local engine does not support {cfg.model_type} attention (softcapping / local layers)"
            )
        if getattr(model, "orca2_engine_model", False):  # orca2.llama's model: no transformers registry to go through
            model.set_attention(slot_attention)
        else:
            from transformers import AttentionInterface

            AttentionInterface.register(NAME, slot_attention)
            model.set_attn_implementation(NAME)
        self.model, self.stop_ids, self.prefill_tokens = model, set(stop_ids), prefill_tokens
        self.requested_slots = self.slots = slots  # slots: this run's, fewer where the KV buffers would not fit
        self.min_prefix = min_prefix  # shorter shared prefixes are prefilled with their prompts (not worth a copy)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.layers = text.num_hidden_layers
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.max_positions = getattr(text, "max_position_embeddings", 1 << 30)
        self.grammars = grammars  # orca2.constrain.Grammars: makes matchers for jobs with a grammar
        self.masks: Any = None  # orca2.constrain.Masks, made on the first constrained step
        self.peak_active = 0  # most sequences decoded at once (for tests and the benchmark)
        self.prefill_tokens_saved = 0  # prompt tokens not prefilled because a shared prefix was reused
        self.fused = _Fused(model) if _Fused.fits(model) else None  # decode steps run by _Fused
        self.kernels: Any = None  # orca2.native's library during a run on CPU, where it builds

    def run(self, jobs: list[Job], on_done: Callable[[Job], None], on_fail: Callable[[Job, str], None]) -> None:
        """Decode every job; call on_done(job) when all its samples have finished."""
        import torch

        device = self.model.device
        dtype = next(self.model.parameters()).dtype
        runnable = []
        for job in jobs:
            if len(job.prompt) >= self.max_positions:
                on_fail(
                    job, f"prompt of {len(job.prompt)} tokens does not fit the model's {self.max_positions} positions"
                )
            else:
                runnable.append(job)
        if not runnable:
            return
        capacity = min(self.max_positions, max(len(j.prompt) + j.max_tokens for j in runnable))
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and capacity > window:
            raise Orca2Error(
                f"the local engine attends to whole sequences: prompt + max_tokens ({capacity}) must fit "
                f"the model's sliding window ({window})"
            )
        width = -(-capacity // KEY_ALIGN) * KEY_ALIGN  # positions per slot in the buffers
        kernels = native.library() if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None
        held = dtype if kernels is not None else cache_dtype(dtype)  # the kernel widens bf16 as it reads it
        padded = native.pitch(width) if kernels is not None else width  # key rows are whole blocks there
        self.slots = min(self.requested_slots, self._slots_that_fit(padded, 2 * held.itemsize, device))
        shape = (self.slots, self.kv_heads, width, self.head_dim)
        if kernels is not None:  # keys laid out as the kernel reads them; nothing past a sequence's length is read
            keys = [native.key_buffer(*shape, held, device) for _ in range(self.layers)]
            values = [torch.empty(shape, dtype=held, device=device) for _ in range(self.layers)]
        else:  # zeros, not empty: a masked key still multiplies its value by 0, and 0 × NaN (stale memory) = NaN
            keys = [torch.zeros(shape, dtype=held, device=device) for _ in range(self.layers)]
            values = [torch.zeros(shape, dtype=held, device=device) for _ in range(self.layers)]
        step = _Step(
            keys=keys,
            values=values,
            prefixes={},
            native=kernels,
        )
        lengths = torch.zeros(self.slots, dtype=torch.long, device=device)  # tokens held per slot
        rows: list[_Seq] = []  # row i owns slot i
        waiting = deque(sorted(runnable, key=lambda job: job.prompt))  # shared prefixes run together
        self._prefix_of, self._users = shared_prefixes(waiting, self.min_prefix)
        if self.fused is not None and not self.fused.current():  # the model's weights were replaced since
            self.fused = _Fused(self.model)
        if self.fused is not None and device.type == "cpu":
            self.fused.pack(self.slots)
        if self.fused is not None:
            self.fused.use_ops(kernels)
        self.kernels = kernels
        with torch.inference_mode():
            while waiting or rows:
                self._admit(waiting, rows, step, lengths)
                self._retire(rows, step, lengths, capacity, on_done)
                if rows:
                    self.peak_active = max(self.peak_active, len(rows))
                    self._decode(rows, step, lengths)
                    self._retire(rows, step, lengths, capacity, on_done)

    def _slots_that_fit(self, capacity: int, bytes_per_pair: int, device: Any) -> int:
        """Slots whose KV buffers take at most 40 % of free memory (a long prompt makes every slot long)."""
        import torch

        per_slot = self.layers * self.kv_heads * capacity * self.head_dim * bytes_per_pair  # a key and a value
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = available_memory()
        fit = max(1, int(0.4 * free) // per_slot)
        if fit < self.requested_slots:
            log.warning(
                "local engine: %d slots of %d tokens would need %.1f GB; decoding %d at a time",
                self.requested_slots,
                capacity,
                self.requested_slots * per_slot / 1e9,
                fit,
            )
        return fit

    def _retire(
        self, rows: list[_Seq], step: _Step, lengths: Any, capacity: int, on_done: Callable[[Job], None]
    ) -> None:
        """Take finished sequences out; the last row moves into each hole, so active rows stay 0..B-1."""
        for i in reversed(range(len(rows))):  # highest first, so a moved row is never one still to check
            seq = rows[i]
            if not self._finished(seq, capacity):
                continue
            last = len(rows) - 1
            if i != last:
                n = int(lengths[last])
                held = n if step.native is None else native.pitch(n) // native.PITCH  # keys: positions, or blocks
                for layer in range(self.layers):
                    step.keys[layer][i, :, :held] = step.keys[layer][last, :, :held]
                    step.values[layer][i, :, :n] = step.values[layer][last, :, :n]
                lengths[i] = lengths[last]
                rows[i] = rows[last]
            rows.pop()
            if len(seq.job.outputs) == seq.job.n and seq.job.unstarted == 0:
                on_done(seq.job)

    def _admit(self, waiting: deque, rows: list[_Seq], step: _Step, lengths: Any) -> None:
        """Prefill waiting prompts into free slots, as one packed row (shared prefixes computed once)."""
        import torch

        plan: list[tuple[Job, int]] = []
        free, budget = self.slots - len(rows), self.prefill_tokens
        while waiting and free > 0:
            job = waiting[0]
            if plan and len(job.prompt) > budget:
                break
            take = min(job.unstarted, free)
            plan.append((job, take))
            job.unstarted -= take
            free -= take
            budget -= len(job.prompt)
            if job.started_at == 0.0:
                job.started_at = time.perf_counter()
            if job.unstarted == 0:
                waiting.popleft()
        if not plan:
            return
        device = lengths.device
        ids: list[int] = []
        positions: list[int] = []
        segments: list[_Segment] = []
        last: list[int] = []  # row index of each prompt's last token (its logits start the reply)

        def add(tokens: list[int] | tuple[int, ...], offset: int, **kw: Any) -> None:
            segments.append(_Segment(len(ids), len(ids) + len(tokens), **kw))
            positions.extend(range(offset, offset + len(tokens)))
            ids.extend(tokens)

        first_row = len(rows)
        for job, take in plan:
            slots = list(range(len(rows), len(rows) + take))
            prefix = self._prefix_of.get(id(job))
            if prefix is not None and prefix not in step.prefixes:
                step.prefixes[prefix] = [None] * self.layers
                add(prefix, 0, store=prefix)
                self.prefill_tokens_saved -= len(prefix)
            start = len(prefix) if prefix is not None else 0
            add(job.prompt[start:], start, slots=torch.tensor(slots, device=device), prefix=prefix)
            last.append(len(ids) - 1)
            if prefix is not None:
                self.prefill_tokens_saved += start
                if job.unstarted == 0:
                    self._users[prefix] -= 1
            for k in range(take):
                sample = job.n - job.unstarted - take + k
                generator = None
                if job.temperature > 0:
                    generator = torch.Generator(device=device).manual_seed(sample_seed(job.seed, job.key, sample))
                matcher = self.grammars.matcher(job.grammar) if job.grammar is not None else None
                rows.append(_Seq(job, sample, [], generator, matcher))
            lengths[slots] = len(job.prompt)
        if padded_rows(len(ids)) > len(ids):  # a packed row of a few tokens: a padding segment, attended and dropped
            add(ids[-1:] * (padded_rows(len(ids)) - len(ids)), 0)
        step.segments = segments
        step.packing = _packing(segments, device) if step.native is not None else None
        row, where = torch.tensor([ids], device=device), torch.tensor([positions], device=device)
        keep = torch.tensor(last + last[-1:] * (padded_rows(len(last)) - len(last)), device=device)
        if self.fused is not None and self.fused.ops is not None:  # the decode step's layers, with native ops
            logits = self.fused.prefill(row, where, step, keep)
        else:
            out = self.model(input_ids=row, position_ids=where, orca2_step=step, use_cache=False, logits_to_keep=keep)
            logits = out.logits[0]  # (prompts, V)
        step.segments, step.packing = [], None
        for prefix in [p for p, n in self._users.items() if n == 0 and p in step.prefixes]:
            del step.prefixes[prefix]  # no waiting prompt needs it any more
        index = torch.tensor([seg for seg, (_, take) in enumerate(plan) for _ in range(take)], device=device)
        self._choose(rows[first_row:], logits[index])

    def _decode(self, rows: list[_Seq], step: _Step, lengths: Any) -> None:
        import torch

        active = len(rows)
        device = lengths.device
        positions = lengths[:active].clone()
        step.active, step.positions = active, positions
        if step.native is None:  # torch products: index writes, and a mask over the longest span
            step.rows = torch.arange(active, device=device)
            step.span = min(-(-(int(positions.max()) + 1) // KEY_ALIGN) * KEY_ALIGN, step.keys[0].shape[2])
            visible = torch.arange(step.span, device=device)[None, :] <= positions[:, None]
            bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
            step.bias = bias[:, None, None, None]
        tokens = [seq.tokens[-1] for seq in rows]
        padding = padded_rows(active) - active  # rows the linear layers see, past `active` copies of row 0
        ids = torch.tensor([tokens + tokens[:1] * padding], device=device).T
        where = torch.cat([positions, positions[:1].expand(padding)])[:, None]
        if self.fused is not None:
            logits = self.fused.decode(ids, where, step)
        else:
            logits = self.model(input_ids=ids, position_ids=where, orca2_step=step, use_cache=False).logits[:, -1]
        lengths[:active] += 1
        step.active, step.positions, step.bias = 0, None, None
        self._choose(rows, logits[:active])

    def _choose(self, seqs: list[_Seq], logits: Any) -> None:
        """The next token of each sequence: argmax, or a draw from its own generator (temperature, top_p).

        Sampled rows are handled together: softmax, the nucleus from the top 1,024 tokens (a full sort only for
        rows whose nucleus is larger), and one uniform number per row from its generator, mapped through the
        nucleus' cumulative distribution — the same distribution as multinomial over the renormalised nucleus.
        Constrained rows (a grammar) have the tokens their grammar does not allow masked out first."""
        constrained = [(i, seq.matcher) for i, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:  # a copy in fp32: the unconstrained rows' choices are those of the logits as they came
            from orca2.constrain import Masks

            if self.masks is None or self.masks.bitmask.shape[0] < self.slots:
                self.masks = Masks(self.slots, logits.shape[-1])
            logits = self.masks.apply(logits.float(), constrained)
        if self.kernels is not None and logits.device.type == "cpu":  # in place, fp32 or bf16 (torch: 2.7 ms)
            greedy = native.argmax(self.kernels, logits).tolist()
        else:
            greedy = logits.float().argmax(-1).tolist()  # fp32: a bf16 argmax is not vectorised on CPU (6 ms)
        sampled = [i for i, seq in enumerate(seqs) if seq.generator is not None]
        for i, seq in enumerate(seqs):
            if seq.generator is None:
                seq.tokens.append(greedy[i])
        if sampled:
            self._sample(seqs, sampled, logits)
        if constrained:
            from orca2.constrain import accept

            for i, matcher in constrained:
                accept(matcher, seqs[i].tokens[-1], f"request {seqs[i].job.key[:12]}")

    def _sample(self, seqs: list[_Seq], sampled: list[int], logits: Any) -> None:
        import torch

        rows = torch.tensor(sampled, device=logits.device)
        temperature = logits.new_tensor([seqs[i].job.temperature for i in sampled], dtype=torch.float32)
        top_p = logits.new_tensor([seqs[i].job.top_p for i in sampled], dtype=torch.float32)
        probs = torch.softmax(logits[rows].float() / temperature[:, None], dim=-1)
        if bool((top_p >= 1).all()):  # no nucleus: the whole distribution, unsorted
            values, order = probs, None
        else:
            values, order = probs.topk(min(probs.shape[-1], 1024), dim=-1)  # sorted, descending
            if bool((values.sum(-1) < top_p).any()):  # some nucleus reaches past the top 1,024: sort everything
                values, order = probs.sort(dim=-1, descending=True)
            values = values * ((values.cumsum(-1) - values) < top_p[:, None])  # the smallest set reaching top_p
        cdf = values.cumsum(-1)
        u = torch.stack([torch.rand((), generator=seqs[i].generator, device=logits.device) for i in sampled])
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        tokens = picks if order is None else order.gather(1, picks)
        for i, token in zip(sampled, tokens[:, 0].tolist()):
            seqs[i].tokens.append(token)

    def _finished(self, seq: _Seq, capacity: int) -> bool:
        job = seq.job
        if seq.sample in job.outputs:
            return True
        if seq.tokens[-1] in self.stop_ids:
            job.outputs[seq.sample] = (list(seq.tokens), "stop")
        elif len(seq.tokens) >= job.max_tokens or len(job.prompt) + len(seq.tokens) >= capacity:
            job.outputs[seq.sample] = (list(seq.tokens), "length")
        return seq.sample in job.outputs


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """End-of-turn tokens (orca2.chat.end_of_turn_ids): decoding stops where training stopped supervising."""
    from orca2.chat import end_of_turn_ids

    return sorted(end_of_turn_ids(tokenizer, model))
