"""Stage `sample`: the student writes K replies per prompt (Orca-Math: K = 4 at temperature 0.7, top_p 0.95).

    orca2 sample --tasks tasks.jsonl --student runs/student/model -o samples.jsonl [--n 4] [--generic cautious]

The student answers under the generic system prompt it was trained with after prompt erasure (or none),
through the one way to ask a model: the local continuous-batching engine by default (`local:PATH`), or any
OpenAI-compatible server serving the student (`openai:NAME` with --base-url, e.g. vLLM), cached and
resumable like generate. Output: one reply record per sample — the prompt, the reply, and
`meta.prompt_id`, `meta.author: student`, `meta.sample`, the student's provenance — the input of
`orca2 judge`. Prompts whose request failed for good go to <output>.errors.jsonl (counted, never dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from orca2.ask import Request, ask
from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, atomic_writer, read_numbered, sidecar, write_errors
from orca2.models import ClientConfig, Sampling, parse_model
from orca2.records import Record, with_system_prompt
from orca2.stages import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    tasks: str = option(help="Prompts: task records (or traces / SFT records: the reply is dropped).")
    output: str = option(help="Sampled replies to write (one record per sample).", short="-o")
    student: str = option(
        "local:default", "The student: local:<folder|.gguf|default> (engine), openai:<name> (served) or batch:<name>."
    )
    generic: str | None = option(
        "cautious", "System prompt the student answers under (as trained): cautious, empty, a file; null: none."
    )
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(
        help="How replies are sampled.",
        factory=lambda: Sampling(temperature=0.7, top_p=0.95, n=4, max_tokens=512),
        flatten=True,
    )
    limit: int | None = option(None, "Only the first N prompts.")

    def __post_init__(self) -> None:
        parse_model(self.student)


def prompts(path: str, generic: str | None, limit: int | None) -> list[tuple[Record, list[dict[str, str]]]]:
    """(record, messages to send): the conversation up to its last user turn, under the generic prompt."""
    from orca2.prompts import generic_prompt

    system = generic_prompt(generic) if generic is not None else None
    out = []
    for count, (line, record) in enumerate(read_numbered(path)):
        if limit is not None and count >= limit:
            break
        messages = record["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        if any(m["role"] == "assistant" for m in messages[:last_user]):
            raise Orca2Error(
                f"{path}:{line}: field 'messages': sample takes single-turn prompts (an assistant turn "
                "comes before the last user message)"
            )
        out.append((record, with_system_prompt(messages[: last_user + 1], system)))
    return out


def run(cfg: SampleConfig) -> dict[str, Any]:
    items = prompts(cfg.tasks, cfg.generic, cfg.limit)
    requests = [
        Request(messages, {**r.get("meta", {}), "answer": r.get("answer"), "task": r["task"]}) for r, messages in items
    ]
    errors: list[Record] = []
    written = 0
    with (
        ask(cfg.student, requests, cfg.sampling, cfg.client, desc=f"sample {cfg.student}") as answers,
        atomic_writer(cfg.output) as sink,
    ):
        for i, (record, messages) in enumerate(items):
            response = answers.response(i)
            if response is None:
                errors.append({**record, "messages": messages, "error": answers.error(i)})
                continue
            for k, content in enumerate(response["contents"]):
                provenance = answers.provenance(i, response, k)
                meta = {
                    **record.get("meta", {}),
                    "prompt_id": record["id"],
                    "author": "student",
                    "sample": k,
                    "student": provenance.pop("model"),
                    **provenance,
                }
                sink.write(
                    {
                        "id": f"{record['id']}#s{k}",
                        "task": record["task"],
                        "messages": messages + [{"role": "assistant", "content": content}],
                        "answer": record.get("answer"),
                        "meta": meta,
                    }
                )
                written += 1
        result = answers.result
        cached = answers.cached_at_start
    errors_path = write_errors(cfg.output, errors)
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    summary = {
        "output": cfg.output,
        "prompts": len(items),
        "samples": written,
        "failed": len(errors),
        "cached_at_start": cached,
        "done_this_run": result.done,
        "seconds": round(result.seconds, 2),
        "completion_tokens_this_run": result.completion_tokens,
        "tokens_per_s": result.completion_tokens / result.seconds if result.seconds else None,
    }
    if errors:
        summary["errors"] = str(errors_path)
    with atomic_text(sidecar(cfg.output, "summary.json")) as f:
        f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    if errors:
        log.warning(
            "%d of %d prompts failed (listed in %s); re-running retries only these",
            len(errors),
            len(items),
            errors_path,
        )
    return summary


def show(s: dict[str, Any], cfg: SampleConfig) -> str:
    """What `orca2 sample` prints; failed prompts stop the command (exit 1)."""
    text = (
        f"{s['samples']} replies to {s['prompts'] - s['failed']}/{s['prompts']} prompts ({s['cached_at_start']} "
        f"from cache, {s['failed']} failed) → {s['output']}"
    )
    if s["failed"]:
        print(text)
        raise Orca2Error(
            f"{s['failed']} prompts failed (listed in {s['errors']}); re-running the same command retries only these"
        )
    return text


STAGE = Stage("sample", SampleConfig, run, show)
