import os
import subprocess
import sys
from pathlib import Path

import pytest

from orca2.engine import Engine

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
DATA_DIR = Path(os.environ.get("ORCA2_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared GSM8K/BBH data (ORCA2_DATA_DIR, default ../shared/data); skips when absent."""
    if not (DATA_DIR / "gsm8k" / "test.jsonl").exists() or not (DATA_DIR / "bbh").is_dir():
        pytest.skip(f"shared eval data not found at {DATA_DIR} (set ORCA2_DATA_DIR)")
    return DATA_DIR


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, less the rendezvous an in-process training run of this
    test session left behind (its port is still held here, so a child that trains would fail to bind it)."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, **extra}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m orca2 ARGS` in a subprocess, as a user would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "orca2", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=child_env(**(env or {})),
        timeout=300,
    )


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    """The `run_cli` helper as a fixture (test modules are imported by path, so conftest is not importable)."""
    return run_cli


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def _native_kernels(tmp_path_factory):
    """The native kernels, built once for the session (a build takes about a second, and every test has a cache of
    its own): (the folder they were built in, the compiler), or None where they do not build."""
    from orca2 import native

    root = tmp_path_factory.mktemp("kernels")
    compiler = native._compiler()
    if not native.enabled() or compiler is None:
        return None
    before = os.environ.get("ORCA2_CACHE_DIR")
    os.environ["ORCA2_CACHE_DIR"] = str(root)
    try:
        built = native.library() is not None
    finally:
        if before is None:
            del os.environ["ORCA2_CACHE_DIR"]
        else:
            os.environ["ORCA2_CACHE_DIR"] = before
    return (root / "native", compiler) if built else None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch, _native_kernels):
    """Each test gets its own teacher-response cache (never the user's ~/.cache). Where a test first loads the
    native kernels with the session's compiler, the session's build is copied into that cache first (so it is
    found, not built again); with another compiler (the build's own tests) nothing is copied."""
    import shutil

    monkeypatch.setenv("ORCA2_CACHE_DIR", str(tmp_path / "teacher-cache"))
    if _native_kernels is None:
        return
    from orca2 import native

    real, (folder, compiler) = native._build, _native_kernels

    def seeded(root: str, cc: str | None):
        target = Path(root) / "native"
        if cc == compiler and not target.exists():
            shutil.copytree(folder, target)
        return real(root, cc)

    seeded.cache_clear = real.cache_clear
    monkeypatch.setattr(native, "_build", seeded)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_ids(tokenizer, questions: list[str] | list[list[dict]]) -> list[list[int]]:
    """Each question as one user turn (or each conversation as it is) through the chat template: token ids."""
    convs = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in questions]
    return [
        tokenizer(
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False), add_special_tokens=False
        )["input_ids"]
        for c in convs
    ]


QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "hi",
    "Tell me a long story about a cat, a dog and a parrot.",
    "x",
    "Count to ten, slowly and carefully please.",
    "Why?",
    "Spell 'orca' backwards.",
    "ok",
]


class RecordingEngine(Engine):
    """The engine, keeping every logit row each sequence's next token was chosen from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list] = {}

    def _choose(self, seqs, logits):
        for seq, row in zip(seqs, logits):
            self.seen.setdefault(seq.job.key, []).append(row.detach().clone())
        super()._choose(seqs, logits)


def conversations():
    """QUESTIONS as a user would send them: single-turn, after a shared system prompt, and multi-turn."""
    system = "You are a careful assistant. Think one step at a time, then answer."
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    convs += [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in QUESTIONS[:5]]
    convs += [  # multi-turn: an earlier exchange, then the question
        [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "Let me see: 4."},
            {"role": "user", "content": "And why?"},
        ]
        for q in QUESTIONS[:2]
    ]
    return convs


@pytest.fixture(params=["native", "torch"])
def attention(request, monkeypatch):
    """Both decode attentions: the native kernel (orca2.native, where it builds) and torch's products."""
    from orca2 import native

    if request.param == "torch":
        monkeypatch.setenv("ORCA2_NATIVE", "0")
    elif native.library() is None:
        pytest.skip("the native kernel does not build here (no C compiler with OpenMP)")
    return request.param


def build_tiny_model(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    heads: int = 4,
    kv_heads: int = 2,
    arch: str = "llama",
) -> Path:
    """A tiny random Llama (or Qwen2: biases on q/k/v) with a character-level ChatML tokenizer, saved as an HF
    folder (no download)."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c")) + ["×", "÷", "—", "’"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character, newlines too
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    archs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = archs[arch]
    config = config_class(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny random chat model (built once per test session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def sft_records(n: int, kinds: tuple[str, ...] = ("arithmetic", "word-problem"), seed: int = 0) -> list[dict]:
    """Erased SFT records whose assistant turns are the synthetic generator's worked solutions."""
    from orca2.prompts import generic_prompt
    from orca2.sources.synthetic import generate_item

    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        item = generate_item(kind, i, seed=seed)
        reply = item.answer if kind == "arithmetic" else "\n".join(item.steps) + f"\nThe answer is: {item.answer}"
        records.append(
            {
                "id": f"{kind}/{i}",
                "task": f"synthetic/{kind}",
                "answer": item.answer,
                "meta": {},
                "messages": [
                    {"role": "system", "content": generic_prompt("cautious")},
                    {"role": "user", "content": item.question},
                    {"role": "assistant", "content": reply},
                ],
            }
        )
    return records


def preference_records(n, seed=0, shuffle_labels=False, kinds=("word-problem",)):
    """A planted preference: the worked solution is chosen over two replies in a bad style. shuffle_labels: the
    control — the same pairs, each oriented by a coin flip (explicit `pairs`)."""
    import random

    rng = random.Random(seed)
    out = []
    for r in sft_records(n, kinds=kinds, seed=seed):
        good = r["messages"][-1]["content"]
        bad = [f"NO. {r['answer']}?? " * 3, "I CANNOT SAY!! " * 4]
        record = {
            "id": r["id"],
            "task": r["task"],
            "messages": r["messages"][:-1],
            "answer": r["answer"],
            "meta": {},
            "chosen": [{"content": good, "meta": {"author": "teacher"}}],
            "rejected": [{"content": x, "meta": {"author": "student", "score": 1}} for x in bad],
        }
        if shuffle_labels:
            flips = [rng.random() < 0.5 for _ in bad]
            winners = [good] + [x for x, f in zip(bad, flips) if f]
            losers = [x for x, f in zip(bad, flips) if not f] + ([good] if any(flips) else [])
            pairs = [
                [0, losers.index(x)] if not f else [winners.index(x), losers.index(good)] for x, f in zip(bad, flips)
            ]
            record["chosen"] = [{"content": x} for x in winners]
            record["rejected"] = [{"content": x} for x in losers]
            record["pairs"] = pairs
        out.append(record)
    return out


@pytest.fixture
def sft_file(tmp_path) -> Path:
    from orca2.io import write_records

    path = tmp_path / "sft.jsonl"
    write_records(path, sft_records(24))
    return path
