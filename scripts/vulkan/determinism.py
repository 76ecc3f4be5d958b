"""Is a lazy prefill the same run after run on this device? Three identical runs of a LazyPrefill
prefill of DEPTH random tokens plus a few greedy decode steps, on one model, in one process; prints
the largest logit difference of runs 2 and 3 against run 1 (docs/vulkan.md, "NVIDIA H200 through
Vulkan": with pool 16, Vulkan's TOP_K among the pooled scores' ties picks differently).

    python scripts/vulkan/determinism.py MODEL.gguf [DEPTH] [POOL...]
"""
import llama_cpp  # noqa: F401,I001  (before numpy: the GPU machine's image needs this order)

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import pylazy  # noqa: E402
from pylazy.engine import Context, Model  # noqa: E402
from pylazy.generate import ContextCache, Greedy, generate_step, prefill  # noqa: E402

STEPS = 4


def run(model, prompt, pool):
    """Last prompt logits, then the logits of STEPS greedy decode steps."""
    with Context(model, n_ctx=len(prompt) + STEPS + 256, n_ubatch=512) as ctx:
        cache = ContextCache(ctx)
        logits = prefill(cache, prompt, pylazy.LazyPrefill(pool=pool), swa=model.swa_layers(), n_batch=len(prompt))
        out = [np.array(logits[-1], dtype=np.float32)]
        for i, (_, step_logits) in enumerate(generate_step(cache, logits[-1], Greedy())):
            if i > 0:
                out.append(np.array(step_logits, dtype=np.float32))
            if i == STEPS:
                break
        return np.array(out)


def main(argv):
    if not argv:
        sys.exit(__doc__)
    path, depth = argv[0], int(argv[1]) if len(argv) > 1 else 4000
    pools = [int(p) for p in argv[2:]] or [0, 2, 16]
    model = Model(path, n_gpu_layers=-1, n_threads=8)
    prompt = np.random.default_rng(3).integers(100, 40000, size=depth).tolist()
    try:
        for pool in pools:
            first = run(model, prompt, pool)
            diffs = [float(np.abs(run(model, prompt, pool) - first).max()) for _ in range(2)]
            print(f"pool {pool}, depth {depth}: max |logit diff| of runs 2 and 3 vs run 1: "
                  f"{diffs[0]:.3g}, {diffs[1]:.3g}", flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main(sys.argv[1:])
