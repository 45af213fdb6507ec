"""Stage `iterate`: the on-policy loop of Orca-Math and Direct Nash Optimization, after `orca2 run`'s eval.

Round t takes a fresh partition of the run's tasks (or a partition in turn, or all of them), lets π_{t-1} sample
(orca2 sample; served by a command of yours if `serve` says so), judges the replies against gold or the teacher's
traces (orca2 judge), builds preference records with replay of earlier rounds (orca2 pairs), trains π_t with DPO
or KTO against the reference — π_{t-1} by default, as DNO does — and evaluates it like the student. With
`control`, each round also trains an equal-compute SFT control on the same prompts' teacher traces, for as many
optimizer steps, and evaluates it: the round's gain is measured against it.

Each step of each round is a manifest entry of its own (config hash, inputs, outputs), so a killed run resumes
inside the round it was in, asking and training nothing twice; the best round on the eval report is linked as
iterate/best, and iterate/report.{md,json,png} compares the rounds, their controls and the start with paired CIs.
The round steps are the stages of the same names, reached through the registry (orca2.stages.load).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from orca2 import manifest as book
from orca2.config import build_section, config_to_dict, option
from orca2.errors import Orca2Error
from orca2.stages import Stage, load

log = logging.getLogger("orca2.pipeline")
ROUND_STEPS = ("sample", "judge", "pairs", "train", "eval")
CONTROL_STEPS = ("control", "control_eval")  # with `control`: equal-compute SFT on the round's teacher traces


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


# --- wiring: the loop's place in the run ----------------------------------------------------------------


def prepare(run: Any) -> None:
    """Under fresh_prompts the SFT start trains on the erased traces less the rounds' prompts (sft.start.jsonl),
    written just before train's files are hashed."""
    if "train" not in run.stages or "eval" not in run.stages:
        raise Orca2Error(f"{run.source}: iterate needs the train and eval stages before it")
    if (run.data.get("iterate") or {}).get("fresh_prompts"):  # read before iterate's config is built
        run.paths["train_data"] = run.paths["sft_start"]
        run.before["train"] = lambda: write_sft_start(run)


def wire(run: Any) -> IterateConfig:
    """The section, and every round step's config built once (its errors before any work)."""
    cfg = build_section(IterateConfig, dict(run.data.get("iterate") or {}), run.source, run.lines, "iterate.")
    for name in ("sample", "judge", "pairs", "train") + (("control",) if cfg.control else ()):
        round_config(run, cfg, 1, name, steps=1)
    return cfg


def files(run: Any, cfg: IterateConfig) -> tuple[list[Path], list[Path]]:
    return [run.paths["tasks"], run.paths["traces"], run.paths["student"] / "model"], [run.dir / "iterate" / "best"]


def round_dir(run: Any, t: int) -> Path:
    return run.dir / "iterate" / f"round-{t}"


def policy(run: Any, t: int, control: bool = False) -> str:
    """π_t's model folder (or the control's after t rounds): the SFT student for t = 0."""
    if t == 0:
        return str(run.paths["student"] / "model")
    return str(round_dir(run, t) / ("control" if control else "student") / "model")


