#!/usr/bin/env bash
# Reference run for docs/eval/README.md: llama.cpp (llama-cpp-python, flash attention), full
# attention, same tasks and depths as run_eval.sh. Usage: run_reference.sh "LENGTHS" [OUT]
set -euo pipefail
OUT=${2:-out/eval}
for L in $1; do
  python -m pylazy.eval.runner --backend llama_cpp --lengths "$L" --tasks ${TASKS:-niah_single niah_multikey} \
    --depths 0.1 0.5 0.9 --threads 1 --ppl-tokens 0 --no-progress --out "$OUT/llama_cpp_$L" \
    --policy full='{"flash_attn": True}'
done
