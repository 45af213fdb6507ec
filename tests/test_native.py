"""The engine's native decode step (orca2/csrc through orca2.native). Its attention: the formula, per row over its own
keys, in fp32 and bf16 buffers; rows independent of their neighbours and of the thread count. Its small ops: the
bf16 modules' numbers (the rotary embedding bit for bit, RMSNorm and SiLU-gated within one bf16 step) and
torch's argmax exactly. The build cached, rebuilt when a source changes, safe when two processes build at once, and
absent without a compiler."""

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orca2 import native


@pytest.fixture
def lib():
    """The kernels (the session's build, in this test's cache)."""
    built = native.library()
    if built is None:
        pytest.skip("no C compiler with OpenMP here: the engine attends with torch products (tested elsewhere)")
    return built


def buffers(rows, slots, kv_heads, width, dim, dtype, seed=0):
    """Random keys (in a key_buffer, as the engine holds them) and values, (slots, kv_heads, width, dim) each."""
    g = torch.Generator().manual_seed(seed)
    keys = native.as_key_buffer(torch.randn(slots, kv_heads, width, dim, generator=g).to(dtype))
    values = torch.randn(slots, kv_heads, width, dim, generator=g).to(dtype)
    return keys, values


def spoil_past(keys, slot, n):
    """NaN in a key_buffer's slot at positions n and after (to the end of its last block)."""
    positions = torch.arange(n, keys.shape[2] * native.PITCH)
    nan = torch.full((len(positions), keys.shape[1], keys.shape[3]), float("nan"), dtype=keys.dtype)
    native.write_keys(keys, torch.full_like(positions, slot), positions, nan)


def attend(lib, query, keys, values, lengths, scale, key=None, value=None):
    return native.decode_attention(lib, query, key, value, keys, values, lengths, scale)