def round_config(run: Any, it: IterateConfig, t: int, name: str, steps: int | None = None) -> Any:
    """The config of round t's step `name`: the step's section of `iterate`, its paths and models wired."""
    d, where = round_dir(run, t), f"iterate.{name}."
    if name == "sample":
        section = {**it.sample, "tasks": str(d / "prompts.jsonl"), "output": str(d / "samples.jsonl")}
        section["student"] = f"local:{policy(run, t - 1)}"
        section.setdefault("generic", (run.data.get("erase") or {}).get("generic", "cautious"))  # as trained
        return run.build(load("sample").config, run.cached(section), where)
    if name == "judge":
        section = {**it.judge, "replies": [str(d / "samples.jsonl")], "output": str(d / "judged.jsonl")}
        section["teacher"] = [str(run.paths["traces"])]
        return run.build(load("judge").config, section, where)
    if name == "pairs":
        section = {"recipe": it.recipe, "objective": it.objective, **it.pairs}
        section.update(judged=[str(d / "judged.jsonl")], output=str(d / "pairs.jsonl"))
        section["replay"] = [str(p) for p in replayed(run, it, t)]
        return run.build(load("pairs").config, section, where)
    train = load("train").config
    if name == "train":
        section = {**train_section(run), **it.train}
        reference = policy(run, t - 1) if it.reference == "previous" else policy(run, 0)
        section.update(model=policy(run, t - 1), data=[str(d / "pairs.jsonl")], output=str(d / "student"))
        section.update(objective=it.objective, reference=reference, chat_template="tokenizer")
        return run.build(train, section, where)
    if name == "control":  # as many SFT steps as the round's preference training took, on the teacher's traces
        from orca2.train.trainer import PREFERENCE_KEYS

        if not steps:
            raise Orca2Error(f"iterate round {t}: the control needs the round's training step count")
        section = {  # the round's optimiser settings, then the control's own
            **train_section(run),
            **{k: v for k, v in it.train.items() if k not in PREFERENCE_KEYS},
            **it.control_train,
        }
        section.update(model=policy(run, t - 1, control=True), data=[str(d / "control.jsonl")])
        section.update(output=str(d / "control"), objective="sft", max_steps=steps, epochs=steps)
        return run.build(train, section, "iterate.control_train.")
    control = name == "control_eval"
    label = f"control-{t}" if control else f"round-{t}"
    student = run.configs["eval"]["student"]
    return dataclasses.replace(
        student, model=policy(run, t, control), label=label, output=str(run.paths["eval"] / label)
    )


def train_section(run: Any) -> dict[str, Any]:
    """The train section's keys a round's training inherits (its data and stages are the round's own)."""
    return {k: v for k, v in (run.data.get("train") or {}).items() if k not in ("stages", "data")}


def replayed(run: Any, it: IterateConfig, t: int) -> list[Path]:
    """The pairs files round t replays, newest first: one per replay fraction, as far back as there are rounds."""
    default = next(f.default for f in dataclasses.fields(load("pairs").config) if f.name == "replay_fractions")
    fractions = it.pairs.get("replay_fractions", default)
    return [round_dir(run, k) / "pairs.jsonl" for k in range(t - 1, 0, -1)][: len(fractions)]


