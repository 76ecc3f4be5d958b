#!/usr/bin/env bash
# Set up the GPU machine in one call: runs THERE, from the repo root, after
# scripts/device_prepare.sh filled .device/ here (see scripts/README.md).
#   1. wheels from .device/wheels            -> $SITE (a --target dir on PYTHONPATH)
#   2. llama-cpp-python 0.3.36, CUDA build   -> $SITE  (timed)
#   3. pylazy itself (pip install .), linked to that build's ggml -> $SITE
#   4. random-weight Llama-3-8B Q4_K GGUF    -> $MODEL
#   5. smoke test: that model fully offloaded, a short prompt, finite logits
#   6. summary, and $WORK/env.sh for the calls that follow
# Idempotent: a step whose inputs did not change is skipped, so a second call on
# the same warm machine costs seconds; builds keep their CMake build dirs under
# $WORK, so a build cut off by the call's time limit resumes where it stopped.
#
# Env (defaults): CUDA_ARCH (90: H100/H200; 89: RTX 40xx incl. laptop GPUs;
#   87: Jetson AGX Orin, build on the Jetson itself, it is aarch64; 86: RTX 30xx),
#   USE_CUDA (1; 0 builds CPU-only, to check this script where there is no GPU),
#   USE_VULKAN (0; 1 adds ggml's Vulkan backend from .device/debs: device_prepare.sh VULKAN=1),
#   PYTHON (/opt/torch/.venv/bin/python3), WORK (/tmp/pylazy-device),
#   MODEL (/tmp/llama3-8b-random-q4_k.gguf), MODEL_PRESET (llama3-8b),
#   SKIP_MODEL (0), SMOKE (1), EXTRA_CMAKE_ARGS (appended to CMAKE_ARGS).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
dev=$repo/.device
name=llama_cpp_python-0.3.36
tarball=$dev/$name-trim.tar.xz
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
[[ -x $PY ]] || PY=$(command -v python3)
WORK=${WORK:-/tmp/pylazy-device}
SITE=$WORK/site
MODEL=${MODEL:-/tmp/llama3-8b-random-q4_k.gguf}
MODEL_PRESET=${MODEL_PRESET:-llama3-8b}
CUDA_ARCH=${CUDA_ARCH:-90}
USE_CUDA=${USE_CUDA:-1}
USE_VULKAN=${USE_VULKAN:-0}
SKIP_MODEL=${SKIP_MODEL:-0}
SMOKE=${SMOKE:-1}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONUNBUFFERED=1

t_start=$SECONDS
summary=()
log() { printf '[device_build +%4ds] %s\n' $((SECONDS - t_start)) "$*"; }
note() { summary+=("$*"); log "$*"; }
die() { log "ERROR: $*"; exit 1; }

[[ -f $tarball ]] || die "$tarball missing: run scripts/device_prepare.sh on the dev machine and carry .device"
mkdir -p "$WORK" "$SITE"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
pip_install=("$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir
             --disable-pip-version-check --upgrade --target "$SITE")

