"""The engine on a Vulkan device (scripts/vulkan_tests.sh runs these on Mesa's lavapipe, a CPU Vulkan
driver, with a llama-cpp-python built with -DGGML_VULKAN=on): full attention against llama.cpp on the
same device, keep = 100 % and K >= context exactness, and lazy prefill / recycled attention against the
numpy references of tests/test_lazy.py and tests/test_recycle.py (their own test bodies, run with the
model on Vulkan). Skipped unless ggml registers a Vulkan device.

Tolerances: measured on lavapipe (Mesa 25.0.7, llvmpipe on LLVM 15, Vulkan 1.4.305) with the tiny f32
model; the numbers are in the comments where a bound differs from the CPU tests'."""
import os

import numpy as np
import pytest

import pylazy._native as N
from pylazy.engine import Context, Model, RecycleMode
from pylazy.policy import StepKind

pytestmark = pytest.mark.vulkan

# Both sides on the same device: the difference is then the engine's graph, not the kernels.
# Measured on lavapipe: max |diff| 0 with and without flash attention (96 tokens, all logits).
LLAMA_MAX_ABS_DIFF = 1e-3


def _vulkan_devices():
    buf = __import__("ctypes").create_string_buffer(4096)
    if N.lib.plz_local_devices(buf, len(buf)) < 0:
        return []
    return [line for line in buf.value.decode().splitlines() if line.lower().startswith("vulkan")]


# PYLAZY_VULKAN_TESTS_ON_CPU=1 runs the same bodies with the model on the CPU: a check of the tests
# themselves on a machine without the Vulkan build.
ON_CPU = os.environ.get("PYLAZY_VULKAN_TESTS_ON_CPU") == "1"
N_GPU_LAYERS = 0 if ON_CPU else -1
if not ON_CPU and not _vulkan_devices():
    pytest.skip("no Vulkan device registered (llama-cpp-python built without -DGGML_VULKAN=on?)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_vk(tiny_model_path):
    """(Model on the Vulkan device, hparams, float weights): what the numpy-reference tests take."""
    from models.tiny import load_tiny_weights
    hp, w = load_tiny_weights(tiny_model_path)
    m = Model(str(tiny_model_path), n_gpu_layers=N_GPU_LAYERS, n_threads=2)
    if not ON_CPU:
        assert any(d.lower().startswith("vulkan") for d in m.layer_devices()), m.layer_devices
    yield m, hp, w
    m.close()


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(100, 40000, size=n).tolist()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_full_attention_matches_llama_cpp_on_vulkan(tiny_model_path, tiny_vk, flash_attn):
    from pylazy.llama_ref import reference_llama
    ref = reference_llama(str(tiny_model_path), n_ctx=256, n_batch=256, logits_all=True, flash_attn=flash_attn,
                          n_gpu_layers=N_GPU_LAYERS, n_threads=2)
    toks = _prompt(96)
    try:
        ref.eval(toks)
        want = np.array(ref.scores[: len(toks)], dtype=np.float32)
    finally:
        ref.close()
    with Context(tiny_vk[0], n_ctx=256, flash_attn=flash_attn) as ctx:
        got = ctx.eval(toks, all_logits=True)
    diff = float(np.abs(got - want).max())
    print(f"vulkan parity flash_attn={flash_attn}: max |diff| {diff:.3g}")
    assert (got.argmax(1) == want.argmax(1)).all()
    assert diff <= LLAMA_MAX_ABS_DIFF


def _full_and(m, prompt, n, setup, kind):
    with Context(m, n_ctx=256) as ctx:
        setup(ctx)
        out = [ctx.eval(prompt)[0]]
        for _ in range(n):
            out.append(ctx.decode(int(out[-1].argmax()), kind)[0])
    return np.array(out)


def test_keep_100_and_k_over_context_equal_full(tiny_vk):
    m = tiny_vk[0]
    prompt = _prompt(64, seed=1)
    full = _full_and(m, prompt, 24, lambda c: None, StepKind.FULL)
    n_layer = tiny_vk[1]["n_layer"]
    keep_all = _full_and(m, prompt, 24, lambda c: c.set_lazy([(0, 1.0), (n_layer // 2, 1.0)]), StepKind.FULL)
    big_k = _full_and(m, prompt, 24, lambda c: c.set_recycle(RecycleMode.TOPK, 4096, 8, 4), StepKind.RECYCLED)
    assert np.array_equal(full, keep_all)
    assert np.array_equal(full, big_k)


# The numpy-reference tests themselves, with the model on Vulkan.
@pytest.mark.parametrize("n_ubatch,pool,window", [(512, 0, 1), (16, 2, 1), (512, 0, 8)])
def test_lazy_selection_matches_numpy_on_vulkan(tiny_vk, n_ubatch, pool, window):
    from tests.test_lazy import test_prefill_selection_matches_numpy_reference as body
    body(tiny_vk, n_ubatch, pool, window)


# On lavapipe this test found two engine bugs, both fixed in native/ (docs/vulkan.md): the score stack
# used a 1-D ggml_set that ggml-vulkan writes only one row of, and the refresh token's tail row was
# ordered after the gather only by graph order, which ggml-vulkan's graph_optimize may change.
@pytest.mark.parametrize("flash_attn", [False, True])
def test_refresh_and_recycled_step_match_numpy_on_vulkan(tiny_vk, flash_attn):
    from tests.test_recycle import test_refresh_topk_and_recycled_step_match_numpy as body
    body(tiny_vk, flash_attn)


def test_op_report_lists_vulkan(tiny_model_path):
    from pylazy.op_report import fallbacks, op_report
    report = op_report(str(tiny_model_path), n_gpu_layers=N_GPU_LAYERS, rows=(32, 256))
    assert {"prefill 32", "decode 256 fa", "refresh 256", "recycled step 32", "lazy prefill 256"} <= \
        {r["label"] for r in report["rows"]}
    if not ON_CPU:
        fb = fallbacks(report)
        vk = [name for name in fb if name.lower().startswith("vulkan")]
        assert vk, report["devices"]
        print("vulkan CPU fallbacks:", [(r["op"], r["types"], r["label"]) for r in fb[vk[0]]])
