"""The student: loading (HF folder, hub name, GGUF, the built-in SmolLM2), ChatML setup, and the loss wrapper."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orca2.errors import Orca2Error
from orca2.train.data import CHATML_TEMPLATE, IGNORE, MicroBatch

_SHARED: dict[tuple[str, Any], tuple[Any, Any]] | None = None  # while `shared_students` is active: spec → loaded base


@contextlib.contextmanager
def shared_students() -> Iterator[None]:
    """While active, `load_student` loads each student once and hands every caller its own copy: many short
    trainings of one base (select's probes) share one load instead of dequantising the weights each time."""
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


def load_student(spec: str, dtype: torch.dtype = torch.float32, share: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) from 'local:default' (SmolLM2-135M-Instruct, dequantised), a .gguf file, an HF folder or a hub
    name; inside `shared_students` (unless share=False: a model loaded once, as a probe's own weights) one load each."""
    if _SHARED is not None and share:
        if (spec, dtype) not in _SHARED:
            _SHARED[(spec, dtype)] = _load_student(spec, dtype)
        model, tokenizer = _SHARED[(spec, dtype)]
        return copy.deepcopy(model).train(), copy.deepcopy(tokenizer)
    return _load_student(spec, dtype)


def _load_student(spec: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orca2.models import check_student, load_local_model, parse_model

    check_student(spec)
    target = parse_model(spec, paths=True).target
    if target == "default" or Path(target).exists():
        model, tokenizer = load_local_model(target, "cpu", dtype)
        return model.train(), tokenizer
    try:  # an HF hub name: works when online or already in the local HF cache
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise Orca2Error(
            f"model '{spec}': cannot load from the hub or cache ({str(exc).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def use_chatml(model: Any, tokenizer: Any) -> int:
    """Give the tokenizer ChatML with <|im_start|>/<|im_end|> as added special tokens (as Orca 2 did); resize
    embeddings."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return added


def head_transform(model: Any) -> tuple[float, float | None]:
    """(logit multiplier, softcap) that a model's forward applies after lm_head, from its config.

    Cohere multiplies logits by `logit_scale`, Granite divides them by `logits_scaling`, Gemma 2/3 cap
    them with `final_logit_softcapping`; Llama, Mistral, Qwen2/3, Phi-3, OLMo and SmolLM apply nothing.
    A multiplier c is folded into the hidden states ((c h) W^T = c (h W^T)), a cap goes to the loss.
    """
    config = model.config
    multiplier = 1.0
    if getattr(config, "logit_scale", None) is not None:
        multiplier *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        multiplier /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return multiplier, (float(softcap) if softcap else None)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so one forward returns Σ cross-entropy over the batch's supervised tokens.

    loss_impl 'fused' computes hidden states only and calls fused_linear_cross_entropy on the supervised
    rows: the (tokens × vocabulary) logits never exist. What the model does to logits after lm_head
    (a scale, a softcap; see head_transform) is applied the same way. Under ZeRO-3 the lm_head weight is
    registered as an external parameter of this module, so DeepSpeed gathers it for forward and backward
    and its gradient flows through autograd (DeepSpeed's hooks fire).
    """

    def __init__(self, model: Any, loss_impl: str = "naive"):
        super().__init__()
        if loss_impl not in ("naive", "fused"):
            raise Orca2Error(f"loss_impl must be naive or fused, got {loss_impl!r}")
        self.model = model
        self.loss_impl = loss_impl
        if loss_impl == "fused":
            head = model.get_output_embeddings()
            base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
            if head is None or base is None or not isinstance(head, nn.Linear):
                raise Orca2Error(
                    f"loss_impl fused needs a causal LM with a base model and a linear lm_head "
                    f"(Llama, Mistral, Qwen2, Gemma, ...); {type(model).__name__} has not: use loss_impl naive"
                )
            self._base = base
            self._head = head
            self._multiplier, self._softcap = head_transform(model)
            try:
                from deepspeed.zero import register_external_parameter

                register_external_parameter(self, head.weight)
            except ImportError:  # DeepSpeed absent: nothing to coordinate
                pass

    def sequence_logprobs(self, batch: MicroBatch, seq_ids: torch.Tensor, n_seq: int) -> torch.Tensor:
        """Σ log p of each sequence's supervised tokens ([n_seq], fp32): the policy and reference passes of DPO/KTO.

        seq_ids names the sequence of each supervised position (batch.index order). naive: the model's
        logits, log_softmax, gather; fused: from hidden states, no logits (train/fused_ce.py)."""
        kwargs = batch.model_kwargs()
        labels = batch.labels[:, 1:].reshape(-1)
        index = batch.index
        if self.loss_impl == "naive":
            logits = self.model(**kwargs).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()
            token = logits.log_softmax(-1).gather(1, labels.index_select(0, index)[:, None]).squeeze(1)
            return torch.zeros(n_seq, dtype=token.dtype, device=token.device).index_add(0, seq_ids, token)
        from orca2.train.fused_ce import fused_sequence_logprobs

        hidden = self._base(**kwargs).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self._multiplier != 1.0:
            hidden = hidden * self._multiplier
        return fused_sequence_logprobs(
            hidden,
            self._head.weight,
            labels,
            seq_ids,
            n_seq,
            index=index,
            bias=self._head.bias,
            softcap=self._softcap,
            validate=False,
        )

    def forward(self, batch: MicroBatch) -> torch.Tensor:
        kwargs = batch.model_kwargs()
        labels = batch.labels[:, 1:].reshape(-1)
        if self.loss_impl == "naive":
            logits = self.model(**kwargs).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        from orca2.train.fused_ce import fused_linear_cross_entropy

        hidden = self._base(**kwargs).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self._multiplier != 1.0:
            hidden = hidden * self._multiplier
        index = batch.index  # supervised rows, found by the collator on the host: no device sync here
        if index.numel() == 0:
            return hidden.sum() * 0.0  # keeps the graph (and ZeRO's hooks) alive for an all-masked micro-batch
        return fused_linear_cross_entropy(
            hidden, self._head.weight, labels, index=index, bias=self._head.bias, softcap=self._softcap, validate=False
        )
