#!/usr/bin/env bash
# The evaluation in docs/eval/README.md: one process per context length (so a partial run
# keeps its finished lengths), then pylazy.eval.merge joins them. Usage: run_eval.sh LENGTH [OUT]
set -euo pipefail
L=$1; OUT=${2:-out/eval}
python -m pylazy.eval.runner --lengths "$L" --tasks ${TASKS:-niah_single niah_multikey} \
  --depths 0.1 0.5 0.9 --threads 1 --ppl-tokens 0 --no-progress --out "$OUT/pylazy_$L" \
  --policy full='{}' \
  --policy lazy_default='{"lazy": LazyPrefill()}' \
  --policy lazy_light='{"lazy": LazyPrefill(layers=(0.5, 0.75), keep=(0.7, 0.5))}' \
  --policy recycle_k8='lambda L: {"recycle": Recycle(k=L // 8, stride=16)}' \
  --policy recycle_dyn='{"recycle": Recycle(k=512, stride=16, dynamic_threshold=0.8)}' \
  --policy streaming='{"recycle": StreamingWindow(sinks=4, window=508)}' \
  --policy lazy+recycle='{"lazy": LazyPrefill(), "recycle": Recycle(k=512, stride=16)}'
