"""Stage `eval`: a model on benchmarks under empty / cautious / strategy system prompts; scored, analysed, reported.

    orca2 eval --model runs/student/model --bench gsm8k,bbh --system empty,cautious -o reports/student

For each condition (system prompt) and benchmark task, items are asked through orca2.ask like every
other stage (any model spec; the response cache means a re-run skips finished items). Each item's response,
extracted answer, correctness and detected strategy are saved as records in <output>/<condition>/items.jsonl.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from orca2.answers import score
from orca2.ask import Request, ask
from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.eval.benchmarks import choice_format, default_data_dir, load_items, load_registry, select
from orca2.eval.stats import wilson
from orca2.eval.usage import CATEGORIES, classify
from orca2.io import atomic_text, write_records
from orca2.models import SPEC_FORMS, ClientConfig, ModelSpec, Sampling, check_local_model, parse_model
from orca2.prompts import generic_prompt
from orca2.records import with_system_prompt
from orca2.stages import Stage
from orca2.strategies import Library

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    model: str = option(help="The model: HF folder | " + SPEC_FORMS + ".")
    output: str = option(help="Report folder.", short="-o")
    bench: tuple[str, ...] = option(
        ("gsm8k", "bbh"), "Benchmarks (gsm8k, bbh, bbh/<task>, arc-challenge, mmlu, ...).", split=","
    )
    system: tuple[str, ...] = option(
        ("empty",), "System-prompt conditions: empty, cautious, strategy:NAME, or a text file.", split=","
    )
    label: str | None = option(None, "The model's name in reports (default: derived from model).")
    benchmarks: tuple[str, ...] = option((), "Extra benchmark YAML files.")
    data_dir: str | None = option(None, "Benchmark data folder (default $ORCA2_DATA_DIR, else ../shared/data).")
    limit: int | None = option(None, "Items per task.")
    strategies: tuple[str, ...] = option((), "Extra strategy files, for strategy:NAME conditions.")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(help="How replies are sampled.", factory=lambda: Sampling(max_tokens=512), flatten=True)

    def __post_init__(self) -> None:
        parse_model(self.model, paths=True)
        if not self.system or not self.bench:
            raise Orca2Error("eval: give at least one --bench and one --system condition")


def model_spec(model: str) -> ModelSpec:
    """The model to evaluate, checked before anything runs: a bare folder or .gguf path means local:<path>."""
    spec = parse_model(model, paths=True)
    if spec.scheme == "local":
        check_local_model(spec.target)
    return spec


def default_label(spec: ModelSpec) -> str:
    """A model's name in reports: the folder name (its parent for a run's .../model folder), else the spec."""
    if spec.scheme != "local" or spec.target == "default":
        return str(spec)
    path = Path(spec.target)
    return path.parent.name if path.name == "model" else path.name


def system_text(condition: str, library: Library, task: str) -> str:
    """The system prompt a condition stands for."""
    if condition.startswith("strategy:"):
        return library.get(condition.split(":", 1)[1]).system_text(task)
    return generic_prompt(condition)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every (condition, benchmark task); write items, report.json, report.md and plots."""
    from orca2.eval.report import plot_accuracy, plot_usage, render_report

    spec = model_spec(cfg.model)
    label = cfg.label or default_label(spec)
    library = Library.load(cfg.strategies)
    registry = load_registry(cfg.benchmarks)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    chosen = select(registry, cfg.bench)
    roleplay = {}  # OrcaBench entries: generation metrics, not accuracy (eval/orcabench.py)
    for bench in [b for b, _ in chosen if b.loader == "orcabench"]:
        from orca2.eval.orcabench import evaluate as orcabench

        roleplay[bench.name] = orcabench(spec, label, bench, cfg, Path(cfg.output))
    chosen = [(b, t) for b, t in chosen if b.loader != "orcabench"]
    if not chosen:
        report = {"model": label, "spec": str(spec), "orcabench": roleplay}
        with atomic_text(Path(cfg.output) / "report.json") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        save_config(cfg, Path(cfg.output) / "config.yaml")
        return report
    items = [
        (bench, load_items(bench, task, data_dir, cfg.limit)) for bench, task in chosen
    ]  # one entry per --bench name
    for condition in cfg.system:
        system_text(condition, library, "x")  # unknown names fail now, before any request
    plan = [(condition, bench, record) for condition in cfg.system for bench, records in items for record in records]
    requests = [
        Request(
            with_system_prompt(record["messages"], system_text(condition, library, record["task"])),
            {**record["meta"], "answer": record.get("answer"), "task": record["task"]},
            choice_format(bench, record),
        )
        for condition, bench, record in plan
    ]
    plan = [(condition, record) for condition, _, record in plan]
    output = Path(cfg.output)
    by_condition: dict[str, list[dict[str, Any]]] = {c: [] for c in cfg.system}
    with ask(spec, requests, cfg.sampling, cfg.client, desc=f"eval {label}") as answers:
        failed = {}
        for i, ((condition, record), request) in enumerate(zip(plan, requests)):
            response = answers.response(i)
            error = answers.error(i) if response is None else None
            if response is None:
                failed[answers.keys[i]] = error
            item = scored_item(record, condition, label, request.messages, response, error)
            by_condition[condition].append(item)
    report = {
        "model": label,
        "spec": str(spec),
        "conditions": list(cfg.system),
        "benchmarks": {},
        "failed": len(failed),
    }
    if roleplay:
        report["orcabench"] = roleplay
    for condition, rows in by_condition.items():
        write_records(items_path(output, condition), rows)
        report["benchmarks"].setdefault(condition, summarise(rows, {b.name: b for b, _ in chosen}))
    with atomic_text(output / "report.json") as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    plot_accuracy([report], output / "accuracy.png")
    plot_usage([report], output / "strategy_usage.png")
    with atomic_text(output / "report.md") as f:
        f.write(render_report([report], registry))
    save_config(cfg, output / "config.yaml")
    if failed:
        raise Orca2Error(
            f"{len(failed)} of {len(plan)} items got no response (first: {next(iter(failed.values()))}); "
            f"the rest are scored in {output}/report.md; re-running retries only the missing ones"
        )
    return report


