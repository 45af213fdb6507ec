"""The fused-loss benchmark script itself runs end to end (tiny shape): CSV, PNG, ratios, same losses."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fused_ce.py"


def test_benchmark_runs_on_a_tiny_shape(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "64,16,300", "--rounds", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_out" / "fused_ce_part.csv")))
    assert {(r["impl"], r["f"]) for r in rows} == {
        (i, f) for i in ("naive", "torch_chunked", "orca2") for f in ("1.0", "0.5", "0.2")
    }
    for r in rows:
        assert float(r["time_ms"]) > 0 and r["peak_mb"] != ""
        if r["impl"] != "naive":
            assert float(r["loss_rel_diff_vs_naive"]) < 1e-5 and float(r["time_vs_naive"]) > 0
    assert (tmp_path / "bench_out" / "fused_ce_part.png").stat().st_size > 10_000
    assert "time/naive" in done.stdout


def test_dpo_benchmark_runs_on_a_tiny_head(tmp_path):
    script = SCRIPT.parent / "bench_dpo.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--shape", "2,32,16,300", "--repeats", "2", "--rounds", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["bench"], r["impl"]): r for r in csv.DictReader(open(tmp_path / "bench_out" / "dpo.csv"))}
    naive, fused = rows[("dpo_head", "naive")], rows[("dpo_head", "fused")]
    assert abs(float(naive["loss"]) - float(fused["loss"])) < 1e-5 and float(fused["time_s_median"]) > 0
    assert "fused vs naive DPO head step: memory" in done.stdout
