"""Native kernels, compiled on first use: C sources in orca2/csrc built with the system's C compiler into the cache
(<cache root>/native/, keyed by the sources and their shared header, the flags, the compiler and the CPU), loaded
with ctypes.

The engine's decode step lives here: its attention (csrc/decode_attention.c) and its small operations
(csrc/decode_ops.c: RMSNorm, rotary embedding, SiLU-gated product under bf16; the greedy argmax), all sources built
into one library. Where it cannot be built (no C compiler, no OpenMP, not Linux) or ORCA2_NATIVE=0, the engine
attends with torch products instead (orca2.engine.attend) and runs the model's own modules; either way a
sequence's tokens do not depend on the batch, but the two paths round differently, so the same run on machines with
and without a compiler can differ in its last bits. Which path ran is logged once.

The library links OpenMP by its soname (libgomp.so.1); loaded into a process where torch already has its own
libgomp, it shares torch's thread pool instead of starting a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from orca2.weights import cache_root

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "decode_attention.c", CSRC / "decode_ops.c")
HEADERS = (CSRC / "bf16.h",)  # what the sources include: part of the build's key, found through -I
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]  # each source compiled alone
# ... then linked without -ffast-math: linked with it, GCC adds crtfastmath.o, whose constructor turns on flush-to-zero
# for the whole process once the library loads (every torch op after it would drop denormals).
LINK = ["-shared", "-fopenmp"]


def enabled() -> bool:
    return os.environ.get("ORCA2_NATIVE", "1") != "0"


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(keep[:2])


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library() -> Any:
    """The compiled kernels (a ctypes library), or None where they are off or cannot be built."""
    if not enabled():
        _say("native kernels off (ORCA2_NATIVE=0): the engine attends with torch products")
        return None
    return _build(str(cache_root()), _compiler())


@cache
def _say(message: str) -> None:
    log.info(message)


@cache
def _build(root: str, compiler: str | None) -> Any:
    """Build (once per key: sources, flags, compiler, CPU) into root/native/ and load; None where it cannot."""
    if platform.system() != "Linux" or compiler is None:
        log.info(
            "native kernels unavailable (%s): the engine attends with torch products",
            "no C compiler" if compiler is None else platform.system(),
        )
        return None
    sources = [path.read_bytes() for path in SOURCES + HEADERS]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        log.info("native kernels unavailable (%s): the engine attends with torch products", exc)
        return None
    flags = " ".join(FLAGS + LINK).encode()
    key = hashlib.sha256(b"\0".join([*sources, flags, version.encode(), _cpu().encode()]))
    target = Path(root) / "native" / f"kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            objects = [str(Path(work) / f"{path.stem}.o") for path in SOURCES]
            includes = [f"-I{folder}" for folder in dict.fromkeys(path.parent for path in HEADERS)]
            commands = [
                [compiler, *FLAGS, *includes, "-c", str(path), "-o", obj] for path, obj in zip(SOURCES, objects)
            ]
            commands.append([compiler, *LINK, *objects, "-o", str(Path(work) / "kernels.so"), "-lm"])
            for command in commands:
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode != 0:
                    last = (run.stderr.strip().splitlines() or ["no message"])[-1]
                    log.warning("native kernels did not build (%s): the engine attends with torch products", last)
                    return None
            os.replace(Path(work) / "kernels.so", target)  # atomic: a concurrent build of one key keeps one file
    os.utime(target)  # its last use, for `orca2 cache`
    lib = ctypes.CDLL(str(target))
    pointer, size, number, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "orca2_decode_attention": (flag, [pointer] * 8 + [size] * 6 + [number, flag, flag]),
        "orca2_decode_attention_joined": (
            flag,
            [pointer, size, size, size] + [pointer] * 5 + [size] * 6 + [number, flag, flag],
        ),
        "orca2_rms_norm": (None, [pointer] * 3 + [size] * 2 + [number, flag]),
        "orca2_add_rms_norm": (None, [pointer] * 4 + [size] * 2 + [number, flag]),
        "orca2_rope": (None, [pointer] * 3 + [size] * 4 + [flag]),
        "orca2_silu_mul": (None, [pointer] * 2 + [size] * 2 + [flag]),
        "orca2_argmax": (None, [pointer] + [size] * 2 + [flag, pointer, flag]),
    }
    for name, (returns, takes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = returns, takes
    log.info("native decode step: %s", target)
    return lib


PITCH = 64  # keys per block: a slot's keys are whole blocks, each laid out transposed (the kernel reads blocks whole)


def pitch(width: int) -> int:
    """Keys a key_buffer holds per row for `width` positions: width rounded up to a multiple of PITCH."""
    return -(-width // PITCH) * PITCH


def key_buffer(slots: int, kv_heads: int, width: int, dim: int, dtype: Any, device: Any) -> Any:
    """A layer's key buffer as decode_attention reads it: (slots, kv_heads, blocks, dim, PITCH), the keys of
    positions b * PITCH .. b * PITCH + PITCH - 1 in block b, transposed, so that a block is one run of memory; enough
    blocks for `width` positions. Uninitialised: the scores of keys past a sequence's length are thrown away unused.
    Write keys with write_keys; logical_keys reads them back as (slots, kv_heads, width, dim)."""
    import torch

    return torch.empty((slots, kv_heads, pitch(width) // PITCH, dim, PITCH), dtype=dtype, device=device)


def write_keys(keys: Any, slots: Any, positions: Any, new: Any) -> None:
    """keys (a key_buffer) at slots[i], position positions[i] = new[i], for new (writes, kv_heads, dim)."""
    keys[slots, :, positions // PITCH, :, positions % PITCH] = new


def logical_keys(keys: Any, width: int) -> Any:
    """A key_buffer's keys as (slots, kv_heads, width, dim) (a copy)."""
    slots, kv_heads, blocks, dim, _ = keys.shape
    return keys.transpose(-1, -2).reshape(slots, kv_heads, blocks * PITCH, dim)[:, :, :width]


