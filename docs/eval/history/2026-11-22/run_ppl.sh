#!/usr/bin/env bash
# The perplexity section of docs/eval/README.md: 2048 tokens of natural text as context, the next
# 512 teacher-forced through decode steps under each policy. Usage: run_ppl.sh [OUT]
set -euo pipefail
OUT=${1:-out/eval/ppl_2048}
python -m pylazy.eval.runner --tasks --lengths 2048 --ppl-tokens 2048 --ppl-decode 512 \
  --threads 1 --no-progress --out "$OUT" \
  --policy full='{}' \
  --policy lazy_default='{"lazy": LazyPrefill()}' \
  --policy recycle_k256='{"recycle": Recycle(k=256, stride=16)}' \
  --policy recycle_dyn95='{"recycle": Recycle(k=256, stride=16, dynamic_threshold=0.95)}' \
  --policy streaming='{"recycle": StreamingWindow(sinks=4, window=252)}'