def round_files(run: Any, it: IterateConfig, t: int, name: str) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of one step of round t, for the manifest."""
    d, previous = round_dir(run, t), [Path(policy(run, t - 1))]
    return {
        "sample": ([d / "prompts.jsonl"] + previous, [d / "samples.jsonl"]),
        "judge": ([d / "samples.jsonl", run.paths["traces"]], [d / "judged.jsonl"]),
        "pairs": ([d / "judged.jsonl"] + replayed(run, it, t), [d / "pairs.jsonl"]),
        "train": ([d / "pairs.jsonl"] + previous, [d / "student" / "model"]),
        "eval": ([Path(policy(run, t))], [run.paths["eval"] / f"round-{t}" / "report.json"]),
        "control": ([d / "control.jsonl", Path(policy(run, t - 1, control=True))], [d / "control" / "model"]),
        "control_eval": ([Path(policy(run, t, control=True))], [run.paths["eval"] / f"control-{t}" / "report.json"]),
    }[name]


def round_prompts(run: Any, it: IterateConfig, t: int) -> list[dict[str, Any]]:
    """Round t's prompts: a fresh partition of the run's tasks (seeded), a partition in turn, or all of them."""
    import random

    from orca2.io import read_records

    tasks = list(read_records(run.paths["tasks"]))
    random.Random(run.seed).shuffle(tasks)
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


def write_sft_start(run: Any) -> None:
    from orca2.io import read_records, write_records

    it = run.configs["iterate"]
    kept = {r["id"] for t in range(1, it.rounds + 1) for r in round_prompts(run, it, t)}
    records = list(read_records(run.paths["sft"]))
    write_records(run.paths["sft_start"], [r for r in records if r["id"] not in kept])
    log.info(
        "SFT start: %d of %d erased traces; %d prompts kept for %d rounds (iterate.fresh_prompts)",
        sum(r["id"] not in kept for r in records),
        len(records),
        len(kept),
        it.rounds,
    )


def write_prompts(run: Any, it: IterateConfig, t: int) -> None:
    from orca2.io import read_records, write_records

    tasks = round_prompts(run, it, t)
    d = round_dir(run, t)
    d.mkdir(parents=True, exist_ok=True)
    write_records(d / "prompts.jsonl", tasks)
    if it.control:  # the control learns from the teacher's (erased) traces of the same prompts
        ids = {r["id"] for r in tasks}
        write_records(d / "control.jsonl", [r for r in read_records(run.paths["sft"]) if r["id"] in ids])


# --- running ----------------------------------------------------------------------------------------------


def step(run: Any, it: IterateConfig, resume: bool) -> dict[str, Any]:
    """Every round's steps, each skipped when its manifest entry still stands; then the best round and the report."""
    rounds = run.manifest.setdefault("rounds", {})
    for t in range(1, it.rounds + 1):
        write_prompts(run, it, t)
        record = rounds.setdefault(str(t), {})
        for name in ROUND_STEPS + (CONTROL_STEPS if it.control else ()):
            cfg = round_config(run, it, t, name, record.get("train", {}).get("counts", {}).get("steps"))
            book.run_step(
                record,
                name,
                config_to_dict(cfg),
                lambda t=t, name=name: round_files(run, it, t, name),
                lambda resume, name=name, cfg=cfg: run_round_step(run, it, name, cfg, resume),
                forced=run.forced,
                attempts=record,
                attempt_key=f"{name}_attempt",
                commit=run.save,
                environment=run.environment,
                what=f"iterate round {t} {name}",
                resume_when_forced=True,
            )
    return best_round(run, it)


def run_round_step(run: Any, it: IterateConfig, name: str, cfg: Any, resume: bool) -> dict[str, Any]:
    if name == "sample":
        s = sample_served(it, cfg) if it.serve else load("sample").run(cfg)
        if s["failed"]:
            raise Orca2Error(f"{s['failed']} of {s['prompts']} student requests failed; re-running retries only those")
        return {k: s[k] for k in ("prompts", "samples", "cached_at_start", "tokens_per_s")}
    if name == "judge":
        return {k: v for k, v in load("judge").run(cfg).items() if k != "output"}
    if name == "pairs":
        return {k: v for k, v in load("pairs").run(cfg).items() if isinstance(v, (int, float)) or v is None}
    if name in ("train", "control"):
        import shutil

        if not resume and Path(cfg.output).exists():
            shutil.rmtree(cfg.output)
        if name == "train":  # the round's pairs may have been rebuilt since their log-probs were stored
            from orca2.train.preference import drop_stale_reference_logps

            drop_stale_reference_logps(cfg.data[0])
        summary = load("train").run(dataclasses.replace(cfg, resume=resume or cfg.resume))
        if summary.get("stopped"):
            raise Orca2Error("training stopped early (stop_after); run again to resume it")
        stage = summary["stages"][0]
        return {k: stage.get(k) for k in ("steps", "examples", "reference_seconds", "seconds")}
    report = load("eval").run(cfg)
    return {c: {b: round(o["accuracy"], 4) for b, o in s["overall"].items()} for c, s in report["benchmarks"].items()}


