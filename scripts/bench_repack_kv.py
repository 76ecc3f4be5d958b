"""Prefill and decode of pylazy vs stock llama-cpp-python with llama.cpp's repacked CPU weights on
and off, and with a Q8_0 KV cache: the rows of issue 18's closing note, through `pylazy bench`.

    python scripts/bench_repack_kv.py --threads 2 --out build/bench-repack-kv.md

Files: a random-weight llama whose matrices are multiples of 256 wide (n_embd 1024, n_ff 2816,
12 layers, head size 128), quantized by llama.cpp to Q4_K_M and to Q4_0 (real small models such as
SmolLM2 or Gemma 3 270M have 576 / 640-wide matrices, so llama.cpp's Q4_K_M gives most of their
tensors Q5_0 and little is repacked), plus Gemma 3 270M Q4_K_M itself when installed. Random
weights change nothing about speed. Every `pylazy bench` setting applies to both engines.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_files(work: Path) -> dict:
    import llama_cpp

    import models.tiny as tiny
    src = work / "rand-f16.gguf"
    if not src.exists():
        tiny.make_tiny_model(src, arch="llama", n_embd=1024, n_head=8, n_head_kv=4, n_ff=2816, n_layer=12,
                             wtype="f16", tied_output=False)
    out = {}
    for ftype in ("Q4_K_M", "Q4_0"):
        dst = work / f"rand-{ftype}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.nthread = 2
            assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        out[f"random 1024-wide llama {ftype}"] = str(dst)
    try:
        from pylazy.models import registry_model_path
        out["Gemma 3 270M Q4_K_M"] = registry_model_path("gemma3-270m")
    except Exception:   # the optional package is not installed
        pass
    return out


def bench(path: str, threads: int, extra: list, work: Path, depths: str = "0") -> dict:
    js = work / "bench.json"
    cmd = [sys.executable, "-m", "pylazy", "bench", "-m", path, "--rows", "prefill,decode", "--lengths", "512",
           "--depths", depths, "--threads", str(threads), "--decode-steps", "32", "--repeat", "3",
           "--no-progress", "--json", str(js)] + extra
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(js.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--work", default=None, help="folder for the model files (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="plz-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["| file | repacked | KV | prefill 512 pylazy / llama.cpp tok/s | ratio | decode pylazy / llama.cpp tok/s | ratio | KV MiB |",
             "|---|---|---|---|---|---|---|---|"]
    # (repacked, KV label, bench flags, decode depth): the KV rows decode at depth 2048, where the
    # cache's type matters.
    configs = [("on", "f16", [], "0"), ("off", "f16", ["--no-extra-bufts"], "0")]
    kv_configs = [("on", "f16 (flash), depth 2048", ["--flash-attn"], "2048"),
                  ("on", "q8_0 (flash), depth 2048", ["--flash-attn", "--type-k", "q8_0", "--type-v", "q8_0"], "2048"),
                  ("on", "f16, depth 2048", [], "2048"), ("on", "q8_0 K + f16 V, depth 2048", ["--type-k", "q8_0"], "2048")]
    for name, path in make_files(work).items():
        for repack, kv, extra, depth in configs + (kv_configs if "Q4_K_M" in name and "random" in name else []):
            r = bench(path, args.threads, extra, work, depth)
            p, d = r["prefill"][0], [row for row in r["decode"] if row["policy"] == "full"][0]
            m = r["meta"]
            lines.append(f"| {name} | {repack} ({m['pylazy_repacked_tensors']} tensors) | {kv} | "
                         f"{p['pylazy_tok_s']:.0f} / {p['llama_cpp_tok_s']:.0f} | {p['ratio']:.2f} | "
                         f"{d['pylazy_tok_s']:.1f} / {d['llama_cpp_tok_s']:.1f} | {d['ratio']:.2f} | "
                         f"{m['kv_bytes_pylazy'] / 2 ** 20:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
