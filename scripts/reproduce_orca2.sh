#!/usr/bin/env bash
# Reproduce the Orca 2 setup end to end: teacher data with strategy prompts → erasure → progressive SFT on
# 32 GPUs → zero-shot eval with the paper's numbers beside ours. Steps are idempotent: re-running resumes.
#
#   SIZE=13b TEACHER=openai:gpt-4o OPENAI_API_KEY=... scripts/reproduce_orca2.sh
#   SIZE=7b TEACHER=openai:Qwen2.5-72B-Instruct OPENAI_BASE_URL=http://vllm:8000/v1 OPENAI_API_KEY=EMPTY scripts/reproduce_orca2.sh
#
# Inputs you provide (see docs/reproduce.md): data/flan_v2.sft.jsonl, data/chatgpt_5m.sft.jsonl,
# data/gpt4_1m.sft.jsonl (public substitutes for Orca 2's unreleased data) and data/orca2_tasks.jsonl
# (the tasks to answer under strategy prompts, made with `orca2 tasks`).
set -euo pipefail
SIZE=${SIZE:-13b}
TEACHER=${TEACHER:-openai:gpt-4o}
CONF=configs/orca2-$SIZE
DATA=${DATA:-data}
HOSTFILE=${HOSTFILE:-$CONF/hostfile}

orca2 generate --tasks "$DATA/orca2_tasks.jsonl" --assign "$CONF/assignment.yaml" --teacher "$TEACHER" \
    --concurrency 64 --max-tokens 2048 -o "$DATA/orca2_strategies.traces.jsonl"
orca2 erase "$DATA/orca2_strategies.traces.jsonl" -o "$DATA/orca2_strategies.sft.jsonl" --generic cautious \
    --decontaminate "gsm8k:${ORCA2_DATA_DIR:-../shared/data}/gsm8k/test.jsonl" \
    --decontaminate "bbh:${ORCA2_DATA_DIR:-../shared/data}/bbh" --max-tokens 4096
deepspeed --hostfile "$HOSTFILE" --module orca2.train --config "$CONF/train.yaml" --resume
orca2 eval --config "$CONF/eval.yaml"
cat "reports/orca2-$SIZE/report.md"
