#!/usr/bin/env bash
# Model files for the GPU machine, which takes at most 64 MiB a call (repo included) and has no
# network: one tar of the files (first named first) through xz, cut into pieces of PIECE bytes, one
# per folder .device-part-a/, .device-part-b/, ... (git-ignored). Each folder then travels in one
# `scripts/device_run.sh part-X` call (carry .device-part-X); `families` joins the pieces, unpacks
# what arrived (a cut-short stream still yields every file before the cut) and checks sha256.
#   scripts/device_parts.sh qwen=/path/qwen.gguf gemma=/path/gemma.gguf smol=/path/smol.gguf
# Env: PIECE (default: 64 MiB less the tracked repo, which travels with every call, less 1 MB of slack).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo_bytes=$(git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 stat -c %s) | awk '{s += $1} END {print s}')
piece=${PIECE:-$((64 * 1024 * 1024 - repo_bytes - 1000000))}
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
rm -rf "$repo"/.device-part-*
members=()
for spec in "$@"; do
    name=${spec%%=*} file=$(readlink -f "${spec#*=}")
    ln -s "$file" "$stage/$name.gguf"
    (cd "$stage" && sha256sum -b "$(readlink -f "$name.gguf")" | sed "s|[ *].*/.*|  $name.gguf|" > "$name.sha256")
    members+=("$name.sha256" "$name.gguf")
done
tar -C "$stage" -ch "${members[@]}" | xz -1 -T2 | split -b "$piece" -d -a 2 - "$stage/models.txz."
letters=(a b c d e f g h i j k l m n o p q r s t u v w x y z)
i=0
for piece_file in "$stage"/models.txz.*; do
    mkdir -p "$repo/.device-part-${letters[$i]}" && mv "$piece_file" "$repo/.device-part-${letters[$i]}/"
    i=$((i + 1))
done
du -sh "$repo"/.device-part-* && echo "$i calls: part-a .. part-${letters[$((i - 1))]}"
