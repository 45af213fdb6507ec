"""Converted weights are cached: a GGUF is dequantised once per (content, dtype); a warm load reads no GGUF; a
truncated or partial entry is rebuilt; two processes converting at once both succeed; `orca2 cache` lists and
clears."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from orca2.weights import cached_conversion, list_entries, models_dir, valid_entry


def build_files(marker: Path | None = None, delay: float = 0.0):
    """A conversion that writes two files (and counts its runs in `marker`)."""

    def build(folder: Path) -> None:
        if marker is not None:
            with open(marker, "a") as f:
                f.write("x")
        time.sleep(delay)
        (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
        (folder / "config.json").write_text('{"a": 1}')

    return build


def test_a_conversion_runs_once_and_a_damaged_entry_is_rebuilt(tmp_path, caplog):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"weights" * 1000)
    runs = tmp_path / "runs"
    first = cached_conversion(source, "float32", build_files(runs))
    again = cached_conversion(source, "float32", build_files(runs))
    assert first == again and runs.read_text() == "x" and valid_entry(first)
    assert cached_conversion(source, "bfloat16", build_files(runs)) != first and runs.read_text() == "xx"  # per dtype
    with open(first / "model.safetensors", "r+b") as f:  # a truncated file: found by its recorded size
        f.truncate(100)
    assert not valid_entry(first)
    rebuilt = cached_conversion(source, "float32", build_files(runs))
    assert (
        rebuilt == first
        and valid_entry(rebuilt)
        and runs.read_text() == "xxx"
        and "incomplete or damaged" in caplog.text
    )
    (first / "entry.json").unlink()  # a partial entry (killed before it was complete)
    assert valid_entry(cached_conversion(source, "float32", build_files(runs))) and runs.read_text() == "xxxx"
    source.write_bytes(b"other weights" * 1000)  # new content: a new entry
    assert cached_conversion(source, "float32", build_files(runs)) != first
    rows = list_entries()
    assert len(rows) == 3 and all(r["whole"] and r["bytes"] > 4096 for r in rows)
    assert not [p for p in models_dir().iterdir() if p.name.startswith(".m")]  # no temporary folder left


def test_two_processes_converting_at_once_both_succeed(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"weights" * 1000)
    code = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from test_weights import build_files; from orca2.weights import cached_conversion; "
        "print(cached_conversion(Path(sys.argv[2]), 'float32', build_files(Path(sys.argv[3]), delay=1.0)))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(source), str(tmp_path / "runs")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1 and valid_entry(Path(folders.pop()))
    assert (tmp_path / "runs").read_text() == "xx"  # both converted (at once); one entry stands
    assert [p.name for p in models_dir().iterdir() if p.is_dir()] == [list_entries()[0]["folder"].rsplit("/", 1)[-1]]


def test_the_embedded_gguf_loads_warm_without_reading_the_gguf(tmp_path, monkeypatch):
    """local:default: the first load converts; the second reads neither the GGUF nor its bytes, and gives the same
    weights."""
    import builtins

    import torch

    from orca2 import models

    gguf = tmp_path / "SmolLM2.gguf"
    shutil.copy(models.smollm2_gguf(), gguf)
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    first, _ = models.load_local_model("default", "cpu")
    import gguf as gguf_package

    def refuse(*args, **kwargs):
        raise AssertionError("a warm load read the GGUF")

    real_open = builtins.open
    monkeypatch.setattr(gguf_package, "GGUFReader", refuse)
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: refuse() if str(f) == str(gguf) else real_open(f, *a, **k))
    start = time.perf_counter()
    second, tokenizer = models.load_local_model("default", "cpu")
    print(f"warm load {time.perf_counter() - start:.2f} s")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_cache_command_lists_and_clears(tmp_path, run_cli):
    env = {"ORCA2_CACHE_DIR": str(tmp_path / "c")}
    source = tmp_path / "m.gguf"
    source.write_bytes(b"weights" * 1000)
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from test_weights import build_files; "
        "from orca2.weights import cached_conversion; cached_conversion(Path(sys.argv[2]), 'float32', build_files())"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(source)], check=True, env={**os.environ, **env}
    )
    (tmp_path / "c" / "responses.jsonl").write_text(json.dumps({"key": "k"}) + "\n")
    (tmp_path / "c" / "native").mkdir()
    (tmp_path / "c" / "native" / "decode_attention-0123456789abcdef.so").write_bytes(b"\0" * 2048)
    listed = run_cli("cache", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "m.gguf as float32" in listed.stdout and "responses" in listed.stdout and "KB" in listed.stdout
    assert "native kernel decode_attention-0123456789abcdef" in listed.stdout
    cleared = run_cli("cache", "clear", "--kernels", env=env)
    assert cleared.returncode == 0 and "removed 1 native kernel" in cleared.stdout
    assert not list((tmp_path / "c" / "native").glob("*.so")) and list((tmp_path / "c" / "models").glob("m-*"))
    cleared = run_cli("cache", "clear", "--models", env=env)
    assert cleared.returncode == 0 and "removed 1 converted model" in cleared.stdout
    assert (tmp_path / "c" / "responses.jsonl").exists() and not list((tmp_path / "c" / "models").glob("m-*"))
    assert run_cli("cache", "clear", env=env).returncode != 0  # say what to clear: nothing is removed by default


def test_a_generic_tokenizer_loads_as_autotokenizer_would(tiny_model, tmp_path, monkeypatch):
    """A folder whose tokenizer_config names the generic class is read straight from tokenizer.json (≈ 0.7 s less
    for SmolLM2); the result is AutoTokenizer's: class, special tokens, chat template, ids. Any other class named
    goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    from orca2 import models

    folder = tmp_path / "generic"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in models.GENERIC_TOKENIZERS
    fast, auto = models.load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(fast) is type(auto)
    assert fast.special_tokens_map == auto.special_tokens_map and fast.all_special_ids == auto.all_special_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?\nSay it."}]
    assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    text = "Tom has 3 apples; he eats 1 — how many?"
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    models.load_tokenizer(str(folder))
    assert calls == []
    config["tokenizer_class"] = "LlamaTokenizerFast"  # a model-specific class: AutoTokenizer decides
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    models.load_tokenizer(str(folder))
    assert len(calls) == 1
