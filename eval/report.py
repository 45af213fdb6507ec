"""Reports: Markdown tables (Orca 2 Table 1 style, with the paper's numbers where it gives them) and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from orca2.errors import Orca2Error
from orca2.eval.stats import mcnemar_exact, newcombe, paired_counts, paired_difference, wilson
from orca2.eval.usage import CATEGORIES


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_report(reports: list[dict[str, Any]], registry: dict[str, Any] | None = None) -> str:
    """Comparison table (rows: model × condition; columns: benchmarks, accuracy ± 95 % CI), per-task tables, usage."""
    benches = sorted({b for r in reports for c in r["benchmarks"].values() for b in c["overall"]})
    lines = [
        "# Evaluation report",
        "",
        "Accuracy in %, with the 95 % confidence interval (Wilson for one task; for a "
        "macro-average over tasks, the normal interval of the mean with Agresti-Coull task variances). "
        "Zero-shot, greedy unless configured.",
        "",
        "| model | system prompt | " + " | ".join(benches) + " |",
        "|---|---|" + "---:|" * len(benches),
    ]
    for r in reports:
        for condition, summary in r["benchmarks"].items():
            cells = []
            for b in benches:
                o = summary["overall"].get(b)
                cells.append(
                    "–" if o is None else f"{_pct(o['accuracy'])} [{_pct(o['ci95'][0])}, {_pct(o['ci95'][1])}]"
                )
            lines.append(f"| {r['model']} | {condition} | " + " | ".join(cells) + " |")
    references: dict[str, dict[str, float]] = {}
    for r in reports:
        for summary in r["benchmarks"].values():
            for b, o in summary["overall"].items():
                for model, value in (o.get("reference") or {}).items():
                    references.setdefault(model, {})[b] = value
    for model, values in sorted(references.items()):
        lines.append(
            f"| {model} (paper) | (their setup) | "
            + " | ".join(f"{values[b]:.2f}" if b in values else "–" for b in benches)
            + " |"
        )
    for r in reports:
        for condition, summary in r["benchmarks"].items():
            lines += [
                "",
                f"## {r['model']} — {condition}",
                "",
                "| task | n | accuracy % | 95 % CI | mean words | " + " | ".join(CATEGORIES) + " |",
                "|---|---:|---:|---|---:|" + "---:|" * len(CATEGORIES),
            ]
            for task, t in summary["tasks"].items():
                lines.append(
                    f"| {task} | {t['n']} | {_pct(t['accuracy'])} | [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}] | "
                    f"{t['mean_words']:.0f} | " + " | ".join(f"{100 * t['usage'][c]:.0f}%" for c in CATEGORIES) + " |"
                )
    return "\n".join(lines) + "\n"


def _gain_rows(label: str, base_cells: list[tuple[str, dict]], other_cells: list[tuple[str, dict]]) -> list[str]:
    """Rows for one task (or benchmark): each of `other`'s conditions against the base's best condition."""
    if not base_cells:
        return []
    best_condition, best = max(base_cells, key=lambda x: x[1]["accuracy"])
    rows = []
    for condition, cell in other_cells:
        d, low, high = newcombe(cell["correct"], cell["n"], best["correct"], best["n"])
        rows.append(
            f"| {label} | {best_condition} | {_pct(best['accuracy'])} | {condition} | {_pct(cell['accuracy'])} | "
            f"{100 * d:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | {'yes' if low > 0 or high < 0 else 'no'} |"
        )
    return rows


def _cells(report: dict[str, Any], level: str, name: str) -> list[tuple[str, dict]]:
    return [(c, s[level][name]) for c, s in report["benchmarks"].items() if name in s[level]]


def render_gains(base: dict[str, Any], other: dict[str, Any]) -> str:
    """Per task, and per micro-averaged benchmark: `other` under each of its conditions against `base`
    under its best condition there."""
    lines = [
        f"## Gain of {other['model']} over {base['model']} (its best condition per task)",
        "",
        "| task | base: best condition | base % | "
        + f"{other['model']}: condition | {other['model']} % | gain (pp) | 95 % CI | CI excludes 0 |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for task in sorted({t for s in other["benchmarks"].values() for t in s["tasks"]}):
        lines += _gain_rows(task, _cells(base, "tasks", task), _cells(other, "tasks", task))
    for bench in sorted({b for s in other["benchmarks"].values() for b in s["overall"]}):
        others = _cells(other, "overall", bench)
        if any(cell["aggregate"] == "macro" for _, cell in others):
            continue  # a difference CI for a micro-average only (counts are pooled over tasks)
        lines += _gain_rows(f"**{bench} (all tasks)**", _cells(base, "overall", bench), others)
    return "\n".join(lines) + "\n"


def _whiskers(cells: list[dict[str, Any] | None]) -> list[list[float]]:
    """Error bars (in points) below and above each accuracy from its 95 % CI; clamped at 0, because at 100 %
    the Wilson bound can round a hair below the accuracy (matplotlib refuses negative error bars)."""
    return [
        [max(0.0, 100 * (c["accuracy"] - c["ci95"][0])) if c else 0 for c in cells],
        [max(0.0, 100 * (c["ci95"][1] - c["accuracy"])) if c else 0 for c in cells],
    ]


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(reports: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: benchmark accuracy per model × condition, with 95 % CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{r['model']} / {c}", s["overall"]) for r in reports for c, s in r["benchmarks"].items()]
    benches = sorted({b for _, o in series for b in o})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    for k, (name, overall) in enumerate(series):
        xs = [i + k * width for i in range(len(benches))]
        acc = [100 * overall[b]["accuracy"] if b in overall else 0 for b in benches]
        ax.bar(xs, acc, width, yerr=_whiskers([overall.get(b) for b in benches]), capsize=3, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(benches))])
    ax.set_xticklabels(benches)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy with 95 % confidence intervals")
    return save_figure(fig, path)


def plot_usage(reports: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per model, condition and task: how often each strategy shows in the responses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (f"{task}\n{r['model']} / {condition}", t["usage"])
        for r in reports
        for condition, s in r["benchmarks"].items()
        for task, t in s["tasks"].items()
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(bars) + 2), 4.8))
    bottom = [0.0] * len(bars)
    for category in CATEGORIES:
        values = [100 * usage[category] for _, usage in bars]
        ax.bar(range(len(bars)), values, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([name for name, _ in bars], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("% of responses")
    ax.set_title("Strategy used in the responses, per task")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def compare(folders: list[str], output: str) -> str:
    """One table and plot from several finished report folders."""
    reports = []
    for folder in folders:
        path = Path(folder) / "report.json"
        if not path.exists():
            raise Orca2Error(f"{folder}: no report.json (run `orca2 eval ... -o {folder}` first)")
        reports.append(orjson.loads(path.read_bytes()))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    text = render_report(reports)
    for other in reports[1:]:
        text += "\n" + render_gains(reports[0], other)
    (out / "compare.md").write_text(text)
    plot_accuracy(reports, out / "compare.png")
    plot_usage(reports, out / "compare_usage.png")
    return text


def rounds_report(
    runs: list[dict[str, Any]],
    comparisons: list[tuple[str, str]],
    output: Path,
    phases: dict[str, dict[str, float]] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Models scored on the same items, compared pairwise: report.{json,md,png} in `output`.

    runs: {"label", "round", "series", "items"} — items is an eval items.jsonl (meta.correct per item id);
    comparisons: (label, other) pairs, each with the paired gain (Newcombe method 10) and McNemar's exact p;
    phases: seconds per round and phase, rendered as a table.
    """
    from orca2.io import read_records

    correct = {
        r["label"]: {row["id"]: bool(row["meta"].get("correct")) for row in read_records(r["items"])} for r in runs
    }
    rows = []
    for r in runs:
        c, n = sum(correct[r["label"]].values()), len(correct[r["label"]])
        rows.append(
            {
                "label": r["label"],
                "round": r["round"],
                "series": r["series"],
                "n": n,
                "correct": c,
                "accuracy": c / n if n else 0.0,
                "ci95": list(wilson(c, n)),
            }
        )
    gains = []
    for x, y in comparisons:
        a, b, c, d = paired_counts(correct[x], correct[y])
        diff, low, high = paired_difference(a, b, c, d)
        gains.append(
            {
                "model": x,
                "against": y,
                "n": a + b + c + d,
                "both": a,
                "only_model": b,
                "only_against": c,
                "neither": d,
                "gain": diff,
                "ci95": [low, high],
                "mcnemar_p": mcnemar_exact(b, c),
            }
        )
    report = {"runs": rows, "comparisons": gains, "phases_seconds": phases or {}, "notes": notes or []}
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    (output / "report.md").write_text(render_rounds(report))
    plot_rounds(rows, output / "report.png")
    return report


