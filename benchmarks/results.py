"""Shared by the benchmark scripts: save a table of rows as bench_out/<name>.{json,csv} and print it; start the
loopback server in its own process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

OUT = Path("bench_out")


def save_and_print(name: str, rows: list[dict[str, Any]]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=2))
    with open(OUT / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """The loopback server in its own process, so its CPU is not charged to the client: (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "orca2.testing.loopback", *args], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()