def scored_item(
    record: dict[str, Any],
    condition: str,
    label: str,
    messages: list[dict[str, str]],
    response: dict[str, Any] | None,
    error: str | None,
) -> dict[str, Any]:
    """One benchmark item as asked and answered: the reply, the extracted answer, correctness, the strategy the
    reply used, its length; an unanswered item counts as wrong, with its error."""
    meta = {**record["meta"], "condition": condition, "model": label}
    if response is None:
        meta.update(error=error, correct=False, strategy_used=None)
        content = ""
    else:
        content = response["contents"][0]
        scored = score(content, record.get("answer"), record["meta"].get("answer_type"))
        meta.update(
            extracted_answer=scored.value,
            extraction=scored.method,
            correct=scored.correct,
            strategy_used=classify(content),
            response_words=len(content.split()),
            completion_tokens=response["completion_tokens"],
            finish_reason=response["finish_reasons"][0],
        )
    reply = messages + [{"role": "assistant", "content": content}]
    return {"id": record["id"], "task": record["task"], "messages": reply, "answer": record.get("answer"), "meta": meta}


def items_path(output: str | Path, condition: str) -> Path:
    """Where eval writes one condition's scored items."""
    return Path(output) / condition.replace("/", "_").replace(":", "-") / "items.jsonl"


def summarise(rows: list[dict[str, Any]], benches: dict[str, Any]) -> dict[str, Any]:
    """Per task: accuracy with a 95 % CI, strategy usage, mean response length; per benchmark: micro or macro."""
    tasks: dict[str, dict[str, Any]] = {}
    for row in rows:
        t = tasks.setdefault(
            row["task"],
            {
                "benchmark": row["meta"]["benchmark"],
                "n": 0,
                "correct": 0,
                "words": 0,
                "usage": {c: 0 for c in CATEGORIES},
                "failed": 0,
            },
        )
        t["n"] += 1
        t["correct"] += bool(row["meta"]["correct"])
        t["words"] += row["meta"].get("response_words", 0)
        if row["meta"].get("strategy_used"):
            t["usage"][row["meta"]["strategy_used"]] += 1
        else:
            t["failed"] += 1
    out: dict[str, Any] = {"tasks": {}, "overall": {}}
    for name, t in sorted(tasks.items()):
        low, high = wilson(t["correct"], t["n"])
        out["tasks"][name] = {
            "benchmark": t["benchmark"],
            "n": t["n"],
            "correct": t["correct"],
            "accuracy": t["correct"] / t["n"],
            "ci95": [low, high],
            "mean_words": t["words"] / t["n"],
            "usage": {k: v / t["n"] for k, v in t["usage"].items()},
            "failed": t["failed"],
        }
    for bench_name, bench in benches.items():
        mine = [v for v in out["tasks"].values() if v["benchmark"] == bench_name]
        if not mine:
            continue
        n, correct = sum(v["n"] for v in mine), sum(v["correct"] for v in mine)
        if bench.aggregate == "macro" and len(mine) > 1:
            acc = sum(v["accuracy"] for v in mine) / len(mine)
            # CI of a mean of independent task accuracies: 1.96 sqrt(Σ var_i) / k, each var_i from the
            # Agresti-Coull estimate (c + 2) / (n + 4), which stays positive at 0 % and 100 %
            variances = [
                ((v["correct"] + 1.92) / (v["n"] + 3.84))
                * (1 - (v["correct"] + 1.92) / (v["n"] + 3.84))
                / (v["n"] + 3.84)
                for v in mine
            ]
            half = 1.96 * math.sqrt(sum(variances)) / len(mine)
            ci = [max(0.0, acc - half), min(1.0, acc + half)]
        else:
            acc, ci = correct / n, list(wilson(correct, n))
        out["overall"][bench_name] = {
            "n": n,
            "correct": correct,
            "accuracy": acc,
            "ci95": ci,
            "aggregate": bench.aggregate,
            "tasks": len(mine),
            "reference": bench.reference,
        }
    return out


