"""Runs test bodies of tests/test_vulkan.py N times over in one process, on one model (docs/vulkan.md,
"Stability"): a driver bug that shows only after many graphs (Mesa 22.3's lavapipe) shows here within a
few iterations. Run with the Vulkan venv's python and PYLAZY_LIB set as scripts/vulkan_tests.sh does:

    python scripts/vulkan/repeat_bodies.py 30 lazy16 keep refresh refresh_fa lazyw8
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from models.tiny import load_tiny_weights, make_tiny_model  # noqa: E402
from pylazy.engine import Model  # noqa: E402
import tests.test_vulkan as T  # noqa: E402  (skips itself without a Vulkan device)

BODIES = {
    "keep": lambda tv: T.test_keep_100_and_k_over_context_equal_full(tv),
    "lazy512": lambda tv: T.test_lazy_selection_matches_numpy_on_vulkan(tv, 512, 0, 1),
    "lazy16": lambda tv: T.test_lazy_selection_matches_numpy_on_vulkan(tv, 16, 2, 1),
    "lazyw8": lambda tv: T.test_lazy_selection_matches_numpy_on_vulkan(tv, 512, 0, 8),
    "refresh": lambda tv: T.test_refresh_and_recycled_step_match_numpy_on_vulkan(tv, False),
    "refresh_fa": lambda tv: T.test_refresh_and_recycled_step_match_numpy_on_vulkan(tv, True),
}


def main(argv):
    if len(argv) < 2 or not argv[0].isdigit() or any(b not in BODIES for b in argv[1:]):
        sys.exit(f"usage: repeat_bodies.py N BODY...  (BODY in {', '.join(BODIES)})")
    n = int(argv[0])
    path = make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny-f32.gguf"))
    hp, w = load_tiny_weights(path)
    model = Model(str(path), n_gpu_layers=T.N_GPU_LAYERS, n_threads=2)
    try:
        for name in argv[1:]:
            for i in range(n):
                BODIES[name]((model, hp, w))
                print(f"{name} {i + 1}/{n} ok", flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main(sys.argv[1:])
