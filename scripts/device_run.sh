#!/usr/bin/env bash
# Steps of a GPU-machine session, one device call each (the machine keeps /tmp only while warm, ~30 s
# idle; scripts/README.md). Logs and results go to $OUT.
#   build      device_build.sh (llama-cpp-python CUDA + pylazy + random 8B file); saves the built
#              llama-cpp-python to $OUT/prebuilt.tar.xz.* (to carry as .device/prebuilt/ next time)
#   profile    scripts/op_profile.py: per-op prefill/decode, both engines; refresh/recycled at 64K
#   bench      scripts/gpu_bench.py (the table of docs/bench-gpu.md)
#   smol-a|b|c SmolLM2 arrives in three parts (98 MB + the repo > one call's 64 MiB), one per call:
#              .device-smol-X/smol.part-NN from `split -n 3 -d MODEL smol.part-` here; evals joins them
#   evals      needle accuracy of lazy/recycle settings on SmolLM2 (GPU), pylazy eval
#   tune       pylazy tune on SmolLM2 (TUNE_LENGTH, default 8192; TUNE_SAMPLES, default 2; held-out check)
#   part-X     pieces of model files, one call each: .device-part-X/models.txz.NN (from
#              scripts/device_parts.sh here) copied to /tmp/models; `families` joins and unpacks them
#   families   issue 22's cross-model table: SET=families evals on every model joined from /tmp/models
#              (MODELS="qwen gemma smol" narrows and orders them; NAME.sha256 checked)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
W=/tmp/pylazy-device
SMOL=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3; [[ -x $PY ]] || PY=$(command -v python3)

restore_prebuilt() {
    if compgen -G ".device/prebuilt/prebuilt.tar.xz.*" >/dev/null && [[ ! -e $W/site/llama_cpp/lib/libllama.so ]]; then
        mkdir -p "$W/site" && cat .device/prebuilt/prebuilt.tar.xz.* | tar -xJ -C "$W/site" && echo "prebuilt llama-cpp-python restored"
    fi
}

for step in "$@"; do
    echo "======== $step ($(date +%T))"
    case $step in
    build)
        restore_prebuilt
        bash scripts/device_build.sh 2>&1 | tee "$OUT/build.log" | grep -v '^\[device_build.*\.\.\.' | tail -n 12
        if [[ ! -e .device/prebuilt && ${PREBUILT:-1} == 1 ]]; then   # PREBUILT=0: skip (it is ~250 MB with CUDA, too big to carry)
            (cd "$W/site" && tar -c llama_cpp lib include .llama_cpp.stamp 2>/dev/null | xz -T0 -6 > /tmp/prebuilt.tar.xz)
            sz=$(stat -c %s /tmp/prebuilt.tar.xz); echo "prebuilt: $sz bytes"
            ((sz < 60000000)) && split -b 15000000 -d /tmp/prebuilt.tar.xz "$OUT/prebuilt.tar.xz."
        fi ;;
    profile)
        . $W/env.sh
        $PY scripts/op_profile.py --model "$PYLAZY_MODEL_8B" --n 4096 --decode-steps 32 --refresh-depth 65536 --top 22 2>&1 \
            | grep -v '^llama_\|^load\|^print_info\|^sched_\|^graph_\|^~llama\|^\.\.\.' | tee "$OUT/profile.txt" ;;
    bench)
        . $W/env.sh
        $PY scripts/gpu_bench.py --model "$PYLAZY_MODEL_8B" --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -n 30 ;;
    part-[a-z])
        mkdir -p /tmp/models && cp .device-$step/models.txz.* /tmp/models/ && ls -la /tmp/models | tail -n +2 ;;
    families)
        . $W/env.sh
        # (re)unpack while a named model is missing: pieces may arrive between two families calls
        for name in ${MODELS:-qwen gemma smol}; do
            [[ -s /tmp/models/$name.gguf ]] && continue
            (cd /tmp/models && cat models.txz.* | xz -d | tar -x
             for sum in ./*.sha256; do sha256sum -c "$sum" || rm -f "${sum%.sha256}.gguf"; done); break
        done
        for name in ${MODELS:-qwen gemma smol}; do
            [[ -s /tmp/models/$name.gguf ]] || { echo "$name: not (wholly) carried"; continue; }
            SET=families MODEL_NAME=$name bash scripts/device_evals.sh "/tmp/models/$name.gguf" "$OUT"
        done ;;
    smol-[a-z])
        mkdir -p /tmp/smol && cp .device-$step/smol.part-* /tmp/smol/ && ls -la /tmp/smol ;;
    evals)
        . $W/env.sh
        if [[ ! -s $SMOL ]]; then
            cat /tmp/smol/smol.part-* > "$SMOL" && sha256sum "$SMOL" && cat .device/smol.sha256
        fi
        bash scripts/device_evals.sh "$SMOL" "$OUT" ;;
    tune)   # pylazy tune on SmolLM2 (needs the joined file: run after `evals` or join here)
        . $W/env.sh
        [[ -s $SMOL ]] || cat /tmp/smol/smol.part-* > "$SMOL"
        $PY -c "import llama_cpp, sys; from pylazy.cli import main; sys.exit(main())" \
            tune -m "$SMOL" --length ${TUNE_LENGTH:-8192} --samples ${TUNE_SAMPLES:-2} --n-gpu-layers -1 \
            --verify-samples ${TUNE_SAMPLES:-2} --no-plot --no-progress --profile-dir "$OUT/profiles" \
            --out "$OUT/tune" 2>&1 | grep -v '^llama_\|^load\|^print_info' | tail -n 40 ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done