def formula(query, keys, values, lengths, scale):
    """softmax(q k^T * scale) v per row over its own keys (a key_buffer, or (rows, kv_heads, width, dim)), in float64,
    from the definition."""
    if keys.dim() == 5:
        keys = native.logical_keys(keys, values.shape[2])
    rows, heads, _, dim = query.shape
    group = heads // keys.shape[1]
    out = torch.empty(rows, 1, heads, dim, dtype=torch.float64)
    for b in range(rows):
        n = int(lengths[b])
        for h in range(heads):
            q = query[b, h, 0].double()
            k, v = keys[b, h // group, :n].double(), values[b, h // group, :n].double()
            scores = (k @ q) * scale
            p = torch.exp(scores - scores.max())
            out[b, 0, h] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads,kv_heads,dim",
    [(4, 4, 64), (4, 1, 64), (9, 3, 64), (7, 1, 128), (6, 2, 128), (6, 2, 24), (2, 1, 288)],
    # queries go four at a time (GQA-7: 4 + 3), dims 64 and 128 in registers (128: two queries at a time, GQA-3 as
    # 2 + 1), other dims in a plain loop; 288: value dims summed in two chunks (DIM_MAX 256)
    ids=["MHA", "MQA", "GQA-3", "GQA-7-dim-128", "GQA-3-dim-128", "dim-24", "dim-288"],
)
def test_decode_attention_is_the_formula_over_each_rows_own_keys(lib, dtype, heads, kv_heads, dim):
    rows, slots, width = 7, 9, 300
    keys, values = buffers(rows, slots, kv_heads, width, dim, dtype)
    # the query, new keys and new values as views with strides of their own, as a model's split products give them
    query = torch.randn(rows, heads, 1, 2 * dim, generator=torch.Generator().manual_seed(1)).to(dtype)[..., ::2]
    # one key, the whole width (300: the key rows' pitch is 320), and lengths on and off the kernel's blocks of 64 keys
    lengths = torch.tensor([1, 300, 17, 129, 128, 2, 257])
    scale = dim**-0.5
    got = attend(lib, query, keys, values, lengths, scale)
    assert got.shape == (rows, 1, heads, dim) and got.dtype == dtype
    want = formula(query, keys, values, lengths, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance)
    stale_keys, stale_values = keys.clone(), values.clone()
    for b, n in enumerate(lengths.tolist()):  # what lies past a row's length (stale or unwritten) is never read
        spoil_past(stale_keys, b, n)
        stale_values[b, :, n:] = float("nan")
    stale_keys[rows:] = float("nan")  # nor slots past the rows
    assert torch.equal(attend(lib, query, stale_keys, stale_values, lengths, scale), got)
    # the step's new keys and values, written by the kernel at each row's last position, are what it attends to
    new_key = torch.randn(rows, kv_heads, 3 * dim, generator=torch.Generator().manual_seed(2)).to(dtype)[..., :dim]
    new_value = torch.randn(rows, 2 * kv_heads, dim, generator=torch.Generator().manual_seed(3)).to(dtype)[:, ::2]
    written = attend(lib, query, stale_keys, stale_values, lengths, scale, new_key, new_value)
    last = lengths - 1
    assert torch.equal(native.logical_keys(stale_keys, width)[torch.arange(rows), :, last], new_key)
    assert torch.equal(stale_values[torch.arange(rows), :, last], new_value)
    assert torch.allclose(
        written.double(), formula(query, stale_keys, stale_values, lengths, scale), rtol=tolerance, atol=tolerance
    )
    assert not torch.equal(written, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_prefill_reads_each_prompts_slot_over_each_querys_causal_span(lib, dtype):
    """slots: row b reads slot slots[b] (a prefill: every query of a prompt reads the prompt's slot, each over its
    own first p + i + 1 keys); the same numbers as the formula, and as decode rows reading those slots as their own."""
    keys, values = buffers(5, 5, 3, 200, 64, dtype, seed=7)
    rows = 12
    query = torch.randn(rows, 9, 1, 64, generator=torch.Generator().manual_seed(8)).to(dtype)
    slots = torch.tensor([4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 3])
    lengths = torch.tensor([37, 38, 39, 40, 41, 1, 2, 3, 4, 5, 6, 200])  # two prompts' causal spans, one full slot
    got = native.decode_attention(lib, query, None, None, keys, values, lengths, 0.125, slots)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    want = formula(query, keys[slots], values[slots], lengths, 0.125)
    assert torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance)
    for b in (0, 7, 11):  # as a decode row of a buffer where that slot is its own
        own = keys[slots[b] : slots[b] + 1].clone()
        alone = attend(lib, query[b : b + 1], own, values[slots[b] : slots[b] + 1].clone(), lengths[b : b + 1], 0.125)
        assert torch.equal(alone[0], got[b]), b
    with pytest.raises(ValueError, match="one int64 slot of the 5 per row"):
        native.decode_attention(lib, query, None, None, keys, values, lengths, 0.125, slots + 1)
    with pytest.raises(ValueError, match="one int64 slot of the 5 per row"):
        native.decode_attention(lib, query, None, None, keys, values, lengths, 0.125, slots[:-1])
    with pytest.raises(ValueError, match="rows that read given slots write no new keys"):
        new = torch.zeros(rows, 3, 64, dtype=dtype)
        native.decode_attention(lib, query, new, new, keys, values, lengths, 0.125, slots)
    with pytest.raises(ValueError, match="12 rows read 12 slots, but the buffers hold 5"):
        native.decode_attention(lib, query, None, None, keys, values, lengths, 0.125)


def test_a_rows_numbers_do_not_depend_on_its_neighbours_the_buffer_or_the_threads(lib):
    rows, kv_heads, heads, width, dim = 12, 3, 9, 96, 64
    keys, values = buffers(rows, rows, kv_heads, width, dim, torch.bfloat16, seed=2)
    query = torch.randn(rows, heads, 1, dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    lengths = torch.randint(1, width + 1, (rows,), generator=torch.Generator().manual_seed(4))
    together = attend(lib, query, keys, values, lengths, 0.125)
    threads = torch.get_num_threads()
    shares = {}
    try:  # one thread; more threads than rows (some with no share); rows shared by their lengths, skewed
        for count in (1, 3, 16):
            torch.set_num_threads(count)
            shares[count] = attend(lib, query, keys, values, lengths, 0.125)
        skewed = torch.tensor([width] * 2 + [1] * (rows - 2))
        torch.set_num_threads(1)
        alone = attend(lib, query, keys, values, skewed, 0.125)
        torch.set_num_threads(3)
        assert torch.equal(attend(lib, query, keys, values, skewed, 0.125), alone)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(single, together) for single in shares.values())
    for b in (0, 5, 11):  # alone, in a one-slot buffer of another width
        n = int(lengths[b])
        k, v = torch.zeros((2, 1, kv_heads, n + 16, dim), dtype=torch.bfloat16)
        k[0, :, :n], v[0, :, :n] = native.logical_keys(keys, width)[b, :, :n], values[b, :, :n]
        k = native.as_key_buffer(k)
        alone = attend(lib, query[b : b + 1], k, v, lengths[b : b + 1], 0.125)
        assert torch.equal(alone[0], together[b]), b


