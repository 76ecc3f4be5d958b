"""The GPU causal-mask template (Context::causal_tpl, used on the CPU when PYLAZY_MASK_TEMPLATE=1) must
give exactly the logits and lazy selections of the host-built mask: prefill in several ubatches after
earlier tokens, all rows' logits, lazy prefill, and decode after it."""
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import sys, numpy as np
from pylazy.engine import Context, Model
m = Model(sys.argv[1], n_threads=2)
rng = np.random.default_rng(0)
toks = rng.integers(100, 40000, size=200).tolist()
out = {}
with Context(m, n_ctx=512, n_ubatch=64) as ctx:
    a = ctx.eval(toks[:70], all_logits=True)           # 2 ubatches from position 0
    b = ctx.eval(toks[70:], all_logits=True)           # continues at 70: the template is seen shifted
    out["full"] = np.concatenate([a, b])
    out["dec"] = ctx.decode(1234)[0]
with Context(m, n_ctx=512, n_ubatch=64) as ctx:
    ctx.set_lazy([(0, 0.6), (2, 0.3)])
    out["lazy"] = ctx.eval(toks)
    st = ctx.stages()
    out["sel1"], out["sel2"] = st[1]["selected"], st[2]["selected"]
    out["lazy_dec"] = ctx.decode(1234)[0]
np.savez(sys.argv[2], **out)
"""


def _run(model, path, template):
    env = dict(os.environ, PYLAZY_MASK_TEMPLATE="1" if template else "0")
    subprocess.run([sys.executable, "-c", SCRIPT, model, path], env=env, check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return np.load(path)


def test_template_mask_equals_host_mask(tiny_model_path, tmp_path):
    host = _run(tiny_model_path, str(tmp_path / "host.npz"), False)
    tpl = _run(tiny_model_path, str(tmp_path / "tpl.npz"), True)
    for key in host.files:
        assert np.array_equal(host[key], tpl[key]), key
    assert host["full"].shape[0] == 200 and np.isfinite(host["full"]).all()
