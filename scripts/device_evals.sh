#!/usr/bin/env bash
# Needle accuracy (RULER niah single/multikey/multivalue) and perplexity of lazy-prefill and
# recycled-attention settings on SmolLM2, on the GPU machine (scripts/device_run.sh evals): the sweep
# behind the default LazyPrefill/Recycle choices (docs/eval/README.md). Usage: device_evals.sh MODEL OUT
# Env: SAMPLES, SEED, NAMES (the set's policies instead of its own list), ONLY (names of the set's policies to run), TAG (suffix of the output folder, to
# keep several runs of one call apart). SET=recycle runs only recycling settings, SET=lazy only
# aggressive lazy schedules, SET=combo lazy + recycled together; all three at 4K/8K with no perplexity.
# SET=families: the issue-22 table (every task family, full / LazyPrefill() / Recycle() / both /
# StreamingLLM) at 4K/8K; perplexity at 8K context. DEPTHS overrides the depths.
# No plots there: importing matplotlib after llama_cpp segfaulted in the GPU
# machine's Python (2026-11-23, after the table was written); plot results.json locally.
set -uo pipefail
MODEL=$1 OUT=$2
PY=/opt/torch/.venv/bin/python3; [[ -x $PY ]] || PY=$(command -v python3)
# Every policy by name; a set is a list of names (ONLY= narrows it further).
declare -A P=(
  [full]='{}'
  [lazy_default]='{"lazy": LazyPrefill()}'
  [lazy_60_40_20]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.6, 0.4, 0.2))}'
  [lazy_70_50_30]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.7, 0.5, 0.3))}'
  [lazy_80_60_40]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.8, 0.6, 0.4))}'
  [lazy_30_20_10]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.3, 0.2, 0.1))}'
  [lazy_25_15_10]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.25, 0.15, 0.1))}'
  [lazy_20_10_05]='{"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.2, 0.1, 0.05))}'
  [rec_s16]='lambda L: {"recycle": Recycle(k=L // 8, stride=16)}'
  [rec_share0]='lambda L: {"recycle": Recycle(k=L // 8, stride=16, share=0.0)}'
  [rec_s16_p16]='lambda L: {"recycle": Recycle(k=L // 8, stride=16, pool=16)}'
  [rec_s8]='lambda L: {"recycle": Recycle(k=L // 8, stride=8)}'
  [rec_k4_s16]='lambda L: {"recycle": Recycle(k=L // 4, stride=16)}'
  [rec_dyn09]='lambda L: {"recycle": Recycle(k=L // 8, stride=16, dynamic_threshold=0.9)}'
  [stream]='lambda L: {"recycle": StreamingWindow(sinks=4, window=L // 8 - 4, stride=16)}'
  [lazy_r16]='{"lazy": LazyPrefill(reselect=16)}'
  [lazy_r1]='{"lazy": LazyPrefill(reselect=1)}'
  [lazy_w32p16]='{"lazy": LazyPrefill(window=32, pool=16)}'
  [lazy_rec_r1]='lambda L: {"lazy": LazyPrefill(reselect=1), "recycle": Recycle(k=L // 8, stride=16)}'
  [lazy_rec_w32p16]='lambda L: {"lazy": LazyPrefill(window=32, pool=16), "recycle": Recycle(k=L // 8, stride=16)}'
  [lazy_rec]='lambda L: {"lazy": LazyPrefill(), "recycle": Recycle(k=L // 8, stride=16)}'
  [lazy70_rec]='lambda L: {"lazy": LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.7, 0.5, 0.3)), "recycle": Recycle(k=L // 8, stride=16)}'
  [lazy_rec_share0]='lambda L: {"lazy": LazyPrefill(), "recycle": Recycle(k=L // 8, stride=16, share=0.0)}'
)
tasks="niah_single niah_multikey niah_multivalue" depths="0.1 0.3 0.5 0.7 0.9"
case ${SET:-} in
  recycle) names="full rec_s16 rec_share0 rec_s16_p16 rec_s8 rec_k4_s16 stream" lengths=(4096 7936) ppl=0 ;;
  # how far the lazy schedule can go (the GPU issue's 2.5x TTFT at 32K needs ~40 % of token-layers computed)
  lazy) names="full lazy_default lazy_30_20_10 lazy_25_15_10 lazy_20_10_05" lengths=(4096 7936) ppl=0 ;;
  # both methods in one call (lazy prefill, then recycled decode over the lazy stages)
  combo) names="full lazy_default rec_s16 lazy_rec lazy_rec_share0" lengths=(4096 7936) ppl=0 ;;
  # the whole request (issue 17): lazy decode keeps the prompt's selection (reselect=0, the default);
  # lazy_r16 re-selects every 16 steps, lazy_rec both methods, StreamingLLM at the same budget beside them
  request) names="full lazy_default lazy_r16 rec_s16 lazy_rec stream" lengths=(4096 7936) ppl=0 ;;
  # the lazy decode choices: re-select every step (LazyLLM) vs the prompt's selection with a window
  reselect) names="full lazy_r1 lazy_w32p16 lazy_rec_r1 lazy_rec_w32p16 stream" lengths=(4096 7936) ppl=0 ;;
  families) names="full lazy_default rec_s16 lazy_rec stream" lengths=(${LENGTHS:-4096 7936}) ppl=${PPL:-7936}
            tasks="niah_single niah_multikey niah_multivalue vt cwe fwe qa" depths="0.1 0.5 0.9" ;;
  *) names="full lazy_default lazy_60_40_20 lazy_70_50_30 rec_s16 rec_dyn09 stream" lengths=(2048 4096 7936) ppl=2048 ;;
esac
names=${NAMES:-$names}  # NAMES="full lazy_70_50_30": another list of policies for the set
args=()
for name in $names; do
  # ONLY="full rec_s16": run just these of the set
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && continue
  args+=(--policy "$name=${P[$name]}")
done
t0=$SECONDS
$PY -c "import llama_cpp, sys; from pylazy.cli import main; sys.exit(main())" eval --model "$MODEL" --n-gpu-layers -1 --lengths "${lengths[@]}" \
    --tasks $tasks --depths ${DEPTHS:-$depths} --samples ${SAMPLES:-2} --seed ${SEED:-0} \
    --ppl-tokens $ppl --ppl-decode 256 --no-progress --no-plots --out "$OUT/eval-${MODEL_NAME:-smollm2}${TAG:+-$TAG}" "${args[@]}" 2>&1 \
    | grep -v '^llama_\|^load\|^print_info\|^\.\.\.' | tail -n 60
echo "evals: $((SECONDS - t0)) s"
