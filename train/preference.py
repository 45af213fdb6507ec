"""What DPO and KTO share: preference records → tokenised sequences → micro-batches, and the reference log-probs.

A sequence is one (prompt, reply) conversation, tokenised with the same exact masks as SFT (train/data.py)
but supervising only the reply y: assistant turns inside a multi-turn prompt are part of x, never of y.
Its log-prob is Σ log p over the reply's tokens and its end-of-turn token; what the template adds after
the end-of-turn token (ChatML's newline) is not scored. A *unit* is what packing places
whole: the sequences whose log-probs one loss term needs together — a DPO record's replies (each reply
computed once however many pairs it is in; a record too long for one row splits into per-pair units),
or a KTO reply. Units pack best-fit-decreasing into rows exactly as SFT examples do, with per-sequence
attention.

Reference log-probs are computed once, before training, by a pass of the reference model (the policy the
stage starts from, or `reference`) over every sequence, and stored beside the data with the hash of
the data they belong to; the model is then freed. The reference is frozen, so this is exact.
`reference_mode: resident` keeps a reference model and computes them each step instead.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orca2.errors import Orca2Error
from orca2.train.data import (
    IGNORE,
    Example,
    MicroBatch,
    check_masks,
    collate_packed,
    collate_padded,
    end_of_turn_ids,
    pack_best_fit_decreasing,
    tokenize_example,
)

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    key: str  # "<record id>/chosen/0", "<record id>/rejected/2", "<record id>/kl/0"
    example: Example


@dataclass
class Unit:
    sequences: list[Sequence]
    pairs: list[tuple[int, int]] = field(default_factory=list)  # DPO: (chosen, rejected) positions in `sequences`
    labels: list[bool] = field(default_factory=list)  # KTO: desirable?
    kl: list[Sequence] = field(default_factory=list)  # KTO: each sequence's prompt with another prompt's reply

    @property
    def length(self) -> int:
        return sum(len(s.example.input_ids) for s in self.sequences)


@dataclass
class SequenceBatch:
    """Rows of sequences and, per supervised position, which sequence it belongs to."""

    rows: MicroBatch
    seq_ids: torch.Tensor  # [supervised positions] → sequence index in this batch
    keys: list[str]
    supervised: torch.Tensor  # [n_seq] supervised tokens of each sequence
    ref: torch.Tensor | None = None  # [n_seq] reference log-probs (float64), attached before the step

    @property
    def n_seq(self) -> int:
        return len(self.keys)

    def to(self, device: Any) -> SequenceBatch:
        ref = self.ref.to(device) if self.ref is not None else None
        return SequenceBatch(self.rows.to(device), self.seq_ids.to(device), self.keys, self.supervised.to(device), ref)


@dataclass
class PreferenceBatch:
    main: SequenceBatch
    pairs: torch.Tensor  # [P, 2] (chosen, rejected) sequence indices
    labels: torch.Tensor  # [n_seq] bool, KTO
    kl: SequenceBatch | None  # KTO's mismatched sequences, one per main sequence
    tokens: int
    capacity: int

    def to(self, device: Any) -> PreferenceBatch:
        return replace(
            self,
            main=self.main.to(device),
            pairs=self.pairs.to(device),
            labels=self.labels.to(device),
            kl=self.kl.to(device) if self.kl is not None else None,
        )


def collate_sequences(sequences: list[Sequence], packing: bool, capacity: int, pad_id: int) -> SequenceBatch:
    examples = [s.example for s in sequences]
    if packing:
        rows = collate_packed(examples, capacity)
        bounds = rows.segments
        seq_ids = [bisect.bisect_right(bounds, int(p) + 1) - 1 for p in rows.index]
    else:
        rows = collate_padded(examples, pad_id)
        width = rows.labels.shape[1] - 1
        seq_ids = [int(p) // width for p in rows.index]
    ids = torch.tensor(seq_ids, dtype=torch.long)
    supervised = torch.bincount(ids, minlength=len(sequences))
    return SequenceBatch(rows, ids, [s.key for s in sequences], supervised)


def collate_units(units: list[Unit], packing: bool, capacity: int, pad_id: int) -> PreferenceBatch:
    sequences: list[Sequence] = []
    pairs: list[tuple[int, int]] = []
    labels: list[bool] = []
    kl: list[Sequence] = []
    for unit in units:
        offset = len(sequences)
        sequences += unit.sequences
        pairs += [(offset + c, offset + r) for c, r in unit.pairs]
        labels += unit.labels
        kl += unit.kl
    main = collate_sequences(sequences, packing, capacity, pad_id)
    return PreferenceBatch(
        main,
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        torch.tensor(labels, dtype=torch.bool),
        collate_sequences(kl, packing, 0, pad_id) if kl else None,
        main.rows.tokens,
        main.rows.capacity,
    )


def empty_batch(pad_id: int) -> PreferenceBatch:
    """A filler micro-batch: no sequence, no pair, no loss — but rows to run forward passes on, since under ZeRO-3
    every rank must run the same forwards (its parameters are gathered collectively)."""
    empty = Sequence("empty", Example("empty", [pad_id, pad_id], [IGNORE, IGNORE]))
    batch = collate_units([Unit([empty], kl=[empty])], True, 0, pad_id)
    for part in (batch.main, batch.kl):
        part.keys = []
        part.supervised = torch.zeros(0, dtype=torch.long)
    batch.tokens = 0
    return batch


def make_batches(
    units: list[Unit], *, max_len: int, micro_batch_size: int, packing: bool, pad_id: int, seed: int, epoch: int
) -> list[PreferenceBatch]:
    """One epoch of micro-batches shuffled by (seed, epoch): packed bins of whole units, or micro_batch_size units
    padded."""
    rng = random.Random(f"{seed}:{epoch}")
    if packing:
        bins = pack_best_fit_decreasing([u.length for u in units], max_len)
        rng.shuffle(bins)
        groups = [bins[i : i + micro_batch_size] for i in range(0, len(bins), micro_batch_size)]
        return [collate_units([units[i] for b in g for i in b], True, max_len * len(g), pad_id) for g in groups]
    order = list(range(len(units)))
    rng.shuffle(order)
    return [
        collate_units([units[i] for i in order[j : j + micro_batch_size]], False, 0, pad_id)
        for j in range(0, len(order), micro_batch_size)
    ]


# --- records → sequences ----------------------------------------------------------------------------


class Tokenised:
    """Tokenises (prompt, reply) sequences for one stage and applies the over-long policy (counted)."""

    def __init__(self, tokenizer: Any, max_len: int, overlong: str):
        self.tokenizer = tokenizer
        self.eot = end_of_turn_ids(tokenizer)
        self.max_len = max_len
        self.overlong = overlong
        self.checked: list[tuple[Example, dict[str, Any]]] = []

    def sequence(
        self,
        key: str,
        where: str,
        record: dict[str, Any],
        reply: str,
        overlong: str | None = None,
        partial: bool = False,
    ) -> Sequence | None:
        """The tokenised conversation, truncated to max_len (overlong: truncate) or None (drop).

        A partial reply (the start of a turn) ends with its own last token: the end-of-turn token and what
        the template adds after it are cut off, so neither is trained nor scored."""
        overlong = overlong or self.overlong
        messages = record["messages"] + [{"role": "assistant", "content": reply}]
        example = tokenize_example(where, messages, self.tokenizer, self.eot, last_only=True)
        if partial:
            end = max(i for i, y in enumerate(example.labels) if y != IGNORE)
            if example.labels[end] in self.eot:
                example = Example(example.id, example.input_ids[:end], example.labels[:end])
        if len(example.input_ids) > self.max_len:
            if overlong == "drop":
                return None
            first = next(i for i, y in enumerate(example.labels) if y != IGNORE)
            if first >= self.max_len:
                raise Orca2Error(
                    f"{where}: max_len {self.max_len} is smaller than the prompt of record {record['id']!r} "
                    f"({first} tokens before the reply)"
                )
            example = Example(example.id, example.input_ids[: self.max_len], example.labels[: self.max_len])
        elif len(self.checked) < 64:
            self.checked.append((example, {"messages": messages[-1:]}))  # only the reply is supervised
        return Sequence(key, example)

    def check_masks(self, count: int, seed: int) -> None:
        if count and self.checked:
            picks = random.Random(seed).sample(self.checked, min(count, len(self.checked)))
            check_masks([e for e, _ in picks], [r for _, r in picks], self.tokenizer, self.eot)


def dpo_units(
    records: list[tuple[str, dict[str, Any]]], tok: Tokenised, packing: bool
) -> tuple[list[Unit], dict[str, int]]:
    """Units of DPO pairs; counts: records, pairs read / kept / dropped by reason."""
    from orca2.records import preference_pairs

    counts = {
        "records": 0,
        "pairs_read": 0,
        "pairs_kept": 0,
        "pairs_dropped_too_long": 0,
        "pairs_dropped_row_too_short": 0,
    }
    units = []
    for where, record in records:
        counts["records"] += 1
        if not record.get("chosen") or not record.get("rejected"):
            side = "rejected" if record.get("chosen") else "chosen"
            raise Orca2Error(
                f"{where}: field '{side}': record {record['id']!r} has no {side} reply, so it has no DPO pair "
                "(train replies without pairs with --objective kto)"
            )
        pairs = preference_pairs(record)
        counts["pairs_read"] += len(pairs)
        seqs = {}
        for side in ("chosen", "rejected"):
            for i, reply in enumerate(record[side]):
                seqs[(side, i)] = tok.sequence(
                    f"{record['id']}/{side}/{i}", where, record, reply["content"], partial=reply.get("partial", False)
                )
        kept = [(c, r) for c, r in pairs if seqs[("chosen", c)] is not None and seqs[("rejected", r)] is not None]
        counts["pairs_dropped_too_long"] += len(pairs) - len(kept)
        if not kept:
            continue
        used = sorted({("chosen", c) for c, _ in kept} | {("rejected", r) for _, r in kept})
        whole = Unit(
            [seqs[k] for k in used], [(used.index(("chosen", c)), used.index(("rejected", r))) for c, r in kept]
        )
        if not packing or whole.length <= tok.max_len:
            units.append(whole)
            counts["pairs_kept"] += len(kept)
            continue
        for c, r in kept:  # too long for one row together: a unit per pair (its two replies share a row)
            unit = Unit([seqs[("chosen", c)], seqs[("rejected", r)]], [(0, 1)])
            if unit.length > tok.max_len:
                counts["pairs_dropped_row_too_short"] += 1
                continue
            units.append(unit)
            counts["pairs_kept"] += 1
    if not units:
        raise Orca2Error(f"no trainable DPO pairs: {counts}")
    return units, counts


def kto_units(
    records: list[tuple[str, dict[str, Any]]], tok: Tokenised, seed: int
) -> tuple[list[Unit], dict[str, int]]:
    """One unit per reply, with its KL sequence: its prompt with the reply of another prompt (seeded, fixed for the
    run, so the reference point's estimate does not depend on how steps are split over micro-batches and ranks)."""
    counts = {"records": 0, "replies_read": 0, "desirable": 0, "undesirable": 0, "replies_dropped_too_long": 0}
    kept: list[tuple[str, dict[str, Any], Sequence, bool, str]] = []
    for where, record in records:
        counts["records"] += 1
        for side, label in (("chosen", True), ("rejected", False)):
            for i, reply in enumerate(record.get(side, [])):
                counts["replies_read"] += 1
                seq = tok.sequence(
                    f"{record['id']}/{side}/{i}", where, record, reply["content"], partial=reply.get("partial", False)
                )
                if seq is None:
                    counts["replies_dropped_too_long"] += 1
                    continue
                kept.append((where, record, seq, label, reply["content"]))
                counts["desirable" if label else "undesirable"] += 1
    if len({r["id"] for _, r, _, _, _ in kept}) < 2:
        raise Orca2Error(
            "KTO needs replies to at least two prompts (its KL reference point pairs each prompt with "
            f"another prompt's reply); got {counts}"
        )
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    units = []
    for pos, i in enumerate(order):
        where, record, seq, label, _ = kept[i]
        step = 1
        while kept[order[(pos + step) % len(order)]][1]["id"] == record["id"]:
            step += 1
        partner = kept[order[(pos + step) % len(order)]]
        # a mismatched pair longer than a row is truncated to fit (it only estimates the reference point)
        kl = tok.sequence(f"{seq.key}/kl", where, record, partner[4], overlong="truncate")
        units.append(Unit([seq], labels=[label], kl=[kl]))
    return units, counts


# --- reference log-probs -------------------------------------------------------------------------------


def data_hash(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sequence_logprobs_of(
    lm: Any, sequences: list[Sequence], max_len: int, pad_id: int, device: Any, desc: str = ""
) -> dict[str, float]:
    """Σ log p of each sequence under `lm` (a CausalLMLoss), no gradient, sequences packed into rows of max_len."""
    from tqdm import tqdm

    unique = list({s.key: s for s in sequences}.values())
    bins = pack_best_fit_decreasing(
        [len(s.example.input_ids) for s in unique],
        max(max_len, max((len(s.example.input_ids) for s in unique), default=1)),
    )
    out: dict[str, float] = {}
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for b in tqdm(bins, desc=desc or "reference log-probs", unit="row", disable=not desc, dynamic_ncols=True):
            batch = collate_sequences([unique[i] for i in b], True, max_len, pad_id).to(device)
            logps = lm.sequence_logprobs(batch.rows, batch.seq_ids, batch.n_seq)
            out.update(zip(batch.keys, logps.double().cpu().tolist()))
    lm.train(was_training)
    return out


def check_same_tokenizer(policy: Any, reference: Any, spec: str) -> None:
    if policy.get_vocab() != reference.get_vocab():
        a, b = policy.get_vocab(), reference.get_vocab()
        differ = sorted(set(a.items()) ^ set(b.items()))[:2]
        raise Orca2Error(
            f"reference {spec}: its tokenizer differs from the policy's ({len(a)} vs {len(b)} tokens; "
            f"e.g. {differ}); log-probs of the same token ids would mean different text"
        )


REFERENCE_HEADER = "orca2_reference_logps"  # the key of a stored file's first line (whose reference, settings, data)


def _stored_header(f: Any) -> dict[str, Any]:
    return json.loads(f.readline() or "{}").get(REFERENCE_HEADER, {})


def _store_path(data: str, key: str) -> Path:
    """Where reference log-probs of `data` under `key` are stored by default (key "*": a glob of them all)."""
    from orca2.io import sidecar

    return sidecar(data, f"reference-{key}.jsonl")


def drop_stale_reference_logps(data: str) -> list[Path]:
    """Delete the reference log-probs stored beside `data` (their default place) for other contents of it: for a
    caller that rebuilds its own data file (a round's pairs), where a stale store is no mistake to report."""
    current = data_hash((data,))
    pattern = _store_path(data, "*")
    dropped = []
    for stored in sorted(pattern.parent.glob(pattern.name)):
        with open(stored) as f:
            stale = _stored_header(f).get("data_sha256") != current
        if stale:
            log.info("deleting %s: reference log-probs of earlier contents of %s", stored, data)
            stored.unlink()
            dropped.append(stored)
    return dropped


class Reference:
    """Reference log-probs for a stage: precomputed once (stored beside the data) or from a resident model."""

    def __init__(
        self,
        cfg: Any,
        stage: Any,
        policy: Any,
        tokenizer: Any,
        model_spec: str,
        sequences: list[Sequence],
        rank: int,
        world: int,
        device: Any,
    ):
        from orca2.train.model import CausalLMLoss

        self.cfg = cfg
        self.spec = cfg.reference or model_spec
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = device
        self.values: dict[str, float] = {}
        self.resident = None
        self.seconds = 0.0  # the reference pass's wall-clock (0 when read from the store or resident)
        settings = {
            "max_len": cfg.max_len,
            "overlong": cfg.overlong,
            "chat_template": cfg.chat_template,
            "objective": cfg.objective,
            "seed": cfg.seed,
        }
        from orca2.models import model_fingerprint

        self.header = {
            "reference": self.spec,
            "fingerprint": model_fingerprint(self.spec),
            "settings": settings,
            "data": list(stage.data),
            "data_sha256": data_hash(stage.data),
        }
        if cfg.reference_mode == "resident":  # a frozen copy (of the starting policy, by default) kept on the device
            model = self._load(tokenizer)
            self.resident = CausalLMLoss(model.to(device).eval().requires_grad_(False), cfg.loss_impl)
            return
        self.path = self._path(stage, settings)
        if self.path.exists():
            self.values = self._read(sequences)
            return
        # The pass runs the whole reference on this rank's device (also under ZeRO-3, before it partitions the policy).
        start = time.perf_counter()
        model = self._load(tokenizer) if cfg.reference is not None else policy
        lm = CausalLMLoss(model.to(device), cfg.loss_impl)
        mine = sequences[rank::world]
        values = sequence_logprobs_of(
            lm, mine, cfg.max_len, self.pad_id, device, desc="reference log-probs" if rank == 0 else ""
        )
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, values)
            values = {k: v for part in gathered for k, v in part.items()}
        self.values = values
        self.seconds = time.perf_counter() - start
        if rank == 0:
            self._write(values)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        del lm, model  # a separate reference is freed before training starts
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, tokenizer: Any) -> Any:
        from orca2.train.model import load_student, use_chatml

        model, ref_tokenizer = load_student(self.spec)
        if self.cfg.chat_template == "chatml":
            use_chatml(model, ref_tokenizer)
        check_same_tokenizer(tokenizer, ref_tokenizer, self.spec)
        if self.cfg.packing:
            from orca2.train.attention import register

            model.set_attn_implementation(register(self.cfg.attention))
        return model

    def _path(self, stage: Any, settings: dict[str, Any]) -> Path:
        if self.cfg.reference_logps:
            return Path(self.cfg.reference_logps)
        key = hashlib.sha256(json.dumps([self.header["fingerprint"], settings], sort_keys=True).encode()).hexdigest()[
            :12
        ]
        return _store_path(stage.data[0], key)

    def _read(self, sequences: list[Sequence]) -> dict[str, float]:
        with open(self.path) as f:
            header = _stored_header(f)
            values = {row["key"]: row["logp"] for row in map(json.loads, f)}
        if header.get("data_sha256") != self.header["data_sha256"]:
            raise Orca2Error(
                f"{self.path}: stored reference log-probs belong to other data (sha256 "
                f"{str(header.get('data_sha256'))[:12]}…, the data is now {self.header['data_sha256'][:12]}…); "
                "delete the file to recompute them"
            )
        if header.get("fingerprint") != self.header["fingerprint"] or header.get("settings") != self.header["settings"]:
            raise Orca2Error(
                f"{self.path}: stored reference log-probs were computed by another reference model or with "
                "other tokenisation settings; delete the file to recompute them"
            )
        missing = [s.key for s in sequences if s.key not in values]
        if missing:
            raise Orca2Error(
                f"{self.path}: no stored reference log-prob for {len(missing)} sequences (e.g. {missing[0]}); "
                "delete the file to recompute them"
            )
        return values

    def _write(self, values: dict[str, float]) -> None:
        from orca2.io import atomic_text

        with atomic_text(self.path) as f:
            f.write(json.dumps({REFERENCE_HEADER: self.header}) + "\n")
            for key, value in values.items():
                f.write(json.dumps({"key": key, "logp": value}) + "\n")
        log.info("reference log-probs of %d sequences stored in %s", len(values), self.path)

    def attach(self, batch: SequenceBatch) -> None:
        """Fill batch.ref: from the stored values, or a no-grad pass of the resident model."""
        if self.resident is not None:
            with torch.no_grad():
                rows = batch.rows.to(self.device)
                batch.ref = self.resident.sequence_logprobs(rows, batch.seq_ids.to(self.device), batch.n_seq).double()
            return
        batch.ref = torch.tensor([self.values[k] for k in batch.keys], dtype=torch.float64)