def as_key_buffer(logical: Any) -> Any:
    """A key_buffer holding logical (slots, kv_heads, width, dim) keys, zeros past width."""
    import torch

    slots, kv_heads, width, dim = logical.shape
    keys = key_buffer(slots, kv_heads, width, dim, logical.dtype, logical.device)
    padded = torch.zeros((slots, kv_heads, keys.shape[2] * PITCH, dim), dtype=logical.dtype, device=logical.device)
    padded[:, :, :width] = logical
    keys.copy_(padded.view(slots, kv_heads, keys.shape[2], PITCH, dim).transpose(-1, -2))
    return keys


def _pitch(keys: Any, values: Any) -> int | None:
    """Keys per slot and head of a key_buffer for values (slots, kv_heads, width, dim), else None."""
    held = keys.dim() == 5 and keys.shape[-1] == PITCH and keys.is_contiguous() and values.dim() == 4
    if not held or keys.shape[:2] != values.shape[:2] or keys.shape[3] != values.shape[3]:
        return None
    row = keys.shape[2] * PITCH
    return row if row >= values.shape[2] else None


def builds(root: Path | None = None) -> list[Path]:
    """The kernels built under the cache (`orca2 cache` lists them, `orca2 cache clear --kernels` removes them)."""
    folder = (root or cache_root()) / "native"
    return sorted(folder.glob("*.so")) if folder.is_dir() else []


def _check_slots(slots: Any, rows: int, held: int) -> None:
    """Refuse, in one line, slots that are not one int64 slot of the `held` per row; without slots (row b reads slot
    b), more rows than slots."""
    import torch

    if slots is None:
        if rows > held:
            raise ValueError(f"native decode attention: {rows} rows read {rows} slots, but the buffers hold {held}")
        return
    laid = slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (rows,)
    if not laid or (rows and not 0 <= int(slots.min()) <= int(slots.max()) < held):
        raise ValueError(f"native decode attention: one int64 slot of the {held} per row")


