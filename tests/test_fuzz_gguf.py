"""Fuzz the GGUF gate: mutated copies of a small model (real 49k tokenizer) go through
`python -m pylazy.gguf_check FILE --load` semantics in subprocesses; each must end in
exit 0 (loaded) or 2 (rejected), never a signal, another exit code or a hang.

~150 cases by default (about 25 s on 2 cores); PYLAZY_FUZZ_CASES=10000 for a long run,
PYLAZY_FUZZ_SEED to vary the cases."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_gguf  # noqa: E402

pytest.importorskip("llama_cpp")


def test_mutated_gguf_files_never_crash(tmp_path):
    n = int(os.environ.get("PYLAZY_FUZZ_CASES", "150"))
    seed = int(os.environ.get("PYLAZY_FUZZ_SEED", "0"))
    report = fuzz_gguf.run_fuzz(n, seed, tmp_path, jobs=min(4, os.cpu_count() or 1),
                                keep=tmp_path / "crashes")
    print(report.summary())
    assert report.crashes == [], "\n".join(report.crashes)
    assert report.missed == [], "truncated files accepted:\n" + "\n".join(report.missed)
    assert report.cases == n and report.loaded + report.rejected == n
    if n >= len(fuzz_gguf.FAMILIES):   # the first cases cover every family, one clean
        assert set(report.by_family) == set(fuzz_gguf.FAMILIES)
        assert report.by_family["clean"][0] >= 1 and report.by_family["clean"][1] == 0, \
            "an unmutated file was rejected"
    if n >= 100:
        assert report.rejected > n // 2


def test_harness_pinpoints_a_crashing_case(tmp_path, monkeypatch):
    # the worker aborts on the file named *_abort.gguf: the harness must blame exactly
    # that case, re-run it alone, and go on with the cases after it
    paths = []
    for name in ("a.gguf", "b_abort.gguf", "c.gguf"):
        (tmp_path / name).write_bytes(b"GGUF" + b"\x07\x00\x00\x00" + bytes(16))
        paths.append(tmp_path / name)
    cases = [fuzz_gguf.Case(i, "clean", f"case {i}", b"", 0, 0, "base") for i in range(3)]
    monkeypatch.setenv("PYLAZY_FUZZ_SELFTEST_ABORT", "_abort.gguf")
    results = fuzz_gguf._run_batch(cases, paths, timeout=60)
    assert [r.code for r in results] == [2, None, 2]
    assert "worker exit -6" in results[1].message and "alone exit 2" in results[1].message
    assert "version 7" in results[2].message
