"""Native kernels, compiled on first use: C sources in orca2/csrc built with the system's C compiler into the cache
(<cache root>/native/, keyed by the source, the flags, the compiler and the CPU), loaded with ctypes.

Only the engine's decode attention lives here (csrc/decode_attention.c). Where it cannot be built (no C compiler,
no OpenMP, not Linux) or ORCA2_NATIVE=0, the engine attends with torch products instead (orca2.engine.attend);
either way a sequence's tokens do not depend on the batch, but the two paths round differently, so the same run
on machines with and without a compiler can differ in its last bits. Which path ran is logged once.

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
SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


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
    """Build (once per key: source, flags, compiler, CPU) into root/native/ and load; None where it cannot."""
    if platform.system() != "Linux" or compiler is None:
        log.info(
            "native kernels unavailable (%s): the engine attends with torch products",
            "no C compiler" if compiler is None else platform.system(),
        )
        return None
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        log.info("native kernels unavailable (%s): the engine attends with torch products", exc)
        return None
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu().encode()]))
    target = Path(root) / "native" / f"decode_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            os.unlink(tmp)
            last = (run.stderr.strip().splitlines() or ["no message"])[-1]
            log.warning("native kernels did not build (%s): the engine attends with torch products", last)
            return None
        os.replace(tmp, target)  # atomic: a concurrent build of the same key keeps one whole file
    os.utime(target)  # its last use, for `orca2 cache`
    lib = ctypes.CDLL(str(target))
    fn = lib.orca2_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    log.info("native decode attention: %s", target)
    return lib


PITCH = 64  # key rows are padded to a multiple of this many keys (the kernel reads its blocks of keys whole)


def key_buffer(slots: int, kv_heads: int, width: int, dim: int, dtype: Any, device: Any) -> Any:
    """A layer's key buffer as decode_attention reads it: (slots, kv_heads, dim, pitch) in memory, the pitch `width`
    rounded up to a multiple of PITCH, handed out as its (slots, kv_heads, width, dim) view, so writes index it like
    the value buffer. Uninitialised: the scores of keys past a sequence's length are thrown away unused."""
    import torch

    pitch = -(-width // PITCH) * PITCH
    whole = torch.empty((slots, kv_heads, dim, pitch), dtype=dtype, device=device)
    return whole[..., :width].transpose(-1, -2)


def _pitch(keys: Any) -> int | None:
    """The pitch of a whole key_buffer (as key_buffer made it, with its memory behind it), else None."""
    slots, kv_heads, width, dim = keys.shape
    pitch = keys.stride(3)
    laid = keys.stride() == (kv_heads * dim * pitch, dim * pitch, 1, pitch) and pitch % PITCH == 0
    held = (keys.storage_offset() + slots * kv_heads * dim * pitch) * keys.element_size()
    if laid and pitch >= width and held <= keys.untyped_storage().nbytes():
        return pitch
    return None


def builds(root: Path | None = None) -> list[Path]:
    """The kernels built under the cache (`orca2 cache` lists them, `orca2 cache clear --kernels` removes them)."""
    folder = (root or cache_root()) / "native"
    return sorted(folder.glob("*.so")) if folder.is_dir() else []


def decode_attention(
    lib: Any, query: Any, key: Any, value: Any, keys: Any, values: Any, lengths: Any, scale: float
) -> Any:
    """Write each row's new key and value (rows, H_kv, D) at lengths[b] - 1 (None: already there), then attend:
    query (B, H, 1, D) over each row's first lengths[b] keys of its slot → (B, 1, H, D) in the query's dtype.

    keys: a key_buffer (its (slots, H_kv, W, D) view); values: (slots, H_kv, W, D), contiguous; both fp32 or bf16
    in CPU memory; computed in fp32. lib: what library() gave (not None)."""
    import torch

    rows, heads, _, dim = query.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    held = keys.dtype in (torch.float32, torch.bfloat16) and values.dtype == keys.dtype
    pitch = _pitch(keys) if keys.device.type == "cpu" and values.is_contiguous() else None
    if not held or pitch is None or values.shape != keys.shape:
        raise ValueError("native decode attention reads a key_buffer and whole values, fp32 or bf16, in CPU memory")
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
        out.data_ptr(),
        rows,
        kv_heads,
        heads // kv_heads,
        width,
        pitch,
        dim,
        scale,
        int(keys.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if failed:
        raise RuntimeError(
            "native decode attention: a row with no keys or more than the buffer holds, or no memory for its scores"
        )
    return out.view(rows, 1, heads, dim).to(query.dtype)