def render_rounds(report: dict[str, Any]) -> str:
    """The rounds report in Markdown: accuracies, paired comparisons, wall-clock by phase, notes."""
    rows, gains, phases, notes = report["runs"], report["comparisons"], report["phases_seconds"], report["notes"]
    lines = [
        "# Rounds of on-policy learning",
        "",
        "Held-out accuracy on the same items (95 % Wilson CI).",
        "",
        "| model | round | n | accuracy % | 95 % CI |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['label']} | {r['round']} | {r['n']} | {_pct(r['accuracy'])} | [{_pct(r['ci95'][0])}, "
        f"{_pct(r['ci95'][1])}] |"
        for r in rows
    ]
    lines += [
        "",
        "## Paired comparisons",
        "",
        "Gain in points on the same items; 95 % CI by Newcombe's method 10 for paired proportions; "
        "McNemar's exact two-sided p on the discordant items.",
        "",
        "| model | against | n | right only in model | right only in other | gain (pp) | 95 % CI | CI excludes 0 | "
        "McNemar p |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    lines += [
        f"| {g['model']} | {g['against']} | {g['n']} | {g['only_model']} | {g['only_against']} | "
        f"{100 * g['gain']:+.1f} | "
        f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}] | "
        f"{'yes' if g['ci95'][0] > 0 or g['ci95'][1] < 0 else 'no'} | "
        f"{g['mcnemar_p']:.3g} |"
        for g in gains
    ]
    if phases:
        order = ["sample", "judge", "pairs", "reference pass", "train", "eval", "control train", "control eval"]
        names = sorted(
            {k for p in phases.values() for k in p}, key=lambda k: (order.index(k) if k in order else len(order), k)
        )
        lines += [
            "",
            "## Wall-clock by phase (seconds)",
            "",
            "| round | " + " | ".join(names) + " | total |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for t, p in phases.items():
            lines.append(
                f"| {t} | "
                + " | ".join(f"{p[k]:.0f}" if k in p else "–" for k in names)
                + f" | {sum(p.values()):.0f} |"
            )
    lines += [""] + [f"- {note}" for note in notes or []]
    return "\n".join(lines).rstrip() + "\n"


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy by round, one line per series (the loop, its control), with 95 % CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = list(dict.fromkeys(r["series"] for r in rows if r["round"] > 0)) or [
        "start"
    ]  # each line starts at round 0
    start = [r for r in rows if r["round"] == 0]
    for k, name in enumerate(series):
        points = sorted(start + [r for r in rows if r["series"] == name and r["round"] > 0], key=lambda r: r["round"])
        xs = [r["round"] + 0.04 * k for r in points]
        acc = [100 * r["accuracy"] for r in points]
        ax.errorbar(xs, acc, yerr=_whiskers(points), marker="o", capsize=3, label=name)
    ax.set_xticks(sorted({r["round"] for r in rows}))
    ax.set_xlabel("round (0: the SFT start)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy by round, 95 % CIs")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
