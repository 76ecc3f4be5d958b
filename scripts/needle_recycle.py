#!/usr/bin/env python3
"""Needle accuracy of recycled attention with a dynamic stride vs full attention (SmolLM2, 2K and 4K,
niah_single + niah_multikey, depths 0.1/0.5/0.9): the check behind docs/eval/README.md's last section."""
import pylazy
from pylazy.eval.tasks import make_task
from pylazy.eval.runner import vocab_tokenizer
from pylazy.eval.scoring import score
from pylazy.models import default_model_path
tok = vocab_tokenizer(default_model_path())
llm = pylazy.Llama(n_ctx=4400, verbose=False, n_threads=2)
pols = {"full": None, "recycle_dyn0.95_k=L/8": "dyn", "recycle_S4_k=L/8": "s4"}
res = {k: [] for k in pols}
for L in (2048, 4096):
    for spec in ("niah_single:natural", "niah_multikey:natural"):
        for d in (0.1, 0.5, 0.9):
            task = make_task(spec, L, d, 0, tok)
            for name, kind in pols.items():
                rec = None if kind is None else (pylazy.Recycle(k=L // 8, stride=16, dynamic_threshold=0.95) if kind == "dyn" else pylazy.Recycle(k=L // 8, stride=4))
                out = llm(task.prompt, max_tokens=24, temperature=0, recycle=rec)
                res[name].append(score(task, out["choices"][0]["text"]))
            print(L, spec, d, {k: v[-1] for k, v in res.items()}, flush=True)
print({k: f"{sum(v):.0f}/{len(v)}" for k, v in res.items()})