def sample_served(it: IterateConfig, cfg: Any) -> dict[str, Any]:
    """π_t served for the step (`serve`), asked through the OpenAI-compatible path."""
    from orca2.models import model_fingerprint
    from orca2.serve import served

    model = cfg.student.partition(":")[2]
    name = f"{it.served_name}-{model_fingerprint(cfg.student)[:12]}"  # the cache tells π_t from π_t-1
    log_file = Path(cfg.output).with_name("server.log")
    with served(it.serve, model, log_file, timeout=it.serve_timeout, name=name) as url:
        client = dataclasses.replace(cfg.client, base_url=url)
        return load("sample").run(dataclasses.replace(cfg, student=f"openai:{name}", client=client))


def best_round(run: Any, it: IterateConfig) -> dict[str, Any]:
    """Accuracy of every round (round 0: the SFT student) on the eval's first system prompt and benchmark."""
    manifest = run.manifest

    def accuracy(counts: dict[str, Any]) -> float:
        first = next(iter(counts.values()))
        return next(iter(first.values()))

    table = {"0": accuracy(manifest["stages"]["eval"]["counts"]["student"])}
    table.update({t: accuracy(r["eval"]["counts"]) for t, r in manifest["rounds"].items() if "eval" in r})
    best = max(table, key=lambda t: (table[t], -int(t)))
    link = run.dir / "iterate" / "best"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(Path(policy(run, int(best))).resolve())
    manifest["iterate"] = {"accuracy_by_round": table, "best_round": int(best), "best_model": str(link)}
    if it.control:
        manifest["iterate"]["control_accuracy_by_round"] = {
            t: accuracy(r["control_eval"]["counts"]) for t, r in manifest["rounds"].items() if "control_eval" in r
        }
    manifest["iterate"]["report"] = str(rounds_report(run, it) / "report.md")
    run.save()
    return manifest["iterate"]


def rounds_report(run: Any, it: IterateConfig) -> Path:
    """iterate/report.{md,json,png}: the SFT start, each round and its control on the same held-out items —
    accuracies, paired gains with CIs and McNemar's p — and the wall-clock of every phase."""
    from orca2.eval.evaluate import items_path
    from orca2.eval.report import rounds_report as write_report

    condition = run.configs["eval"]["student"].system[0]
    start = items_path(run.paths["eval"] / "student", condition)
    runs = [{"label": "SFT start", "round": 0, "series": "start", "items": start}]
    comparisons = []
    for t in range(1, it.rounds + 1):
        items = items_path(run.paths["eval"] / f"round-{t}", condition)
        runs.append({"label": f"round {t}", "round": t, "series": f"{it.recipe} {it.objective}", "items": items})
        comparisons.append((f"round {t}", "SFT start"))
        if it.control:
            items = items_path(run.paths["eval"] / f"control-{t}", condition)
            runs.append({"label": f"control {t}", "round": t, "series": "SFT control (equal steps)", "items": items})
            comparisons += [(f"round {t}", f"control {t}"), (f"control {t}", "SFT start")]
    stages = run.manifest["stages"]
    phases = {"0 (SFT start)": {"train": stages["train"]["seconds"], "eval": stages["eval"]["seconds"]}}
    notes = []
    for t, r in sorted(run.manifest["rounds"].items(), key=lambda x: int(x[0])):
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
            phases[t].update({"control train": r["control"]["seconds"], "control eval": r["control_eval"]["seconds"]})
        c = r["sample"]["counts"]
        speed = f"{c['tokens_per_s']:.1f} tokens/s" if c.get("tokens_per_s") else "read from the cache"
        notes.append(
            f"round {t}: {c['samples']} samples of {c['prompts']} prompts ({speed}); "
            f"{r['train']['counts']['steps']} optimizer steps"
            + (" (the control: as many SFT steps)" if it.control else "")
        )
    write_report(runs, comparisons, run.dir / "iterate", phases, notes)
    return run.dir / "iterate"


# A step of `orca2 run` only (no `run` of its own): its rounds need the run's folder, tasks, traces and student.
STAGE = Stage("iterate", IterateConfig, None, wire=wire, files=files, step=step, prepare=prepare)