# ---- CUDA toolchain ------------------------------------------------------------------
# CMake's FindCUDAToolkit needs nvcc, cuBLAS and the driver library. A toolkit in
# /usr/local/cuda normally has all three; one assembled from pip wheels (as on
# the dev machine) lacks cuBLAS, which the PyTorch venv then supplies
# (site-packages/nvidia/cu13/{lib,include}).
cmake_args=(-DLLAVA_BUILD=OFF)  # mtmd (vision) is not needed and costs build time
extra_ld=""
find_nvcc() {
    local c
    for c in "${CUDACXX:-}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
        [[ -n $c && -x $c ]] && { echo "$c"; return; }
    done
    return 1
}
setup_cuda() {
    local nvcc top nvdir lib lt inc drv
    nvcc=$(find_nvcc) || die "nvcc not found (set CUDACXX)"
    top=$( ("$nvcc" -v --dryrun -c -x cu /dev/null -o /dev/null 2>&1 || true) | sed -n 's/^#\$ TOP=//p')
    top=$(cd "${top:-$(dirname "$nvcc")/..}" && pwd -P)
    export CUDACXX=$nvcc PATH="$top/bin:$PATH"
    cmake_args+=(-DGGML_CUDA=on "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH")
    log "nvcc: $nvcc ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), toolkit $top"

    if ! compgen -G "$top/lib64/libcublas.so" >/dev/null && ! compgen -G "$top/lib/libcublas.so" >/dev/null \
        && ! compgen -G "$top/targets/*/lib/libcublas.so" >/dev/null; then
        nvdir=$("$PY" -c 'import nvidia, sys; sys.stdout.write(list(nvidia.__path__)[0])' 2>/dev/null) \
            || die "no cuBLAS in $top and no nvidia pip packages in $PY"
        lib=$(find "$nvdir" -name 'libcublas.so.[0-9]*' | sort | head -n1)
        lt=$(find "$nvdir" -name 'libcublasLt.so.[0-9]*' | sort | head -n1)
        inc=$(find "$nvdir" -name cublas_v2.h | head -n1)
        [[ -n $lib && -n $lt && -n $inc ]] || die "cuBLAS not found in $top nor $nvdir"
        cmake_args+=("-DCUDA_cublas_LIBRARY=$lib" "-DCUDA_cublasLt_LIBRARY=$lt"
                     "-DCMAKE_CUDA_FLAGS=-I$(dirname "$inc")")
        extra_ld=$(dirname "$lib")
        log "cuBLAS from pip: $lib"
    fi
    if ! compgen -G "$top/lib64/stubs/libcuda.so" >/dev/null && ! compgen -G "$top/targets/*/lib/stubs/libcuda.so" >/dev/null; then
        drv=$( (ldconfig -p 2>/dev/null || true) | sed -n 's/.*libcuda\.so\.1 .*=> //p' | head -n1)
        if [[ -z $drv ]]; then
            drv=$(compgen -G '/usr/local/nvidia/lib64/libcuda.so.1' || compgen -G '/usr/lib/x86_64-linux-gnu/libcuda.so.1' || true)
        fi
        if [[ -n $drv ]]; then
            cmake_args+=("-DCUDA_cuda_driver_LIBRARY=$drv")
            log "driver library: $drv"
        else  # links without libcuda; ggml then uses its legacy memory pool
            cmake_args+=(-DGGML_CUDA_NO_VMM=ON)
            log "WARNING: no libcuda.so found: building with GGML_CUDA_NO_VMM=ON"
        fi
    fi
}
if ((USE_CUDA)); then setup_cuda; fi