def decode_attention(
    lib: Any,
    query: Any,
    key: Any,
    value: Any,
    keys: Any,
    values: Any,
    lengths: Any,
    scale: float,
    slots: Any = None,
) -> Any:
    """Write each row's new key and value (rows, H_kv, D) at lengths[b] - 1 (None: already there), then attend:
    query (B, H, 1, D) over each row's first lengths[b] keys of its slot → (B, 1, H, D) in the query's dtype.

    keys: a key_buffer for W positions; values: (slots, H_kv, W, D), contiguous; both fp32 or bf16
    in CPU memory; computed in fp32. Row b reads slot b, or slots[b] where given (a prefill: a prompt's queries, each
    over its own causal span of the prompt's slot; no new keys then). lib: what library() gave (not None)."""
    import torch

    rows, heads, _, dim = query.shape
    kv_heads, width = values.shape[1], values.shape[2]
    held = keys.dtype in (torch.float32, torch.bfloat16) and values.dtype == keys.dtype
    row = _pitch(keys, values) if keys.device.type == "cpu" and values.is_contiguous() else None
    if not held or row is None:
        raise ValueError("native decode attention reads a key_buffer and whole values, fp32 or bf16, in CPU memory")
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
        if key is not None:
            raise ValueError("native decode attention: rows that read given slots write no new keys")
    _check_slots(slots, rows, len(keys))
    if key is not None:
        key, value = key.to(keys.dtype).contiguous(), value.to(keys.dtype).contiguous()
        if key.shape != (rows, kv_heads, dim) or value.shape != key.shape:
            raise ValueError(f"new keys and values must be ({rows}, {kv_heads}, {dim})")
    q = query.reshape(rows, heads, dim).to(torch.float32).contiguous()  # (.to keeps a same-dtype view's strides)
    n = lengths.to(torch.int64).contiguous()
    out = torch.empty((rows, heads, dim), dtype=torch.float32)
    failed = lib.orca2_decode_attention(
        q.data_ptr(),
        None if key is None else key.data_ptr(),
        None if value is None else value.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        n.data_ptr(),
        None if slots is None else slots.data_ptr(),
        out.data_ptr(),
        rows,
        kv_heads,
        heads // kv_heads,
        width,
        row,
        dim,
        scale,
        int(keys.dtype == torch.bfloat16),
        _threads(),
    )
    if failed:
        raise RuntimeError(
            "native decode attention: a row with no keys or more than the buffer holds, or no memory for its scores"
        )
    return out.view(rows, 1, heads, dim).to(query.dtype)


def decode_attention_joined(
    lib: Any,
    joined: Any,
    sizes: tuple[int, int, int],
    keys: Any,
    values: Any,
    lengths: Any,
    scale: float,
    slots: Any = None,
) -> Any:
    """A decode step's attention straight from its joined q/k/v product, joined (B, 1, q + k + v) contiguous in the
    buffers' dtype (rotary embedding applied; sizes: (q, k, v) widths): the first len(lengths) rows write their new
    key and value and attend as decode_attention does → (B, 1, q) in that dtype, rows past len(lengths) zero. The
    same numbers as decode_attention followed by .to(dtype), without the copies and conversions around it.

    slots (int64, one per row of lengths): row b attends over slot slots[b] instead, whose keys are already written
    (a packed prefill, every token at once); its own keys and values are not written."""
    import torch

    rows, (q_size, k_size, _) = len(lengths), sizes
    kv_heads, width, dim = values.shape[1], values.shape[2], values.shape[3]
    pitch = _pitch(keys, values) if values.is_contiguous() else None
    if joined.dtype != keys.dtype or values.dtype != keys.dtype or not joined.is_contiguous() or pitch is None:
        raise ValueError("native decode attention: a contiguous joined product in the buffers' dtype and a key_buffer")
    if lengths.dtype != torch.int64 or not lengths.is_contiguous():
        raise ValueError("native decode attention: lengths as contiguous int64")
    _check_slots(slots, rows, len(keys))
    if joined.shape[0] < rows or k_size != kv_heads * dim or sum(sizes) != joined.shape[-1]:
        raise ValueError(f"native decode attention: {rows} rows of a joined product of {tuple(sizes)} widths")
    out = torch.empty((joined.shape[0], 1, q_size), dtype=joined.dtype)
    out[rows:] = 0
    failed = lib.orca2_decode_attention_joined(
        joined.data_ptr(),
        joined.shape[-1],
        q_size,
        q_size + k_size,
        keys.data_ptr(),
        values.data_ptr(),
        lengths.data_ptr(),
        None if slots is None else slots.data_ptr(),
        out.data_ptr(),
        rows,
        kv_heads,
        q_size // k_size,
        width,
        pitch,
        dim,
        scale,
        int(keys.dtype == torch.bfloat16),
        _threads(),
    )
    if failed:
        raise RuntimeError("native decode attention: a row with no keys or more than the buffer holds, or no memory")
    return out


