"""How long `orca2 --help` and `orca2 STAGE --help` take, beside what the interpreter and click alone take.

    .venv/bin/python benchmarks/bench_cli.py [--repeat 9]

Each command runs in a fresh process `repeat` times; the table gives the median in milliseconds and the time
above `python -c "import click"` (the floor any click CLI pays). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from results import save_and_print

ORCA2 = [sys.executable, "-m", "orca2"]
COMMANDS = [
    "",
    "tasks",
    "select",
    "generate",
    "erase",
    "sample",
    "judge",
    "pairs",
    "instruct",
    "persona",
    "persona infer",
    "persona augment",
    "train",
    "eval",
    "run",
]


def median_ms(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    python = median_ms([sys.executable, "-c", "pass"], args.repeat)
    click = median_ms([sys.executable, "-c", "import click"], args.repeat)
    rows = [
        {"what": "python -c pass", "ms": round(python, 1), "above_click_ms": None},
        {"what": "python -c 'import click'", "ms": round(click, 1), "above_click_ms": 0.0},
    ]
    for name in COMMANDS:
        ms = median_ms(ORCA2 + name.split() + ["--help"], args.repeat)
        rows.append(
            {
                "what": f"orca2 {name} --help".replace("  ", " "),
                "ms": round(ms, 1),
                "above_click_ms": round(ms - click, 1),
            }
        )
    save_and_print("cli", rows)


if __name__ == "__main__":
    main()