def test_a_key_buffer_holds_keys_in_transposed_blocks_of_64_positions():
    """Position p of a slot and head is column p % 64 of block p // 64, whose (dim, 64) keys are one run of memory;
    write_keys puts keys there, logical_keys and as_key_buffer read and build the (slots, kv_heads, width, dim) view."""
    logical = torch.randn(3, 2, 130, 8)
    keys = native.as_key_buffer(logical)
    assert keys.shape == (3, 2, 3, 8, native.PITCH) and keys.is_contiguous()
    assert torch.equal(native.logical_keys(keys, 130), logical)
    assert torch.equal(keys[1, 0, 2, :, 1], logical[1, 0, 129]) and not keys[1, 0, 2, :, 2:].any()
    new = torch.randn(3, 2, 8)
    native.write_keys(keys, torch.tensor([0, 2, 2]), torch.tensor([0, 64, 127]), new)
    logical[0, :, 0], logical[2, :, 64], logical[2, :, 127] = new
    assert torch.equal(native.logical_keys(keys, 130), logical)
    assert torch.equal(keys[2, :, 1, :, 0], new[1]) and torch.equal(keys[2, :, 1, :, 63], new[2])


def test_what_it_does_not_read_is_refused_in_one_line(lib):
    keys, values = buffers(2, 2, 1, 16, 8, torch.float32)
    query = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="a key_buffer and whole values"):
        attend(lib, query, keys, values[:, :, :8], torch.tensor([3, 4]), 1.0)  # values not whole
    with pytest.raises(ValueError, match="a key_buffer and whole values"):
        attend(lib, query, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values, torch.tensor([3, 4]), 1.0)
    with pytest.raises(ValueError, match="a key_buffer and whole values"):
        attend(lib, query, values, values, torch.tensor([3, 4]), 1.0)  # keys not laid out as a key_buffer
    with pytest.raises(ValueError, match="a key_buffer and whole values"):
        attend(lib, query, keys.half(), values.half(), torch.tensor([3, 4]), 1.0)
    with pytest.raises(ValueError, match=r"new keys and values must be \(2, 1, 8\)"):
        attend(lib, query, keys, values, torch.tensor([3, 4]), 1.0, torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="a key_buffer and whole values"):  # blocks of 16 keys: they are 64
        attend(lib, query, torch.zeros(2, 1, 1, 8, 16), values, torch.tensor([3, 4]), 1.0)
    with pytest.raises(ValueError, match="a key_buffer and whole values"):  # one block for 65 positions
        attend(lib, query, keys, torch.zeros(2, 1, 65, 8), torch.tensor([3, 4]), 1.0)
    with pytest.raises(RuntimeError, match="no keys"):
        attend(lib, query, keys, values, torch.tensor([0, 4]), 1.0)
    with pytest.raises(RuntimeError, match="more than the buffer holds"):
        attend(lib, query, keys, values, torch.tensor([3, 17]), 1.0)


