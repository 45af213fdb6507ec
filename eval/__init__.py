"""orca2.eval: benchmarks as data, answer scoring, strategy-usage analysis, reports."""