def _rows(x: Any, name: str) -> Any:
    """x as contiguous bf16 rows in CPU memory (its last dimension), or a one-line refusal."""
    import torch

    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"native {name} takes bf16 tensors in CPU memory (got {x.dtype} on {x.device.type})")
    return x.contiguous()


def rms_norm(lib: Any, x: Any, weight: Any, eps: float) -> Any:
    """transformers' Llama RMSNorm under bf16: weight * bf16(x / sqrt(mean(x²) + eps)), over x's last dimension."""
    import torch

    x, weight = _rows(x, "rms_norm"), _rows(weight, "rms_norm")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"native rms_norm: a weight of ({dim},) for rows of {dim}, got {tuple(weight.shape)}")
    out = torch.empty_like(x)
    lib.orca2_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps, _threads())
    return out


def add_rms_norm(lib: Any, x: Any, delta: Any, weight: Any, eps: float) -> Any:
    """The residual add then the next norm, under bf16: x += delta in place (rounded to bf16, as torch adds), and
    rms_norm(x) returned."""
    import torch

    if not x.is_contiguous():
        raise ValueError("native add_rms_norm adds in place into contiguous rows")
    x, delta, weight = _rows(x, "add_rms_norm"), _rows(delta, "add_rms_norm"), _rows(weight, "add_rms_norm")
    dim = x.shape[-1]
    if weight.shape != (dim,) or delta.shape != x.shape:
        raise ValueError(f"native add_rms_norm: rows and deltas of {tuple(x.shape)} and a weight of ({dim},)")
    out = torch.empty_like(x)
    lib.orca2_add_rms_norm(
        x.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps, _threads()
    )
    return out


def rope_(lib: Any, x: Any, cos: Any, sin: Any, heads: int, dim: int) -> Any:
    """The rotary embedding, in place, on the first `heads` heads of `dim` of each row (token) of x (..., width): a
    q/k/v product, queries then keys. cos, sin: one row of dim per token of x, as the model's rotary_emb gives them.
    Returns x."""
    _rows(x, "rope_")
    if not x.is_contiguous() or heads * dim > x.shape[-1] or dim > 512 or dim % 2:
        raise ValueError("native rope_ works in place on contiguous bf16 rows holding the heads, of dim <= 512")
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    cos, sin = _rows(cos, "rope_"), _rows(sin, "rope_")
    if cos.numel() != rows * dim or sin.numel() != rows * dim:
        raise ValueError(f"native rope_: cos and sin of ({rows}, 1, {dim})")
    lib.orca2_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, width, heads, dim, _threads())
    return x


def silu_mul(lib: Any, x: Any) -> Any:
    """bf16(silu(gate) * up) for (gate, up) the two halves of x's last dimension (a joined gate/up product)."""
    import torch

    x = _rows(x, "silu_mul")
    if x.shape[-1] % 2:
        raise ValueError(f"native silu_mul: gate and up halves of an even width, got {x.shape[-1]}")
    width = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype)
    lib.orca2_silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], width, _threads())
    return out


def argmax(lib: Any, logits: Any) -> Any:
    """Each row's argmax (rows, n) → (rows,) int64: the first largest value, or the first NaN (as torch.argmax), for
    fp32 or bf16 logits, read in place without a copy to fp32."""
    import torch

    on_cpu = logits.dtype in (torch.float32, torch.bfloat16) and logits.device.type == "cpu"
    if not on_cpu or logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError("native argmax takes (rows, n >= 1) fp32 or bf16 logits in CPU memory")
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    bf16 = int(logits.dtype == torch.bfloat16)
    lib.orca2_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], bf16, out.data_ptr(), _threads())
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()
