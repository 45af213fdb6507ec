"""Where the wrong solutions of a synthetic word-problem eval go wrong first (the loop demo's error census).

Each wrong reply is compared line by line with the item's exact worked steps (`meta.synthetic.steps`, the
numbering "1. " stripped); its first differing line is classified:

- `slip <op>`: the same operands and operation as the exact step, another result ("62 - 30 = 38");
- `wrong operation`, `wrong operand`: another operation, or another number carried or copied;
- `stops early`: the reply ends (or states the answer) before the steps do;
- `other`: a line with no computation where one belongs, or anything else.

    .venv/bin/python scripts/first_errors.py runs/loop-demo/eval/student/cautious/items.jsonl [more items.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

STEP = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)")
NUMBERED = re.compile(r"^\d+\.\s*")


def first_error(reply: str, steps: list[str]) -> str:
    lines = [NUMBERED.sub("", line) for line in reply.splitlines() if line.strip()]
    for i, exact in enumerate(steps):
        if i >= len(lines):
            return "stops early"
        if lines[i] == exact:
            continue
        want, got = STEP.findall(exact), STEP.findall(lines[i])
        if want and not got:
            return "stops early" if "now" in lines[i] or "answer" in lines[i].lower() else "other"
        if not want or not got:
            return "other"
        for (a, op, b, result), (x, op2, y, value) in zip(want, got):  # "k × m = n, so t + n = s": two computations
            if op != op2:
                return "wrong operation"
            if (a, b) != (x, y):
                return "wrong operand"
            if result != value:
                return f"slip {op}"
        return "other"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="+", help="items.jsonl of an eval condition")
    args = parser.parse_args()
    for path in args.items:
        counts: Counter = Counter()
        total = 0
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                meta = record["meta"]
                if "synthetic" not in meta or meta["synthetic"]["kind"] != "word-problem":
                    continue
                total += 1
                if not meta["correct"]:
                    counts[first_error(record["messages"][-1]["content"], meta["synthetic"]["steps"])] += 1
        wrong = sum(counts.values())
        print(f"{path}: {wrong} of {total} wrong")
        for kind, n in counts.most_common():
            print(f"  {kind:<16} {n:4d}  {n / wrong:6.1%}")


if __name__ == "__main__":
    main()
