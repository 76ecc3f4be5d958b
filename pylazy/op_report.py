"""Which graph nodes each backend device can run (native/op_report.cpp): the engine is driven through
every kind of step it has, each recorded under a label, and every node of every computed graph is
asked of every device (ggml_backend_dev_supports_op). A node a device rejects runs on the CPU there
(ggml's scheduler falls back), with copies in and out: `pylazy info --backends` prints those."""
from __future__ import annotations

import ctypes
import json
from typing import Dict, List

from . import _native as N
from .engine import Context, Model, RecycleMode
from .policy import StepKind


def _record(label: str) -> None:
    N.lib.plz_op_report(label.encode(), None, 0)


def _read() -> dict:
    size = N.lib.plz_op_report(None, None, 0)
    buf = ctypes.create_string_buffer(size)
    N.lib.plz_op_report(None, buf, size)
    return json.loads(buf.value.decode())


def _prompt(n: int, n_vocab: int) -> List[int]:
    return [(7919 * i + 101) % (n_vocab - 200) + 100 for i in range(n)]


def _drive(model: Model, n_rows: int, flash_attn: bool) -> None:
    """Each kind of step once at n_rows prompt tokens: prefill, decode, lazy prefill and its
    re-selecting decode, refresh and recycled step."""
    fa = " fa" if flash_attn else ""
    prompt = _prompt(n_rows, model.info.n_vocab)
    n_ctx = n_rows + 64
    with Context(model, n_ctx=n_ctx, flash_attn=flash_attn) as ctx:
        _record(f"prefill {n_rows}{fa}")
        ctx.eval(prompt)
        _record(f"decode {n_rows}{fa}")
        ctx.decode(prompt[0])
        ctx.set_recycle(RecycleMode.TOPK, max(4, n_rows // 8), 8, 4)
        _record(f"refresh {n_rows}{fa}")
        ctx.decode(prompt[1], StepKind.RECYCLED)       # no recycled cache yet: runs as the refresh
        _record(f"recycled step {n_rows}{fa}")
        ctx.decode(prompt[2], StepKind.RECYCLED)
    n_layer = model.info.n_layer
    schedule = [(max(0, n_layer // 4 - 1), 0.7), (n_layer // 2, 0.5)]
    with Context(model, n_ctx=n_ctx, flash_attn=flash_attn) as ctx:
        ctx.set_lazy(schedule)
        _record(f"lazy prefill {n_rows}{fa}")
        ctx.eval(prompt)
        _record(f"lazy select {n_rows}{fa}")
        ctx.decode(prompt[0], StepKind.SELECT)


def op_report(path: str, *, n_gpu_layers: int = -1, rows=(32, 1024), n_threads: int = 0) -> dict:
    """JSON-able {devices, rows}: rows per (step label, op, types) with each device's yes/no."""
    _record("")                                         # clear, start
    with Model(path, n_gpu_layers=n_gpu_layers, n_threads=n_threads or None) as model:
        for n in rows:
            for fa in (False, True):
                _drive(model, n, fa)
    return _read()


def fallbacks(report: dict) -> Dict[str, List[dict]]:
    """Per non-CPU device: the rows it rejects (those nodes would run on the CPU)."""
    out: Dict[str, List[dict]] = {}
    for d, name in enumerate(report["devices"]):
        if name.upper().startswith("CPU"):
            continue
        out[name] = [r for r in report["rows"] if not r["supported"][d]]
    return out


def format_report(report: dict) -> str:
    lines = [f"devices: {', '.join(report['devices'])}"]
    ops = sorted({(r["op"], r["types"]) for r in report["rows"]})
    lines.append(f"{len(ops)} distinct (op, types) over {len({r['label'] for r in report['rows']})} step kinds")
    fb = fallbacks(report)
    if not fb:
        lines.append("no GPU / accelerator device registered: everything runs on the CPU")
    for name, rows in fb.items():
        if not rows:
            lines.append(f"{name}: supports every node of every graph")
            continue
        lines.append(f"{name}: falls back to the CPU for")
        by_op: Dict[tuple, List[str]] = {}
        for r in rows:
            by_op.setdefault((r["op"], r["types"], r["max_ne0"]), []).append(r["label"])
        for (op, types, ne0), labels in sorted(by_op.items()):
            lines.append(f"  {op:<16} {types:<28} ne0<={ne0:<6} in: {', '.join(sorted(set(labels)))}")
    return "\n".join(lines)