# ---- Vulkan toolchain (the Debian packages device_prepare.sh VULKAN=1 put in .device/debs) ----
# Unpacked under $WORK, not /: the machine's own libraries stay as they are. The loader finds the
# NVIDIA driver through its ICD file; where none is in the standard places, the image's is named.
vk_env=()
setup_vulkan() {
    local root=$WORK/vkroot deb icd
    compgen -G "$dev/debs/*.deb" >/dev/null || die "no .device/debs: run device_prepare.sh with VULKAN=1"
    mkdir -p "$root"
    for deb in "$dev"/debs/*.deb; do dpkg -x "$deb" "$root"; done
    local lib=$root/usr/lib/x86_64-linux-gnu
    cmake_args+=(-DGGML_VULKAN=on "-DVulkan_INCLUDE_DIR=$root/usr/include" "-DVulkan_LIBRARY=$lib/libvulkan.so"
                 "-DVulkan_GLSLC_EXECUTABLE=$root/usr/bin/glslc" "-DSPIRV-Headers_DIR=$root/usr/share/cmake/SPIRV-Headers")
    # the headers are Debian 12's 1.3.239: ggml-vulkan needs the shim (scripts/vulkan_tests.sh says why)
    export CXXFLAGS="-include $repo/scripts/vulkan/layer_settings_shim.h${CXXFLAGS:+ $CXXFLAGS}"
    vk_env+=("export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}")
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    if ! compgen -G "/usr/share/vulkan/icd.d/nvidia*" >/dev/null && ! compgen -G "/etc/vulkan/icd.d/nvidia*" >/dev/null; then
        icd=$(compgen -G "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd*.json" | head -n1 || true)
        [[ -n $icd ]] && { export VK_DRIVER_FILES=$icd; vk_env+=("export VK_DRIVER_FILES=$icd"); }
    fi
    log "vulkan: toolchain in $root; ICD ${VK_DRIVER_FILES:-in the loader standard paths}"
}
if ((USE_VULKAN)); then setup_vulkan; fi
# shellcheck disable=SC2206  # word splitting of the user's extra args is intended
[[ -n ${EXTRA_CMAKE_ARGS:-} ]] && cmake_args+=(${EXTRA_CMAKE_ARGS})
export CMAKE_ARGS="${cmake_args[*]}"  # scikit-build-core splits it like a shell
[[ -n $extra_ld ]] && export LD_LIBRARY_PATH=$extra_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
log "CMAKE_ARGS=$CMAKE_ARGS  CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL"

# run_logged LOG CMD...: run CMD with its output in LOG, printing the build's last
# ninja progress line ([done/total]) every 30 s, so that a call cut off by its
# time limit still shows how far the build got.
run_logged() {
    local logf=$1 pid i=0
    shift
    "$@" >"$logf" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if ((++i % 15 == 0)); then
            log "  ... $(grep -oE '^ *\[[0-9]+/[0-9]+\]' "$logf" | tail -n1 | tr -d ' ')"
        fi
    done
    wait "$pid"
}

# stamp_ok FILE CONTENT: true when FILE holds CONTENT (the step already ran with these inputs)
stamp_ok() { [[ -f $1 && "$(cat "$1")" == "$2" ]]; }

# ---- 1. wheels -------------------------------------------------------------------------
key=$(cat "$dev"/wheels/*.whl | sha256sum | cut -c1-16)
if stamp_ok "$SITE/.wheels.stamp" "$key"; then
    log "wheels: already installed"
else
    "${pip_install[@]}" -q "$dev"/wheels/*.whl
    echo "$key" >"$SITE/.wheels.stamp"
    note "wheels: installed $(cd "$dev/wheels" && echo *.whl)"
fi

# ---- 2. llama-cpp-python -------------------------------------------------------------
src_key=$(sha256sum "$tarball" | cut -c1-16)
build_key="$src_key $CMAKE_ARGS"
if stamp_ok "$SITE/.llama_cpp.stamp" "$build_key" && [[ -e $SITE/llama_cpp/lib/libllama.so ]]; then
    log "llama-cpp-python: already built for these sources and CMAKE_ARGS"
else
    if ! stamp_ok "$WORK/src/.stamp" "$src_key"; then
        rm -rf "$WORK/src"
        mkdir -p "$WORK/src"
        tar -xJf "$tarball" -C "$WORK/src"
        echo "$src_key" >"$WORK/src/.stamp"
    fi
    log "llama-cpp-python: building (build dir $WORK/llama-build)"
    t0=$SECONDS
    run_logged "$WORK/llama-build.log" "${pip_install[@]}" -v --no-build-isolation \
        --config-settings=build-dir="$WORK/llama-build" "$WORK/src/$name" \
        || die "llama-cpp-python build failed: see $WORK/llama-build.log (tail below)
$(tail -n 40 "$WORK/llama-build.log")"
    echo "$build_key" >"$SITE/.llama_cpp.stamp"
    note "llama-cpp-python: built in $((SECONDS - t0)) s"
fi
gpu_ok=$("$PY" -c 'import llama_cpp; print(bool(llama_cpp.llama_supports_gpu_offload()))')
note "llama_cpp $("$PY" -c 'import llama_cpp, os; print(llama_cpp.__version__, "from", os.path.dirname(llama_cpp.__file__))'); GPU offload: $gpu_ok"
if ((USE_CUDA)) && [[ $gpu_ok != True ]]; then die "llama_cpp was built without GPU offload"; fi

# ---- 3. pylazy ---------------------------------------------------------------------------
if [[ -f pyproject.toml && -f CMakeLists.txt ]]; then
    cfg=()
    if grep -q 'scikit_build_core' pyproject.toml; then cfg=(--config-settings=build-dir="$WORK/pylazy-build"); fi
    log "pylazy: building (incremental when $WORK/pylazy-build exists)"
    t0=$SECONDS
    if ! run_logged "$WORK/pylazy-build.log" "${pip_install[@]}" -v --no-build-isolation "${cfg[@]}" .; then
        die "pylazy build failed: see $WORK/pylazy-build.log (tail below)
$(tail -n 60 "$WORK/pylazy-build.log")"
    fi
    note "pylazy: built and installed in $((SECONDS - t0)) s"
else
    note "pylazy: no pyproject.toml + CMakeLists.txt at the repo root yet: build skipped"
fi

# ---- 4. random 8B model -------------------------------------------------------------------
if ((SKIP_MODEL)); then
    note "model: skipped (SKIP_MODEL=1)"
elif [[ -s $MODEL ]]; then
    log "model: $MODEL already there"
else
    # Python buffers nothing here (PYTHONUNBUFFERED), so the rate line shows in the log
    "$PY" scripts/make_random_gguf.py --preset "$MODEL_PRESET" --out "$MODEL" | tee "$WORK/model.log"
    note "model: $(tail -n1 "$WORK/model.log")"
fi

# ---- 5. smoke test --------------------------------------------------------------------------
if ((SMOKE)) && ! ((SKIP_MODEL)) && [[ -s $MODEL ]]; then
    # In a child process: a crash there still leaves this script's summary.
    if smoke=$("$PY" - "$MODEL" "$USE_CUDA" 2>"$WORK/smoke.err" <<'EOF'
import sys, time
import llama_cpp  # before numpy: the other order segfaults llama.cpp's model load there (docs/bench-gpu.md)
import numpy as np

sys.path.insert(0, ".")  # the repo: pylazy.llama_ref turns llama.cpp's AMX buffers off on CPUs where they crash
from pylazy.llama_ref import reference_llama

path, use_cuda = sys.argv[1], sys.argv[2] == "1"
t = time.perf_counter()
llm = reference_llama(path, n_ctx=1024, n_batch=512, n_gpu_layers=-1 if use_cuda else 0,
                      flash_attn=use_cuda, logits_all=True, verbose=False)
t_load = time.perf_counter() - t
toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20)[:200]
t = time.perf_counter()
llm.eval(toks)
t_eval = time.perf_counter() - t
lg = np.asarray(llm.scores[: len(toks)])
print(f"load {t_load:.1f} s; prefill {len(toks)} tokens in {t_eval * 1e3:.0f} ms; "
      f"logits finite: {bool(np.isfinite(lg).all())}, std {float(lg.std()):.3f}")
EOF
    ); then
        note "smoke: $smoke"
    else
        note "smoke: FAILED (rc $?): $(tail -n 5 "$WORK/smoke.err" | tr '\n' ' ')"
    fi
fi

# ---- 6. summary --------------------------------------------------------------------------------
{
    echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
    [[ -n $extra_ld ]] && echo "export LD_LIBRARY_PATH=$extra_ld\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "export PYLAZY_MODEL_8B=$MODEL"
    for line in "${vk_env[@]}"; do echo "$line"; done
} >"$WORK/env.sh"
echo "================ device_build summary ($((SECONDS - t_start)) s) ================"
if command -v nvidia-smi >/dev/null; then
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)"
fi
echo "python: $PY ($("$PY" -V 2>&1)); site: $SITE; cores: $(nproc)"
for line in "${summary[@]}"; do echo "  $line"; done
[[ -s $MODEL ]] && echo "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
echo "next commands on this machine: source $WORK/env.sh"
