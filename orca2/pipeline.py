"""Stage `run`: the whole chain from one config —
(instruct) → tasks → (select) → generate → erase → train → eval → (iterate).

Every stage writes into one run folder and is recorded in <output>/manifest.json: its resolved config,
the hashes of its inputs and outputs, seconds, record counts, package versions and the seed. Re-running
skips a stage whose config and inputs are unchanged and whose outputs are still as it left them;
`--from STAGE` redoes that stage and the rest. A failure names the stage and keeps earlier outputs.
Each section of the config has exactly the keys of that stage's own config, minus the paths the
pipeline wires (instruct → tasks → generate → erase → train → eval): `instruct:` makes task records from
documents with an agent flow, and the tasks stage reads them beside its own sources.

`iterate:` adds rounds of on-policy preference learning after eval (Orca-Math, DNO): round t takes a fresh
partition of the run's tasks, lets π_{t-1} sample (orca2 sample), judges the replies against gold or the
teacher's traces (orca2 judge), builds pairs with replay of earlier rounds (orca2 pairs), trains π_t with
DPO or KTO against the reference (π_{t-1} by default, as DNO does) and evaluates it like the student.
Each step of each round is a manifest entry of its own (config hash, inputs, outputs), so a killed run
resumes inside the round it was in; the best round on the eval report is linked as iterate/best.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from orca2.config import _deep_update, _set_dotted, build_section, config_to_dict, option, parse_override, read_yaml
from orca2.errors import Orca2Error
from orca2.io import atomic_text

log = logging.getLogger(__name__)
STAGES = ("instruct", "tasks", "select", "generate", "erase", "persona", "train", "eval", "iterate")
ROUND_STEPS = ("sample", "judge", "pairs", "train", "eval")
CONTROL_STEPS = ("control", "control_eval")  # iterate.control: equal-compute SFT on the round's teacher traces


@dataclasses.dataclass(frozen=True)
class IterateConfig:
    rounds: int = option(2, "Rounds of sample → judge → pairs → train → eval.")
    recipe: str = option("orca-math", "The pairs rule: orca-math | dno.")
    objective: str = option("kto", "dpo | kto.")
    prompts_per_round: int | None = option(
        None, "A fresh partition of the run's tasks each round (null: all tasks, every round)."
    )
    partitions: int | None = option(
        None,
        "Or: the tasks split into this many near-equal partitions, round t takes partition (t-1) mod N "
        "(DNO: 3 partitions, 6 rounds).",
    )
    reference: str = option("previous", "previous: π_{t-1} (DNO); initial: the SFT student every round.")
    fresh_prompts: bool = option(
        False,
        "The rounds' prompts are kept out of the SFT start (it trains on the other tasks), so each round meets "
        "prompts new to the policy, as DNO's did.",
    )
    serve: str | None = option(
        None,
        "Serve π_t for sampling: a command with {model}, {port}, {name}, "
        'e.g. "vllm serve {model} --port {port} --served-model-name {name}".',
    )
    served_name: str = option(
        "student", "Prefix of the name the server answers to ({name} = prefix + π_t's fingerprint)."
    )
    serve_timeout: float = option(900.0, "Seconds to wait for the server to answer.")
    sample: dict[str, Any] = option(help="orca2 sample keys (student and paths wired).", factory=dict)
    judge: dict[str, Any] = option(help="orca2 judge keys.", factory=dict)
    pairs: dict[str, Any] = option(help="orca2 pairs keys (replay wired from earlier rounds).", factory=dict)
    train: dict[str, Any] = option(help="Keys over the train section's (lr, epochs, beta, ...).", factory=dict)
    control: bool = option(
        False,
        "An equal-compute control: each round, SFT of the previous control on the round's teacher traces for as "
        "many optimizer steps as the round's preference training, with its learning rate and schedule.",
    )
    control_train: dict[str, Any] = option(
        help="Keys over those (train section, then iterate.train less the preference keys).", factory=dict
    )

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.recipe not in ("orca-math", "dno") or self.objective not in ("dpo", "kto"):
            raise Orca2Error("iterate: rounds >= 1, recipe orca-math|dno and objective dpo|kto required")
        if self.partitions is not None and (self.partitions < 1 or self.prompts_per_round is not None):
            raise Orca2Error("iterate: give prompts_per_round or partitions (>= 1), not both")
        if self.reference not in ("previous", "initial"):
            raise Orca2Error(f"iterate.reference must be previous or initial, got {self.reference!r}")
        if self.fresh_prompts and not self.prompts_per_round:
            raise Orca2Error(
                "iterate.fresh_prompts needs prompts_per_round (the rounds' prompts, set aside before the SFT start)"
            )


TOP_KEYS = ("output", "stages", "seed", "assignment", "heldout", *STAGES)


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative paths and contents; logs and checkpoints excluded)."""
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(
            p for p in path.rglob("*") if p.is_file() and "checkpoints" not in p.parts and "tensorboard" not in p.parts
        ):
            h.update(str(child.relative_to(path)).encode())
            h.update(file_hash(child).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("orca2", "torch", "transformers", "deepspeed", "openai", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class Pipeline:
    """Resolves the stage configs from one YAML and runs them in order with the manifest's bookkeeping."""

    def __init__(self, path: str, overrides: tuple[str, ...] = (), output: str | None = None):
        data, lines = read_yaml(path)
        if not isinstance(data, dict):
            raise Orca2Error(f"{path}:1: a pipeline config maps sections to settings")
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(data, key, value)
        if output:
            data["output"] = output
        for key in data:
            if key not in TOP_KEYS:
                raise Orca2Error(f"{path}:{lines.get(key, 1)}: unknown key '{key}' (valid: {', '.join(TOP_KEYS)})")
        self.source, self.lines, self.data = str(path), lines, data
        if "output" not in data:
            raise Orca2Error(f"{path}: missing required key 'output' (the run folder)")
        self.run_dir = Path(data["output"])
        self.seed = int(data.get("seed", 0))
        default = (
            (("instruct",) if "instruct" in data else ())
            + ("tasks", "generate", "erase", "train", "eval")
            + (("iterate",) if "iterate" in data else ())
        )
        if "persona" in data:  # role-play: the persona chain makes the training data and the eval set
            default = ("persona", "train", "eval")
        self.stages = tuple(data.get("stages") or default)
        for name in self.stages:
            if name not in STAGES:
                raise Orca2Error(
                    f"{path}:{lines.get('stages', 1)}: unknown stage '{name}' (valid: {', '.join(STAGES)})"
                )
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order):
            raise Orca2Error(f"{path}: stages must keep the order {' → '.join(STAGES)}")
        self.paths = {
            "instruct": self.run_dir / "instruct.jsonl",
            "tasks": self.run_dir / "tasks.jsonl",
            "assignment": self.run_dir / "assignment.yaml",
            "traces": self.run_dir / "traces.jsonl",
            "sft": self.run_dir / "sft.jsonl",
            "sft_start": self.run_dir / "sft.start.jsonl",
            "student": self.run_dir / "student",
            "eval": self.run_dir / "eval",
            "heldout": self.run_dir / "heldout.jsonl",
            "cache": self.run_dir / "cache",
            "persona": self.run_dir / "persona",
        }
        if "iterate" in self.stages and not {"train", "eval"} <= set(self.stages):
            raise Orca2Error(f"{path}: iterate needs the train and eval stages before it")
        self.configs = {name: self._stage_config(name) for name in self.stages}  # every error before any work

    def _section(self, name: str, wired: dict[str, Any]) -> tuple[dict[str, Any], str]:
        section = dict(self.data.get(name) or {})
        for key in wired:
            if key in section:
                raise Orca2Error(
                    f"{self.source}:{self.lines.get(f'{name}.{key}', 1)}: key '{name}.{key}' is set by the "
                    "pipeline (stages are wired through the run folder)"
                )
        _deep_update(section, wired)
        return section, f"{name}."

    def _build(self, cls: type, section: dict[str, Any], prefix: str) -> Any:
        """A section's config, with the one seed rule: the run's seed is the default of every `seed` a section's
        config has — its own and its sampling's (so a rerun draws the same samples) — unless the section sets it."""
        from orca2.flags import seed_keys  # the rule `orca2 STAGE --seed` follows too

        for key in seed_keys(cls):
            part, _, inner = key.rpartition(".")
            if part:
                section[part] = {inner: self.seed, **(section.get(part) or {})}
            else:
                section.setdefault(inner, self.seed)
        return build_section(cls, section, self.source, self.lines, prefix)

    def _stage_config(self, name: str) -> Any:
        cache = {"cache_dir": str(self.paths["cache"])}
        if name == "instruct":
            from orca2.stages.instruct import InstructConfig

            section, prefix = self._section(name, {"output": str(self.paths["instruct"])})
            section["client"] = {**cache, **section.get("client", {})}
            return self._build(InstructConfig, section, prefix)
        if name == "tasks":
            from orca2.stages.tasks import TasksConfig

            section, prefix = self._section(name, {"output": str(self.paths["tasks"])})
            if "instruct" in self.stages:  # the flow's task records join the tasks' own sources
                section["sources"] = [*(section.get("sources") or ()), f"jsonl:{self.paths['instruct']}"]
            return self._build(TasksConfig, section, prefix)
        if name == "select":
            from orca2.stages.select import SelectConfig

            section, prefix = self._section(
                name, {"tasks": str(self.paths["tasks"]), "output": str(self.paths["assignment"])}
            )
            section["client"] = {**cache, **section.get("client", {})}
            return self._build(SelectConfig, section, prefix)
        if name == "generate":
            from orca2.stages.generate import GenerateConfig

            wired: dict[str, Any] = {"tasks": str(self.paths["tasks"]), "output": str(self.paths["traces"])}
            if "select" in self.stages or "assignment" in self.data:
                wired["assign"] = str(self.paths["assignment"])
            section, prefix = self._section(name, wired)
            section["client"] = {**cache, **section.get("client", {})}
            return self._build(GenerateConfig, section, prefix)
        if name == "erase":
            from orca2.stages.erase import EraseConfig

            section, prefix = self._section(
                name, {"input": str(self.paths["traces"]), "output": str(self.paths["sft"])}
            )
            return self._build(EraseConfig, section, prefix)
        if name == "persona":
            return self._persona_configs()
        if name == "train":
            from orca2.models import check_student
            from orca2.train.trainer import TrainConfig

            data = self.paths["persona"] / "pcip.jsonl" if "persona" in self.stages else self._sft_data()
            section, prefix = self._section(name, {"data": (str(data),), "output": str(self.paths["student"])})
            cfg = self._build(TrainConfig, section, prefix)
            try:
                check_student(cfg.model)
            except Orca2Error as exc:
                raise Orca2Error(f"{self.source}:{self.lines.get('train.model', 1)}: train.model: {exc}") from None
            return cfg
        if name == "iterate":
            cfg = build_section(
                IterateConfig, dict(self.data.get("iterate") or {}), self.source, self.lines, "iterate."
            )
            for step in ("sample", "judge", "pairs", "train") + (("control",) if cfg.control else ()):
                self._round_config(cfg, 1, step, steps=1)  # the sections build (and fail) before any work
            return cfg
        from orca2.eval.evaluate import EvalConfig

        section = dict(self.data.get("eval") or {})
        base_model = section.pop("base_model", None)
        base_system = tuple(section.pop("base_system", ()) or ())
        section.setdefault("system", ["cautious"])
        if "persona" in self.stages:  # OrcaBench on the users persona build held out
            section.setdefault("bench", ["orcabench"])
        section.setdefault("bench", ["heldout"] if "heldout" in self.data else ["gsm8k"])
        model = str(self.paths["student"] / "model") if "train" in self.stages else section.pop("model", None)
        if model is None:
            raise Orca2Error(f"{self.source}: eval needs eval.model when the pipeline has no train stage")
        extra = (
            [str(self.paths["eval"] / "benchmarks.yaml")] if "heldout" in self.data or "persona" in self.stages else []
        )
        wired = {
            "output": str(self.paths["eval"] / "student"),
            "label": "student",
            "benchmarks": tuple(extra) + tuple(section.pop("benchmarks", ()) or ()),
        }
        section.update(wired)
        section["client"] = {**cache, **section.get("client", {})}
        section["model"] = model
        student = self._build(EvalConfig, section, "eval.")
        base = None
        if base_model:
            base = dataclasses.replace(
                student,
                model=base_model,
                label="base",
                output=str(self.paths["eval"] / "base"),
                system=base_system or student.system,
            )
        return {"student": student, "base": base}

    def _persona_configs(self) -> dict[str, Any]:
        """persona: {posts: PATH | synthetic, synth:, infer:, augment:, build:} → each step's config, paths wired."""
        from orca2.stages.persona import AugmentConfig, BuildConfig, InferConfig, SynthConfig

        data = dict(self.data.get("persona") or {})
        for key in data:
            if key not in ("posts", "synth", "infer", "augment", "build"):
                raise Orca2Error(
                    f"{self.source}:{self.lines.get(f'persona.{key}', 1)}: unknown key 'persona.{key}' "
                    "(valid: posts, synth, infer, augment, build)"
                )
        d = self.paths["persona"]
        cache = {"cache_dir": str(self.paths["cache"])}
        posts = data.get("posts", "synthetic")
        configs: dict[str, Any] = {}
        if posts == "synthetic":
            configs["synth"] = self._build(
                SynthConfig, {**(data.get("synth") or {}), "output": str(d / "posts.jsonl")}, "persona.synth."
            )
            posts = str(d / "posts.jsonl")
        wired = {
            "infer": (InferConfig, {"posts": posts, "output": str(d / "traits.jsonl")}),
            "augment": (
                AugmentConfig,
                {"posts": posts, "traits": str(d / "traits.jsonl"), "output": str(d / "augmented.jsonl")},
            ),
            "build": (
                BuildConfig,
                {
                    "augmented": str(d / "augmented.jsonl"),
                    "traits": str(d / "traits.jsonl"),
                    "output": str(d / "pcip.jsonl"),
                },
            ),
        }
        for step, (cls, paths) in wired.items():
            section = {**(data.get(step) or {}), **paths}
            if step == "infer" and "synth" in configs:
                section.setdefault("truth", str(d / "posts.truth.jsonl"))
            if step == "build":
                section.setdefault("holdout", 0.2)
            section["client"] = {**cache, **section.get("client", {})}
            configs[step] = self._build(cls, section, f"persona.{step}.")
        return configs

    # --- running ------------------------------------------------------------------------------------

    # --- iterate: rounds of sample → judge → pairs → train → eval --------------------------------------

    def _round_dir(self, t: int) -> Path:
        return self.run_dir / "iterate" / f"round-{t}"

    def _policy(self, t: int, control: bool = False) -> str:
        """π_t's model folder (or the control's after t rounds): the SFT student for t = 0."""
        if t == 0:
            return str(self.paths["student"] / "model")
        return str(self._round_dir(t) / ("control" if control else "student") / "model")

    def _round_config(self, it: IterateConfig, t: int, step: str, steps: int | None = None) -> Any:
        d = self._round_dir(t)
        cache = {"cache_dir": str(self.paths["cache"])}
        where = f"iterate.{step}."
        if step == "sample":
            from orca2.stages.sample import SampleConfig

            section = {
                **it.sample,
                "tasks": str(d / "prompts.jsonl"),
                "output": str(d / "samples.jsonl"),
                "student": f"local:{self._policy(t - 1)}",
            }
            section.setdefault("generic", (self.data.get("erase") or {}).get("generic", "cautious"))  # as trained
            section["client"] = {**cache, **section.get("client", {})}
            return self._build(SampleConfig, section, where)
        if step == "judge":
            from orca2.stages.judge import JudgeConfig

            section = {
                **it.judge,
                "replies": [str(d / "samples.jsonl")],
                "output": str(d / "judged.jsonl"),
                "teacher": [str(self.paths["traces"])],
            }
            return self._build(JudgeConfig, section, where)
        if step == "pairs":
            from orca2.stages.pairs import PairsConfig

            section = {
                "recipe": it.recipe,
                "objective": it.objective,
                **it.pairs,
                "judged": [str(d / "judged.jsonl")],
                "output": str(d / "pairs.jsonl"),
                "replay": [str(p) for p in self._replayed(it, t)],
            }
            return self._build(PairsConfig, section, where)
        if step == "train":
            from orca2.train.trainer import TrainConfig

            section = {**self._train_section(), **it.train}
            reference = self._policy(t - 1) if it.reference == "previous" else self._policy(0)
            section.update(
                model=self._policy(t - 1),
                data=[str(d / "pairs.jsonl")],
                output=str(d / "student"),
                objective=it.objective,
                reference=reference,
                chat_template="tokenizer",
            )
            return self._build(TrainConfig, section, where)
        if step == "control":  # as many SFT steps as the round's preference training took, on the teacher's traces
            from orca2.train.trainer import PREFERENCE_KEYS, TrainConfig

            if not steps:
                raise Orca2Error(f"iterate round {t}: the control needs the round's training step count")
            section = {
                **self._train_section(),
                **{k: v for k, v in it.train.items() if k not in PREFERENCE_KEYS},
                **it.control_train,
            }  # the round's optimiser settings, then the control's own
            section.update(
                model=self._policy(t - 1, control=True),
                data=[str(d / "control.jsonl")],
                output=str(d / "control"),
                objective="sft",
                max_steps=steps,
                epochs=steps,
            )
            return self._build(TrainConfig, section, "iterate.control_train.")
        control = step == "control_eval"
        label = f"control-{t}" if control else f"round-{t}"
        student = self.configs["eval"]["student"]
        return dataclasses.replace(
            student, model=self._policy(t, control), label=label, output=str(self.paths["eval"] / label)
        )

    def _train_section(self) -> dict[str, Any]:
        """The train section's keys a round's training inherits (its data and stages are the round's own)."""
        return {k: v for k, v in (self.data.get("train") or {}).items() if k not in ("stages", "data")}

    def _replayed(self, it: IterateConfig, t: int) -> list[Path]:
        """The pairs files round t replays, newest first: one per replay fraction, as far back as there are rounds."""
        from orca2.stages.pairs import PairsConfig

        fractions = it.pairs.get(
            "replay_fractions", next(f.default for f in dataclasses.fields(PairsConfig) if f.name == "replay_fractions")
        )
        return [self._round_dir(k) / "pairs.jsonl" for k in range(t - 1, 0, -1)][: len(fractions)]

    def _round_files(self, it: IterateConfig, t: int, step: str) -> tuple[list[Path], list[Path]]:
        """(inputs, outputs) of one step of round t, for the manifest."""
        d = self._round_dir(t)
        previous = [Path(self._policy(t - 1))]
        replay = self._replayed(it, t)
        return {
            "sample": ([d / "prompts.jsonl"] + previous, [d / "samples.jsonl"]),
            "judge": ([d / "samples.jsonl", self.paths["traces"]], [d / "judged.jsonl"]),
            "pairs": ([d / "judged.jsonl"] + replay, [d / "pairs.jsonl"]),
            "train": ([d / "pairs.jsonl"] + previous, [d / "student" / "model"]),
            "eval": ([Path(self._policy(t))], [self.paths["eval"] / f"round-{t}" / "report.json"]),
            "control": ([d / "control.jsonl", Path(self._policy(t - 1, control=True))], [d / "control" / "model"]),
            "control_eval": (
                [Path(self._policy(t, control=True))],
                [self.paths["eval"] / f"control-{t}" / "report.json"],
            ),
        }[step]

    def _round_prompts(self, it: IterateConfig, t: int) -> list[dict[str, Any]]:
        """Round t's prompts: a fresh partition of the run's tasks (seeded), a partition in turn, or all of them."""
        import random

        from orca2.io import read_records

        tasks = list(read_records(self.paths["tasks"]))
        random.Random(self.seed).shuffle(tasks)
        if it.prompts_per_round:
            if it.rounds * it.prompts_per_round > len(tasks) - (1 if it.fresh_prompts else 0):
                raise Orca2Error(
                    f"iterate: {it.rounds} rounds × {it.prompts_per_round} prompts need "
                    f"{it.rounds * it.prompts_per_round} tasks"
                    + (" and more for the SFT start (fresh_prompts)" if it.fresh_prompts else "")
                    + f"; the run has {len(tasks)}"
                )
            return tasks[(t - 1) * it.prompts_per_round : t * it.prompts_per_round]
        if it.partitions:
            return tasks[(t - 1) % it.partitions :: it.partitions]  # every task in exactly one partition
        return tasks

    def _sft_data(self) -> Path:
        """The SFT start's data: the erased traces, less the rounds' prompts under iterate.fresh_prompts."""
        fresh = "iterate" in self.stages and (self.data.get("iterate") or {}).get(
            "fresh_prompts"
        )  # read before iterate's config is built
        return self.paths["sft_start"] if fresh else self.paths["sft"]

    def _write_sft_start(self) -> None:
        from orca2.io import read_records, write_records

        it = self.configs["iterate"]
        kept = {r["id"] for t in range(1, it.rounds + 1) for r in self._round_prompts(it, t)}
        records = list(read_records(self.paths["sft"]))
        write_records(self.paths["sft_start"], [r for r in records if r["id"] not in kept])
        log.info(
            "SFT start: %d of %d erased traces; %d prompts kept for %d rounds (iterate.fresh_prompts)",
            sum(r["id"] not in kept for r in records),
            len(records),
            len(kept),
            it.rounds,
        )

    def _write_prompts(self, it: IterateConfig, t: int) -> None:
        from orca2.io import read_records, write_records

        tasks = self._round_prompts(it, t)
        d = self._round_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        write_records(d / "prompts.jsonl", tasks)
        if it.control:  # the control learns from the teacher's (erased) traces of the same prompts
            ids = {r["id"] for r in tasks}
            write_records(d / "control.jsonl", [r for r in read_records(self.paths["sft"]) if r["id"] in ids])

    def _run_iterate(self, manifest: dict[str, Any], forced: bool) -> dict[str, Any]:
        it = self.configs["iterate"]
        rounds = manifest.setdefault("rounds", {})
        for t in range(1, it.rounds + 1):
            self._write_prompts(it, t)
            record = rounds.setdefault(str(t), {})
            for step in ROUND_STEPS + (CONTROL_STEPS if it.control else ()):
                cfg = self._round_config(it, t, step, record.get("train", {}).get("counts", {}).get("steps"))
                config = config_to_dict(cfg)
                config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
                ins, outs = self._round_files(it, t, step)
                inputs = {str(p): file_hash(p) for p in ins}
                reason = self._why_run(record.get(step), config_hash, inputs, forced)
                if reason is None:
                    continue
                log.info("iterate round %d %s: running (%s)", t, step, reason)
                resume = record.get(f"{step}_attempt") == config_hash
                record[f"{step}_attempt"] = config_hash
                self._save(manifest)
                start = time.perf_counter()
                counts = self._run_round_step(step, cfg, resume)
                record[step] = {
                    "config_hash": config_hash,
                    "inputs": inputs,
                    "counts": counts,
                    "outputs": {str(p): file_hash(p) for p in outs},
                    "seconds": round(time.perf_counter() - start, 2),
                    "environment": self.environment,
                }
                record.pop(f"{step}_attempt", None)
                self._save(manifest)
        return self._best_round(it, manifest)

    def _run_round_step(self, step: str, cfg: Any, resume: bool) -> dict[str, Any]:
        if step == "sample":
            from orca2.stages.sample import run as sample_run

            it = self.configs["iterate"]
            if it.serve:  # π_t served for the step, asked through the OpenAI-compatible path
                from orca2.models import model_fingerprint
                from orca2.serve import served

                model = cfg.student.partition(":")[2]
                name = f"{it.served_name}-{model_fingerprint(cfg.student)[:12]}"  # the cache tells π_t from π_t-1
                with served(
                    it.serve, model, Path(cfg.output).with_name("server.log"), timeout=it.serve_timeout, name=name
                ) as url:
                    s = sample_run(
                        dataclasses.replace(
                            cfg, student=f"openai:{name}", client=dataclasses.replace(cfg.client, base_url=url)
                        )
                    )
            else:
                s = sample_run(cfg)
            if s["failed"]:
                raise Orca2Error(
                    f"{s['failed']} of {s['prompts']} student requests failed; re-running retries only those"
                )
            return {k: s[k] for k in ("prompts", "samples", "cached_at_start", "tokens_per_s")}
        if step == "judge":
            from orca2.stages.judge import run as judge_run

            return {k: v for k, v in judge_run(cfg).items() if k != "output"}
        if step == "pairs":
            from orca2.stages.pairs import run as pairs_run

            return {k: v for k, v in pairs_run(cfg).items() if isinstance(v, (int, float)) or v is None}
        if step in ("train", "control"):
            from orca2.train import trainer

            if not resume and Path(cfg.output).exists():
                shutil.rmtree(cfg.output)
            if step == "train":  # the round's pairs may have been rebuilt since their log-probs were stored
                from orca2.train.preference import drop_stale_reference_logps

                drop_stale_reference_logps(cfg.data[0])
            summary = trainer.run(dataclasses.replace(cfg, resume=resume or cfg.resume))
            if summary.get("stopped"):
                raise Orca2Error("training stopped early (stop_after); run again to resume it")
            stage = summary["stages"][0]
            return {k: stage.get(k) for k in ("steps", "examples", "reference_seconds", "seconds")}
        from orca2.eval.evaluate import run as eval_run

        report = eval_run(cfg)
        return {
            c: {b: round(o["accuracy"], 4) for b, o in s["overall"].items()} for c, s in report["benchmarks"].items()
        }

    def _best_round(self, it: IterateConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        """Accuracy of every round (round 0: the SFT student) on the eval's first system prompt and benchmark."""

        def accuracy(counts: dict[str, Any]) -> float:
            first = next(iter(counts.values()))
            return next(iter(first.values()))

        table = {"0": accuracy(manifest["stages"]["eval"]["counts"]["student"])}
        table.update({t: accuracy(r["eval"]["counts"]) for t, r in manifest["rounds"].items() if "eval" in r})
        best = max(table, key=lambda t: (table[t], -int(t)))
        link = self.run_dir / "iterate" / "best"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(Path(self._policy(int(best))).resolve())
        manifest["iterate"] = {"accuracy_by_round": table, "best_round": int(best), "best_model": str(link)}
        if it.control:
            manifest["iterate"]["control_accuracy_by_round"] = {
                t: accuracy(r["control_eval"]["counts"]) for t, r in manifest["rounds"].items() if "control_eval" in r
            }
        manifest["iterate"]["report"] = str(self._rounds_report(it, manifest) / "report.md")
        self._save(manifest)
        return manifest["iterate"]

    def _rounds_report(self, it: IterateConfig, manifest: dict[str, Any]) -> Path:
        """iterate/report.{md,json,png}: the SFT start, each round and its control on the same held-out items —
        accuracies, paired gains with CIs and McNemar's p — and the wall-clock of every phase."""
        from orca2.eval.evaluate import items_path
        from orca2.eval.report import rounds_report

        condition = self.configs["eval"]["student"].system[0]
        runs = [
            {
                "label": "SFT start",
                "round": 0,
                "series": "start",
                "items": items_path(self.paths["eval"] / "student", condition),
            }
        ]
        comparisons = []
        for t in range(1, it.rounds + 1):
            runs.append(
                {
                    "label": f"round {t}",
                    "round": t,
                    "series": f"{it.recipe} {it.objective}",
                    "items": items_path(self.paths["eval"] / f"round-{t}", condition),
                }
            )
            comparisons.append((f"round {t}", "SFT start"))
            if it.control:
                runs.append(
                    {
                        "label": f"control {t}",
                        "round": t,
                        "series": "SFT control (equal steps)",
                        "items": items_path(self.paths["eval"] / f"control-{t}", condition),
                    }
                )
                comparisons += [(f"round {t}", f"control {t}"), (f"control {t}", "SFT start")]
        stages = manifest["stages"]
        phases = {"0 (SFT start)": {"train": stages["train"]["seconds"], "eval": stages["eval"]["seconds"]}}
        notes = []
        for t, r in sorted(manifest["rounds"].items(), key=lambda x: int(x[0])):
            reference = r["train"]["counts"].get("reference_seconds") or 0.0
            phases[t] = {
                "sample": r["sample"]["seconds"],
                "judge": r["judge"]["seconds"],
                "pairs": r["pairs"]["seconds"],
                "reference pass": reference,
                "train": r["train"]["seconds"] - reference,
                "eval": r["eval"]["seconds"],
            }
            if "control" in r:
                phases[t].update(
                    {"control train": r["control"]["seconds"], "control eval": r["control_eval"]["seconds"]}
                )
            c = r["sample"]["counts"]
            speed = f"{c['tokens_per_s']:.1f} tokens/s" if c.get("tokens_per_s") else "read from the cache"
            notes.append(
                f"round {t}: {c['samples']} samples of {c['prompts']} prompts ({speed}); "
                f"{r['train']['counts']['steps']} optimizer steps"
                + (" (the control: as many SFT steps)" if it.control else "")
            )
        rounds_report(runs, comparisons, self.run_dir / "iterate", phases, notes)
        return self.run_dir / "iterate"

    def inputs(self, name: str) -> list[Path]:
        if name == "instruct":  # local document files and folders, and the flow file when it is one
            cfg = self.configs["instruct"]
            local = [
                Path(d.partition(":")[2] if d.startswith("jsonl:") else d) for d in cfg.docs if not d.startswith("hf:")
            ]
            return [p for p in local if p.exists()] + ([Path(cfg.flow)] if Path(cfg.flow).is_file() else [])
        if name == "tasks":  # local source files count as inputs; hub datasets and synthetic do not
            specs = [spec.partition(":")[2] for spec in self.configs["tasks"].sources]
            return [Path(p) for p in specs if p and Path(p).exists()]
        if name == "iterate":
            return [self.paths["tasks"], self.paths["traces"], self.paths["student"] / "model"]
        if name == "persona":
            posts = self.configs["persona"]["infer"].posts
            return [] if "synth" in self.configs["persona"] else [Path(posts)]
        if name == "train" and "persona" in self.stages:
            return [self.paths["persona"] / "pcip.jsonl"]
        return {
            "select": [self.paths["tasks"]],
            "generate": [self.paths["tasks"]]
            + ([self.paths["assignment"]] if self.paths["assignment"].exists() else []),
            "erase": [self.paths["traces"]],
            "train": [self._sft_data()],
            "eval": ([self.paths["student"] / "model"] if "train" in self.stages else [])
            + ([self.paths["heldout"]] if "heldout" in self.data else [])
            + ([self.paths["persona"] / "pcip.heldout.jsonl"] if "persona" in self.stages else []),
        }[name]

    def outputs(self, name: str) -> list[Path]:
        return {
            "persona": [self.paths["persona"] / "pcip.jsonl", self.paths["persona"] / "pcip.heldout.jsonl"],
            "instruct": [self.paths["instruct"]],
            "tasks": [self.paths["tasks"]],
            "select": [self.paths["assignment"]],
            "generate": [self.paths["traces"]],
            "erase": [self.paths["sft"]],
            "train": [self.paths["student"] / "model"],
            "eval": [self.paths["eval"] / "student" / "report.json"],
            "iterate": [self.run_dir / "iterate" / "best"],
        }[name]

    def config_dict(self, name: str) -> Any:
        cfg = self.configs[name]
        if isinstance(cfg, dict):
            return {k: config_to_dict(v) if v is not None else None for k, v in cfg.items()}
        return config_to_dict(cfg)

    def run(self, from_stage: str | None = None) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.run_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"stages": {}}
        manifest.update(seed=self.seed, packages=package_versions(), config=self.source)
        self.environment = self._check_environment(manifest)
        if from_stage is not None and from_stage not in self.stages:
            raise Orca2Error(f"--from {from_stage}: not a stage of this pipeline ({', '.join(self.stages)})")
        if "assignment" in self.data and "select" not in self.stages:
            import yaml

            from orca2.strategies import Assignment

            with atomic_text(self.paths["assignment"]) as f:
                yaml.safe_dump(self.data["assignment"], f, sort_keys=False)
            Assignment.load(self.paths["assignment"])  # unknown strategies fail before any stage runs
        if "heldout" in self.data:
            self._write_heldout()
        if "persona" in self.stages:
            d = self.paths["persona"].resolve()
            self.paths["eval"].mkdir(parents=True, exist_ok=True)
            judge = self.configs["persona"]["infer"].judge
            (self.paths["eval"] / "benchmarks.yaml").write_text(
                f"orcabench:\n  loader: orcabench\n  path: {d / 'pcip.heldout.jsonl'}\n  traits: {d / 'traits.jsonl'}\n"
                f"  judge: {judge}\n"
            )
        forced = False
        ran, skipped = [], []
        for name in self.stages:
            forced = forced or name == from_stage
            if name == "train" and self._sft_data() != self.paths["sft"]:
                self._write_sft_start()
            config = self.config_dict(name)
            config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
            inputs = {str(p): file_hash(p) for p in self.inputs(name)}
            entry = manifest["stages"].get(name)
            reason = self._why_run(entry, config_hash, inputs, forced)
            if reason is None:
                skipped.append(name)
                log.info("stage %s: unchanged, skipped", name)
                continue
            log.info("stage %s: running (%s)", name, reason)
            attempt = manifest.setdefault("attempts", {}).get(name)
            resume = attempt == config_hash and not forced
            manifest["attempts"][name] = config_hash
            self._save(manifest)
            start = time.perf_counter()
            try:
                counts = self._run_iterate(manifest, forced) if name == "iterate" else self._run_stage(name, resume)
            except Orca2Error as exc:
                raise Orca2Error(
                    f"stage '{name}' failed: {exc} (earlier stages' outputs are kept in {self.run_dir})"
                ) from None
            except Exception as exc:  # noqa: BLE001 - name the stage whatever broke
                raise Orca2Error(f"stage '{name}' failed: {type(exc).__name__}: {exc} (earlier outputs kept)") from exc
            manifest["stages"][name] = {
                "config_hash": config_hash,
                "config": config,
                "inputs": inputs,
                "outputs": {str(p): file_hash(p) for p in self.outputs(name)},
                "seconds": round(time.perf_counter() - start, 2),
                "counts": counts,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "environment": self.environment,
            }
            manifest["attempts"].pop(name, None)
            self._save(manifest)
            ran.append(name)
        return {"ran": ran, "skipped": skipped, "manifest": str(manifest_path)}

    def _check_environment(self, manifest: dict[str, Any]) -> str:
        """Record this machine's environment (orca2.environment) in the manifest, keyed by its hash; warn in one
        line per earlier environment that made outputs of this run and differs from this one. Returns the key."""
        from orca2.environment import differences, environment

        current = environment()
        key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
        known = manifest.setdefault("environments", {})
        entries = [(name, e) for name, e in manifest["stages"].items()]
        entries += [
            (f"iterate round {t} {step}", e)
            for t, r in manifest.get("rounds", {}).items()
            for step, e in r.items()
            if isinstance(e, dict)
        ]
        by_env: dict[str, list[str]] = {}
        for name, entry in entries:
            if entry.get("environment") not in (None, key):
                by_env.setdefault(entry["environment"], []).append(name)
        for other, names in by_env.items():
            changes = differences(known.get(other, {}), current)
            log.warning(
                "%s ran in another environment (%s): results may differ from a run here",
                ", ".join(names),
                "; ".join(changes),
            )
        known[key] = current
        manifest["environment"] = current  # this invocation's: what `auto` resolved to, threads, CPU, libraries
        return key

    def _why_run(
        self, entry: dict[str, Any] | None, config_hash: str, inputs: dict[str, str], forced: bool
    ) -> str | None:
        if forced:
            return "--from"
        if entry is None:
            return "not run yet"
        if entry["config_hash"] != config_hash:
            return "config changed"
        if entry["inputs"] != inputs:
            return "inputs changed"
        for path, digest in entry["outputs"].items():
            if not Path(path).exists():
                log.warning("%s was deleted by hand: re-running the stage that makes it", path)
                return f"output {path} deleted"
            if file_hash(Path(path)) != digest:
                log.warning("%s was changed by hand: re-running the stage that makes it", path)
                return f"output {path} changed"
        return None

    def _save(self, manifest: dict[str, Any]) -> None:
        with atomic_text(self.run_dir / "manifest.json") as f:
            json.dump(manifest, f, indent=2, default=str)

    def _write_heldout(self) -> None:
        from orca2.stages.tasks import TasksConfig
        from orca2.stages.tasks import run as make_tasks

        section = {"split": "test", **dict(self.data["heldout"]), "output": str(self.paths["heldout"])}
        cfg = self._build(TasksConfig, section, "heldout.")
        make_tasks(cfg)
        self.paths["eval"].mkdir(parents=True, exist_ok=True)
        (self.paths["eval"] / "benchmarks.yaml").write_text(
            f"heldout:\n  loader: jsonl\n  path: {self.paths['heldout'].resolve()}\n  answer_type: auto\n"
            '  template: "{question}"\n  aggregate: micro\n'
        )

    def _run_stage(self, name: str, resume: bool) -> dict[str, Any]:
        cfg = self.configs[name]
        if name == "persona":
            from orca2.stages import persona

            counts: dict[str, Any] = {}
            if "synth" in cfg:
                counts["synth"] = persona.synth(cfg["synth"])
            inferred = persona.infer(cfg["infer"])
            counts["infer"] = {
                "users": inferred["users"],
                **(
                    {"spearman": {d: round(v["rho"], 3) for d, v in inferred["truth"]["spearman"].items()}}
                    if "truth" in inferred
                    else {}
                ),
            }
            counts["augment"] = persona.augment(cfg["augment"])["counts"]
            built = persona.build(cfg["build"])
            counts["build"] = {k: built[k] for k in ("train_records", "heldout_records", "heldout_users")}
            return counts
        if name == "instruct":
            from orca2.stages.instruct import run as stage_run

            report = stage_run(cfg)
            return {
                k: report[k]
                for k in ("documents", "passages", "candidates", "kept", "dropped", "agent_requests", "lost")
            }
        if name == "tasks":
            from orca2.stages.tasks import run as stage_run

            return stage_run(cfg)["total"]
        if name == "select":
            from orca2.stages.select import run as stage_run

            report = stage_run(cfg)
            return {"default": report["default"], "chosen": report["chosen"]}
        if name == "generate":
            from orca2.stages.generate import run as stage_run

            summary = stage_run(cfg)
            if summary["failed"] and not cfg.allow_failures:
                raise Orca2Error(
                    f"{summary['failed']} of {summary['tasks']} teacher requests failed (see {summary['errors']}); "
                    "re-running retries only those"
                )
            return {k: summary[k] for k in ("tasks", "records", "answered", "failed", "cached_at_start")}
        if name == "erase":
            from orca2.stages.erase import run as stage_run

            report = stage_run(cfg)
            return {k: report[k] for k in ("read", "kept", "dropped", "rejected")} | {
                "dropped_by_reason": report["dropped_by_reason"]
            }
        if name == "train":
            from orca2.train import trainer

            if not resume and self.paths["student"].exists():
                shutil.rmtree(self.paths["student"])  # a changed config or input starts the student afresh
            summary = trainer.run(dataclasses.replace(cfg, resume=resume or cfg.resume))
            if summary.get("stopped"):
                raise Orca2Error("training stopped early (stop_after); run again to resume it")
            return {
                "stages": [
                    {"stage": s["stage"], "steps": s["steps"], "examples": s["examples"]} for s in summary["stages"]
                ]
            }
        from orca2.eval.evaluate import run as eval_run
        from orca2.eval.report import compare

        reports = {}
        if cfg["base"] is not None:
            reports["base"] = eval_run(cfg["base"])
        reports["student"] = eval_run(cfg["student"])
        if cfg["base"] is not None and "benchmarks" in reports["student"]:
            compare([cfg["base"].output, cfg["student"].output], str(self.paths["eval"]))
        if cfg["base"] is not None and "orcabench" in reports["student"]:
            from orca2.eval.orcabench import compare_reports

            with atomic_text(self.paths["eval"] / "orcabench-compare.md") as f:
                f.write(compare_reports({who: r["orcabench"] for who, r in reports.items()}))
        return {
            who: {
                **{
                    c: {b: round(o["accuracy"], 4) for b, o in s["overall"].items()}
                    for c, s in r.get("benchmarks", {}).items()
                },
                **{
                    b: {m: round(v["value"], 4) for m, v in o["metrics"].items()}
                    for b, o in r.get("orcabench", {}).items()
                },
            }
            for who, r in reports.items()
        }


def run(
    config: str, overrides: tuple[str, ...] = (), from_stage: str | None = None, output: str | None = None
) -> dict[str, Any]:
    """Load the pipeline config (all errors up front) and run it."""
    return Pipeline(config, overrides, output).run(from_stage)
