"""Grammar-constrained decoding for the local engine: a request's format (orca2.structured) compiled to a grammar
with xgrammar, and per sequence a matcher that says, before every step, which tokens may come next.

xgrammar is the constraint engine vLLM and SGLang use: it compiles a JSON Schema or a regular expression against
the tokenizer's vocabulary once (cached here per schema and tokenizer), and fills a token bitmask per sequence
per step in microseconds — context-independent tokens are precomputed at compile time. The engine applies the
masks of its constrained rows to the logits before choosing (orca2.engine), so greedy and sampled decoding, seeds
and batch layout work as without a constraint; the end-of-turn tokens are allowed only once the grammar is complete.
"""

from __future__ import annotations

import json
from typing import Any

from orca2.errors import Orca2Error


class Grammars:
    """Formats compiled for one tokenizer: `compile(format)` → a compiled grammar, once per distinct format."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.compiled: dict[str, Any] = {}
        self.compile_seconds: dict[str, float] = {}  # per format name: time of its (first) compile

    def compile(self, fmt: dict[str, Any]) -> Any:
        import time

        key = json.dumps(fmt, sort_keys=True)
        if key in self.compiled:
            return self.compiled[key]
        start = time.perf_counter()
        try:
            if fmt.get("type") == "json_schema":
                spec = fmt["json_schema"]
                name = spec.get("name", "schema")
                # any whitespace the model likes, but at most a short run of it: a small model can loop on spaces
                grammar = self.compiler.compile_json_schema(
                    json.dumps(spec["schema"]), any_whitespace=True, max_whitespace_cnt=8
                )
            elif fmt.get("type") == "regex":
                name = fmt.get("name", "regex")
                grammar = self.compiler.compile_regex(fmt["regex"])
            else:
                kind = fmt.get("type")
                raise Orca2Error(f"format type '{kind}' cannot constrain the local engine (valid: json_schema, regex)")
        except (RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, Orca2Error):
                raise
            construct = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            construct = construct.split("] ", 1)[-1]  # xgrammar prefixes a time stamp and source position
            raise Orca2Error(f"format {name}: the local engine cannot constrain to it: {construct[:200]}") from None
        self.compiled[key] = grammar
        self.compile_seconds[name] = time.perf_counter() - start
        return grammar

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)


class Masks:
    """The engine's per-step token masks: one bitmask row per slot, filled for the constrained rows only."""

    def __init__(self, rows: int, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self.seconds = 0.0  # CPU time spent filling and applying masks (for the benchmark)
        self.steps = 0

    def apply(self, logits: Any, matchers: list[tuple[int, Any]]) -> Any:
        """Mask `logits` (rows, V) in place at the given (row, matcher) pairs; rows without a matcher are untouched."""
        import time

        start = time.process_time()
        for row, matcher in matchers:
            matcher.fill_next_token_bitmask(self.bitmask, row)
        rows = [row for row, _ in matchers]
        self.xgr.apply_token_bitmask_inplace(
            logits, self.bitmask[: logits.shape[0]].to(logits.device), vocab_size=self.vocab_size, indices=rows
        )
        self.seconds += time.process_time() - start
        self.steps += 1
        return logits


def accept(matcher: Any, token: int, where: str) -> None:
    """Advance a matcher by the token chosen; a token the mask allowed is always accepted."""
    if not matcher.accept_token(token):
        raise RuntimeError(f"{where}: the grammar rejected token {token} that its own mask allowed")