def show(report: dict[str, Any], cfg: EvalConfig) -> str:
    """What `orca2 eval` prints: one line per OrcaBench run and per condition × benchmark, then the report."""
    lines = []
    for name, bench in report.get("orcabench", {}).items():
        m = bench["metrics"]
        lines.append(
            f"{report['model']} | {name}: BLEU {m['bleu']['value']:.2f}, ROUGE-L {m['rougeL']['value']:.3f}, "
            f"BigFive cosine {m['cosine']['value']:.3f} ({bench['users']} users); "
            f"report: {cfg.output}/orcabench/report.md"
        )
    for condition, summary in report.get("benchmarks", {}).items():
        for name, o in summary["overall"].items():
            lines.append(
                f"{report['model']} | {condition} | {name}: {100 * o['accuracy']:.1f}% "
                f"[{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}] over {o['n']} items"
            )
    if "benchmarks" in report:
        lines.append(f"report: {cfg.output}/report.md")
    return "\n".join(lines)


def wire(run_: Any) -> dict[str, Any]:
    """In `orca2 run`: the student under the section's conditions (default cautious) on the run's held-out
    benchmark — `heldout:`, OrcaBench after persona, else GSM8K — and, with `base_model`, the base the same way."""
    import dataclasses

    section = dict(run_.data.get("eval") or {})
    base_model = section.pop("base_model", None)
    base_system = tuple(section.pop("base_system", ()) or ())
    section.setdefault("system", ["cautious"])
    if "persona" in run_.stages:  # OrcaBench on the users persona build held out
        section.setdefault("bench", ["orcabench"])
    section.setdefault("bench", ["heldout"] if "heldout" in run_.data else ["gsm8k"])
    model = str(run_.paths["student"] / "model") if "train" in run_.stages else section.pop("model", None)
    if model is None:
        raise Orca2Error(f"{run_.source}: eval needs eval.model when the pipeline has no train stage")
    own = "heldout" in run_.data or "persona" in run_.stages
    extra = [str(run_.paths["eval"] / "benchmarks.yaml")] if own else []
    section.update(
        output=str(run_.paths["eval"] / "student"),
        label="student",
        benchmarks=tuple(extra) + tuple(section.pop("benchmarks", ()) or ()),
    )
    run_.cached(section)
    section["model"] = model
    student = run_.build(EvalConfig, section, "eval.")
    base = None
    if base_model:
        base = dataclasses.replace(
            student,
            model=base_model,
            label="base",
            output=str(run_.paths["eval"] / "base"),
            system=base_system or student.system,
        )
    return {"student": student, "base": base}


def files(run_: Any, cfgs: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    inputs = [run_.paths["student"] / "model"] if "train" in run_.stages else []
    inputs += [run_.paths["heldout"]] if "heldout" in run_.data else []
    inputs += [run_.paths["persona"] / "pcip.heldout.jsonl"] if "persona" in run_.stages else []
    return inputs, [run_.paths["eval"] / "student" / "report.json"]


def step(run_: Any, cfgs: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The base (when configured), then the student; their comparison; accuracies (or OrcaBench metrics) by
    condition and benchmark for the manifest."""
    from orca2.eval.report import compare

    reports = {}
    if cfgs["base"] is not None:
        reports["base"] = run(cfgs["base"])
    reports["student"] = run(cfgs["student"])
    if cfgs["base"] is not None and "benchmarks" in reports["student"]:
        compare([cfgs["base"].output, cfgs["student"].output], str(run_.paths["eval"]))
    if cfgs["base"] is not None and "orcabench" in reports["student"]:
        from orca2.eval.orcabench import compare_reports

        with atomic_text(run_.paths["eval"] / "orcabench-compare.md") as f:
            f.write(compare_reports({who: r["orcabench"] for who, r in reports.items()}))
    return {who: accuracies(r) for who, r in reports.items()}


def accuracies(report: dict[str, Any]) -> dict[str, Any]:
    """{condition: {benchmark: accuracy}} and {orcabench: {metric: value}}, rounded to 4 places."""
    out = {
        c: {b: round(o["accuracy"], 4) for b, o in s["overall"].items()}
        for c, s in report.get("benchmarks", {}).items()
    }
    for b, o in report.get("orcabench", {}).items():
        out[b] = {m: round(v["value"], 4) for m, v in o["metrics"].items()}
    return out


def prepare(run_: Any) -> None:
    """After persona: OrcaBench's entry (the held-out users' records, their traits, the judge) in the run's
    benchmarks.yaml, written just before eval's files are hashed."""
    if "persona" not in run_.stages:
        return

    def write() -> None:
        d = run_.paths["persona"].resolve()
        run_.paths["eval"].mkdir(parents=True, exist_ok=True)
        judge = run_.configs["persona"]["infer"].judge
        (run_.paths["eval"] / "benchmarks.yaml").write_text(
            f"orcabench:\n  loader: orcabench\n  path: {d / 'pcip.heldout.jsonl'}\n  traits: {d / 'traits.jsonl'}\n"
            f"  judge: {judge}\n"
        )

    run_.before["eval"] = write


STAGE = Stage("eval", EvalConfig, run, show, wire, files, step, prepare)