class PreferenceRecipe:
    """What the DPO and KTO recipes share: tokenised units, the mask check, reference log-probs, micro-batches."""

    def __init__(
        self,
        cfg: Any,
        stage: Any,
        model: Any,
        tokenizer: Any,
        records: list[tuple[str, dict[str, Any]]],
        *,
        model_spec: str,
        rank: int,
        world: int,
        device: Any,
    ):
        self.cfg = cfg
        tok = Tokenised(tokenizer, cfg.max_len, cfg.overlong)
        self.units, self.counts = self.make_units(records, tok)
        tok.check_masks(cfg.mask_check, cfg.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sequences = list({s.key: s for u in self.units for s in u.sequences + u.kl}.values())
        self.reference = Reference(cfg, stage, model, tokenizer, model_spec, sequences, rank, world, device)

    def make_units(
        self, records: list[tuple[str, dict[str, Any]]], tok: Tokenised
    ) -> tuple[list[Unit], dict[str, int]]:
        raise NotImplementedError

    def batches(self, epoch: int) -> list[PreferenceBatch]:
        return make_batches(
            self.units,
            max_len=self.cfg.max_len,
            micro_batch_size=self.cfg.micro_batch_size,
            packing=self.cfg.packing,
            pad_id=self.pad_id,
            seed=self.cfg.seed,
            epoch=epoch,
        )

    def empty(self) -> PreferenceBatch:
        return empty_batch(self.pad_id)