def test_the_build_is_cached_and_follows_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCA2_CACHE_DIR", str(tmp_path / "cache"))
    if native.library() is None:
        pytest.skip("no C compiler with OpenMP here")
    built = sorted((tmp_path / "cache" / "native").glob("*.so"))
    assert len(built) == 1
    inode = built[0].stat().st_ino  # a build writes a new file and renames it over: a new inode
    native._build.cache_clear()  # a new process: finds the file, builds nothing
    assert native.library() is not None
    assert sorted((tmp_path / "cache" / "native").glob("*.so")) == built
    assert built[0].stat().st_ino == inode
    changed = tmp_path / "decode_ops.c"
    changed.write_text(native.SOURCES[1].read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0], changed))
    native._build.cache_clear()
    assert native.library() is not None
    assert len(list((tmp_path / "cache" / "native").glob("*.so"))) == 2  # a new key, built beside the old one
    header = tmp_path / "include" / "bf16.h"  # the shared header changed: a new key too, built from the new one
    header.parent.mkdir()
    header.write_text(native.HEADERS[0].read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    native._build.cache_clear()
    assert native.library() is not None
    assert len(list((tmp_path / "cache" / "native").glob("*.so"))) == 3
    header.write_text("#error not this header\n")  # and the build reads it from there (it fails, so no library)
    monkeypatch.setattr(native, "HEADERS", (header,))
    native._build.cache_clear()
    assert native.library() is None
    native._build.cache_clear()


def test_two_processes_building_at_once_both_load_it(tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    script = (
        "import torch\nfrom orca2 import native\nlib = native.library()\nassert lib is not None\ntorch.manual_seed(0)\n"
        "k = native.as_key_buffer(torch.randn(1, 1, 4, 8))\n"
        "q, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8)\n"
        "print(native.decode_attention(lib, q, None, None, k, v, torch.tensor([4]), 1.0).sum().item())\n"
    )
    env = {**os.environ, "ORCA2_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and math.isfinite(float(outs[0]))
    assert len(list((tmp_path / "cache" / "native").glob("*.so"))) == 1  # one whole file; no temp left behind
    assert not list((tmp_path / "cache" / "native").glob("tmp*"))


def test_loading_it_leaves_the_processes_floating_point_alone(tmp_path):
    """Built with -ffast-math, but not linked with it: GCC would add crtfastmath.o, whose constructor turns on
    flush-to-zero for the whole process, so every torch op after the engine's first run would drop denormals."""
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    script = (
        "import torch\nfrom orca2 import native\ntiny = torch.tensor([1e-40])\nassert (tiny * 1.0).item() > 0\n"
        "assert native.library() is not None\nprint((tiny * 1.0).item(), (tiny / 2).item())\n"
    )
    env = {**os.environ, "ORCA2_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    kept, halved = map(float, run.stdout.split())
    assert kept == pytest.approx(1e-40, rel=1e-3) and halved == pytest.approx(5e-41, rel=1e-3)


def test_without_a_compiler_or_when_off_there_is_no_library(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ORCA2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._build.cache_clear()
    with caplog.at_level(logging.INFO, logger="orca2.native"):
        assert native.library() is None
    assert "torch products" in caplog.text
    failing = tmp_path / "cc"
    failing.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'cc: error: broken' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.WARNING, logger="orca2.native"):
        assert native.library() is None
    assert "did not build (cc: error: broken)" in caplog.text
    assert not list(Path(tmp_path / "cache" / "native").glob("*"))  # the failed build left nothing behind
    monkeypatch.delenv("CC")
    monkeypatch.setenv("ORCA2_NATIVE", "0")
    assert native.library() is None
    native._build.cache_clear()


def bf16_step(x):
    """The gap between x and the next bf16 above it (x bf16)."""
    return (x.float().abs().clamp_min(2**-126) * 2**-7).float()


@pytest.mark.parametrize("rows,dim", [(1, 576), (64, 576), (7, 64), (3, 4096)])
def test_rms_norm_is_the_modules_norm_under_bf16(lib, rows, dim):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(dim + rows)
    norm = LlamaRMSNorm(dim, eps=1e-5).bfloat16()
    norm.weight.data = (torch.rand(dim, generator=g) * 3 - 1).bfloat16()
    for scale in (1e-3, 1.0, 300.0):  # small, plain and large activations
        x = (torch.randn(rows, 1, dim, generator=g) * scale).bfloat16()
        got = native.rms_norm(lib, x, norm.weight, norm.variance_epsilon)
        assert got.shape == x.shape and got.dtype == torch.bfloat16
        assert torch.equal(got, norm(x)), scale
        assert torch.equal(native.rms_norm(lib, x[:1], norm.weight, norm.variance_epsilon), got[:1])  # per row
    with pytest.raises(ValueError, match="bf16 tensors in CPU memory"):
        native.rms_norm(lib, x.float(), norm.weight, 1e-5)
    with pytest.raises(ValueError, match=rf"a weight of \({dim},\)"):
        native.rms_norm(lib, x, norm.weight[:-1], 1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (6, 1, 80)])
def test_rope_is_the_modules_rotary_embedding_in_the_joined_rows(lib, heads, kv_heads, dim):
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    rows = 11
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    config.head_dim = dim
    g = torch.Generator().manual_seed(heads * dim)
    hidden = torch.randn(rows, 1, heads * dim, generator=g).bfloat16()
    cos, sin = LlamaRotaryEmbedding(config)(hidden, torch.randint(0, 8192, (rows, 1), generator=g))
    joined = (torch.randn(rows, 1, (heads + 2 * kv_heads) * dim, generator=g) * 5).bfloat16()
    q, k, v = joined.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    want_q, want_k = apply_rotary_pos_emb(
        q.view(rows, 1, heads, dim).transpose(1, 2), k.view(rows, 1, kv_heads, dim).transpose(1, 2), cos, sin
    )
    got = native.rope_(lib, joined.clone(), cos, sin, heads + kv_heads, dim)
    gq, gk, gv = got.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    assert torch.equal(gq, want_q.transpose(1, 2).reshape(rows, 1, -1))
    assert torch.equal(gk, want_k.transpose(1, 2).reshape(rows, 1, -1))
    assert torch.equal(gv, v)  # the values are not touched
    with pytest.raises(ValueError, match="contiguous bf16 rows"):
        native.rope_(lib, joined[..., ::2], cos, sin, 1, dim)
    with pytest.raises(ValueError, match="cos and sin of"):
        native.rope_(lib, joined.clone(), cos[:-1], sin[:-1], 1, dim)


@pytest.mark.parametrize("rows,dim", [(1, 576), (64, 576), (7, 64)])
def test_add_rms_norm_is_torchs_add_then_the_native_norm(lib, rows, dim):
    """x += delta in place, rounded as torch's bf16 add rounds (bit for bit, near-cancelling pairs too), then the
    norm of the new x as rms_norm gives it."""
    g = torch.Generator().manual_seed(rows + dim)
    weight = torch.randn(dim, generator=g).bfloat16()
    x = (torch.randn(rows, 1, dim, generator=g) * 3).bfloat16()
    delta = (torch.randn(rows, 1, dim, generator=g) * 3).bfloat16()
    delta[0, 0, :8] = -x[0, 0, :8]  # exact cancellation
    delta[-1, 0, 8:16] = (-x[-1, 0, 8:16].float() * 1.001).bfloat16()  # near it
    want_x = x + delta
    want = native.rms_norm(lib, want_x, weight, 1e-5)
    got = native.add_rms_norm(lib, x, delta, weight, 1e-5)
    assert torch.equal(x, want_x) and torch.equal(got, want)
    with pytest.raises(ValueError, match="in place into contiguous rows"):
        native.add_rms_norm(lib, x[..., ::2], delta[..., ::2], weight[::2], 1e-5)
    with pytest.raises(ValueError, match="rows and deltas"):
        native.add_rms_norm(lib, x, delta[:, :, :-1], weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (6, 1, 80)])
def test_attention_from_the_joined_product_is_decode_attention_bit_for_bit(lib, dtype, heads, kv_heads, dim):
    """decode_attention_joined (queries, new keys and values read from the joined q/k/v rows, output in the buffers'
    dtype) against decode_attention on copies of them followed by .to(dtype): the same buffers after, the same
    output bit for bit; padding rows past the active ones come back zero."""
    rows, padded, slots, width = 5, 8, 6, 100
    keys, values = buffers(rows, slots, kv_heads, width, dim, dtype, seed=dim)
    g = torch.Generator().manual_seed(heads)
    sizes = (heads * dim, kv_heads * dim, kv_heads * dim)
    joined = (torch.randn(padded, 1, sum(sizes), generator=g) * 2).to(dtype)
    lengths = torch.tensor([1, 37, 100, 64, 65])
    q, k, v = joined[:rows].split(sizes, -1)
    want_keys, want_values = keys.clone(), values.clone()
    want = native.decode_attention(
        lib,
        q.reshape(rows, heads, 1, dim),
        k.reshape(rows, kv_heads, dim),
        v.reshape(rows, kv_heads, dim),
        want_keys,
        want_values,
        lengths,
        dim**-0.5,
    )
    got = native.decode_attention_joined(lib, joined, sizes, keys, values, lengths, dim**-0.5)
    assert got.shape == (padded, 1, heads * dim) and got.dtype == dtype
    assert torch.equal(got[:rows], want.reshape(rows, 1, heads * dim))
    assert not got[rows:].any()
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    with pytest.raises(ValueError, match="contiguous joined product"):
        native.decode_attention_joined(
            lib, joined.float() if dtype == torch.bfloat16 else joined.bfloat16(), sizes, keys, values, lengths, 1.0
        )
    with pytest.raises(ValueError, match="lengths as contiguous int64"):
        native.decode_attention_joined(lib, joined, sizes, keys, values, lengths.int(), 1.0)
    with pytest.raises(RuntimeError, match="no keys or more than the buffer holds"):
        native.decode_attention_joined(lib, joined, sizes, keys, values, torch.tensor([1, 2, 3, 4, width + 1]), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_from_the_joined_product_over_given_slots_writes_nothing(lib, dtype):
    """With slots (a packed prefill: every token over its causal span of its prompt's slot), each row attends over
    its slot as decode_attention with the same slots does, bit for bit after .to(dtype); the row's own keys and
    values are not written, and bad slots are refused in one line."""
    heads, kv_heads, dim, slots, width = 9, 3, 64, 4, 130
    keys, values = buffers(0, slots, kv_heads, width, dim, dtype, seed=3)
    before_keys, before_values = keys.clone(), values.clone()
    g = torch.Generator().manual_seed(4)
    sizes = (heads * dim, kv_heads * dim, kv_heads * dim)
    rows = 7
    joined = torch.randn(rows, 1, sum(sizes), generator=g).to(dtype)
    which = torch.tensor([2, 2, 2, 0, 3, 3, 1])  # several rows over one slot, at different lengths
    lengths = torch.tensor([1, 2, 3, 129, 64, 65, 130])
    q = joined[:, :, : sizes[0]].reshape(rows, heads, 1, dim)
    want = native.decode_attention(lib, q, None, None, keys, values, lengths, 0.125, which)
    got = native.decode_attention_joined(lib, joined, sizes, keys, values, lengths, 0.125, which)
    assert torch.equal(got, want.reshape(rows, 1, heads * dim).to(dtype))
    assert torch.equal(keys, before_keys) and torch.equal(values, before_values)
    for bad in (which.int(), torch.tensor([0, 1, 2, 3, 4, 0, 0]), which[:3]):
        with pytest.raises(ValueError, match="one int64 slot"):
            native.decode_attention_joined(lib, joined, sizes, keys, values, lengths, 0.125, bad)


def test_silu_mul_is_the_gated_activation_within_one_bf16_step(lib):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    gated = (torch.randn(64, 1, 2 * 1536, generator=g) * 4).bfloat16()
    gated[0, 0, :4] = torch.tensor([0.0, -90.0, 90.0, -0.0]).bfloat16()  # exp's edges
    gate, up = gated.chunk(2, -1)
    want = F.silu(gate) * up
    got = native.silu_mul(lib, gated)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    gap = (got.float() - want.float()).abs()
    assert (gap <= bf16_step(want) * 1.01 + 1e-30).all()  # at most one step (two roundings, each maybe one off)
    assert (got != want).float().mean() < 0.01  # and rarely: the fp32 exp of libm vs torch's
    assert torch.equal(native.silu_mul(lib, gated[5:6]), got[5:6])  # per row
    with pytest.raises(ValueError, match="halves of an even width, got 7"):
        native.silu_mul(lib, gated[..., :7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_argmax_is_torchs_argmax(lib, dtype):
    g = torch.Generator().manual_seed(6)
    for n in (1, 7, 512, 513, 49152):  # shorter than, exactly, and across the kernel's blocks of 512
        logits = torch.randn(9, n, generator=g).to(dtype)
        if n > 1:
            logits[1, n // 2] = logits[1, -1] = 50.0  # ties: the first wins
            logits[2, 0] = logits[2, -1] = 50.0
            logits[3, n - 1] = float("nan")  # a NaN wins, the first one
            logits[3, 0] = 1e4
            logits[4, 1:] = float("nan")
        logits[5] = float("-inf")
        logits[6] = float("inf")
        logits[7, -1] = float("inf")
        logits[8] = -0.0
        logits[8, -1] = 0.0  # -0 == +0: the first
        assert torch.equal(native.argmax(lib, logits), logits.argmax(-1)), n
        assert torch.equal(native.argmax(lib, logits[:, :]), logits.float().argmax(-1)), n
    with pytest.raises(ValueError, match="fp32 or bf16 logits"):
        native.argmax(lib, logits.half())
    with pytest.raises(ValueError, match=r"n >= 1"):
        native.argmax(lib, logits[:, :0])
