#!/usr/bin/env bash
# The issue-22 table on this CPU: every task family under full attention, LazyPrefill(), Recycle(),
# both, and StreamingLLM at Recycle()'s KV budget, for one model and one length, niced.
#   scripts/cpu_evals.sh MODEL LENGTH OUT
# MODEL: a registry name (smollm2, gemma3-270m, qwen2.5-coder-0.5b) or a GGUF path.
# Env: SAMPLES (default 5), SEED (default 100: prompts no earlier run saw), DEPTHS (default "0.25 0.75"),
# TASKS (default: all seven families), THREADS (default 2), PPL (perplexity context, default LENGTH;
# 0 = none), PPL_DECODE (default 128). 5 depth families x 2 depths + cwe + fwe = 12 prompts a sample.
# Runs several of these at once (one per model) with THREADS=1 rather than one with 2 threads: the
# decode steps of these small models do not scale to two threads on this machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=$1 LENGTH=$2 OUT=$3
TASKS=${TASKS:-"niah_single niah_multikey niah_multivalue vt qa cwe fwe"}
PPL=${PPL:-$LENGTH}
exec nice -n 19 python -m pylazy eval --model "$MODEL" --lengths "$LENGTH" --tasks $TASKS \
    --depths ${DEPTHS:-0.25 0.75} --samples "${SAMPLES:-5}" --seed "${SEED:-100}" \
    --ppl-tokens "$PPL" --ppl-decode "${PPL_DECODE:-128}" --threads "${THREADS:-2}" --no-progress \
    --out "$OUT" \
    --policy full='{}' \
    --policy 'LazyPrefill()={"lazy": LazyPrefill()}' \
    --policy 'Recycle()=lambda L: {"recycle": Recycle(k=L // 8)}' \
    --policy 'both=lambda L: {"lazy": LazyPrefill(), "recycle": Recycle(k=L // 8)}' \
    --policy 'StreamingLLM=lambda L: {"recycle": StreamingWindow(sinks=4, window=L // 8 - 4)}'
