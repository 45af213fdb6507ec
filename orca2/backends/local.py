"""`local:PATH|default`: a transformers model in this process, decoded by the continuous-batching engine
(orca2.engine): chat template → token ids → the engine → responses. A request with a format (orca2.structured) is
decoded under its grammar (orca2.constrain)."""

from __future__ import annotations

import time
from typing import Any

from orca2.engine import Engine, Job, stop_token_ids
from orca2.errors import Orca2Error
from orca2.models import ClientConfig, Response, Sampling, check_local_model, load_local_model, resolve_dtype

_GRAMMARS: dict[tuple[str, int, tuple[int, ...]], Any] = {}  # (model, vocab, stop ids) → its compiled formats


class LocalBackend:
    """A local model behind `ask`: chat template → token ids → the engine → responses."""

    def __init__(self, target: str, client: ClientConfig | None = None):
        client = client or ClientConfig()
        check_local_model(target)
        import torch

        device = client.device if client.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_local_model(target, device, resolve_dtype(client.dtype, device), engine=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise Orca2Error(f"{target}: the tokenizer has no chat template, so it cannot take chat messages")
        self.spec = f"local:{target}"
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.engine = Engine(self.model, self.stop_ids, slots=client.batch_size)

    def grammar(self, fmt: dict[str, Any] | None) -> Any:
        """A request's format compiled for this model's tokenizer (once per format), or None without one."""
        if not fmt:
            return None
        if self.engine.grammars is None:  # one per tokenizer in this process: a format compiles once, not per ask
            from orca2.constrain import Grammars

            key = (self.spec, self.model.config.vocab_size, tuple(self.stop_ids))
            if key not in _GRAMMARS:
                _GRAMMARS[key] = Grammars(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
            self.engine.grammars = _GRAMMARS[key]
        return self.engine.grammars.compile(fmt)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_all(self, pending: list[tuple[str, Any]], sampling: Sampling, sink: Any) -> None:
        jobs = [
            Job(
                key,
                self.encode(request.messages),
                sampling.n,
                sampling.max_tokens,
                sampling.temperature,
                sampling.top_p,
                sampling.seed,
                grammar=self.grammar(request.format),
            )
            for key, request in pending
        ]

        def done(job: Job) -> None:
            contents, reasons, completion = [], [], 0
            for k in range(job.n):
                tokens, reason = job.outputs[k]
                completion += len(tokens)
                text_tokens = tokens[:-1] if reason == "stop" else tokens
                contents.append(self.tokenizer.decode(text_tokens, skip_special_tokens=True).strip())
                reasons.append(reason)
            sink.done(
                job.key,
                Response(
                    contents,
                    reasons,
                    len(job.prompt),
                    completion,
                    round(time.perf_counter() - job.started_at, 4),
                    model=self.spec,
                ),
            )

        self.engine.run(jobs, done, lambda job, reason: sink.failed(job.key, reason))
