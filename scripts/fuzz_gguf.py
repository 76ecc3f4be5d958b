"""Fuzz pylazy's GGUF gate: mutated model files must be rejected (exit 2) or load (exit 0),
never crash the process that hands them to native code.

Each case is a copy of a small base model (tiny random weights, the real 49k-token
SmolLM2 tokenizer) with its header mutated: byte flips, truncation at a section boundary,
huge counts/lengths/dims, vocab edits that make two tokens equal, edited metadata values
and types. A few cases use the real default model's header with its data cut short, which
must fail as truncated. Cases run in batches through worker subprocesses that do exactly
what `python -m pylazy.gguf_check FILE --load` does; when a worker dies (signal, odd exit,
timeout) the case it was on is re-run alone with that command to pinpoint it.

    python scripts/fuzz_gguf.py --cases 1000 --seed 7
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pylazy.models import default_model_path  # noqa: E402

DEFAULT_MODEL = default_model_path()
FAMILIES = ("flip", "truncate", "huge", "dup", "value", "type", "clean", "real_cut")
WEIGHTS = (30, 14, 14, 10, 16, 8, 3, 5)
# every outcome of these must be a rejection: a load means the gate missed a cut file
MUST_REJECT = ("truncate", "real_cut")


@dataclass
class Case:
    index: int
    family: str
    what: str              # human-readable mutation, enough to redo it by hand
    header: bytes          # mutated bytes [0, len(header)) of the source file
    tail_start: int        # then source[tail_start:tail_end]
    tail_end: int
    source: str            # "base" or "real"


@dataclass
class Result:
    case: Case
    code: int | None       # exit code (0 ok, 2 rejected), None: crashed / timed out
    message: str


@dataclass
class FuzzReport:
    seed: int
    cases: int = 0
    loaded: int = 0
    rejected: int = 0
    crashes: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)   # MUST_REJECT cases that loaded
    by_family: dict[str, list[int]] = field(default_factory=dict)  # family -> [loaded, rejected]
    seconds: float = 0.0

    def summary(self) -> str:
        fam = ", ".join(f"{k} {v[0]}+{v[1]}" for k, v in sorted(self.by_family.items()))
        return (f"seed {self.seed}: {self.cases} cases in {self.seconds:.1f} s, {self.rejected} rejected, "
                f"{self.loaded} loaded, {len(self.crashes)} crashes, {len(self.missed)} truncated files "
                f"accepted; per family loaded+rejected: {fam}")


# ------------------------------------------------------------------ base files

def make_base(workdir: Path) -> str:
    """Tiny 2-layer q8_0 llama (3.4 MB) with the real tokenizer: small to copy per case."""
    from models.tiny import make_tiny_model
    return make_tiny_model(workdir / "fuzz_base.gguf", n_layer=2, n_embd=32, n_head=4, n_head_kv=2,
                           n_ff=64, wtype="q8_0", tied_output=True, seed=1)


class FieldMap:
    """Byte offsets of the fields of a valid GGUF, from check_gguf's layout."""

    def __init__(self, path: str):
        from pylazy.gguf_check import check_gguf
        info = check_gguf(path)
        self.info = info
        self.size = os.path.getsize(path)
        self.data_offset = info.data_offset
        self.boundaries = sorted({off for _, off in info.layout})
        self.kv = {}        # key -> dict of field offsets
        self.tensors = {}   # name -> dict of field offsets
        for name, start in info.layout:
            if name.startswith("kv:"):
                key = name[3:]
                type_at = start + 8 + len(key.encode())
                f = {"key_len": start, "type": type_at, "value": type_at + 4, "tname": info.types[key]}
                if f["tname"].startswith("arr["):
                    f.update(elem_type=type_at + 4, count=type_at + 8, elems=type_at + 16)
                self.kv[key] = f
                self.boundaries.append(f["value"])
            elif name.startswith("tensor:"):
                tname = name[7:]
                nd_at = start + 8 + len(tname.encode())
                nd = len(info.tensors[tname].shape)
                self.tensors[tname] = {"name_len": start, "n_dims": nd_at, "dims": nd_at + 4,
                                       "n_dims_value": nd, "type": nd_at + 4 + 8 * nd,
                                       "offset": nd_at + 8 + 8 * nd}
        self.boundaries = sorted(set(self.boundaries))
        # token i's bytes (after its u64 length), and tokens grouped by byte length
        tokens = info.metadata["tokenizer.ggml.tokens"]
        off = self.kv["tokenizer.ggml.tokens"]["elems"]
        self.token_at, self.by_len = [], {}
        for i, tok in enumerate(tokens):
            raw = tok.encode()
            self.token_at.append(off + 8)
            self.by_len.setdefault(len(raw), []).append(i)
            off += 8 + len(raw)
        self.tokens_span = (self.kv["tokenizer.ggml.tokens"]["elems"], off)
        self.tokens = tokens
        with open(path, "rb") as f:   # the header, plus up to 2 MB of tensor data
            self.head_and_some = f.read(self.data_offset + (2 << 20))
        self.header = self.head_and_some[:self.data_offset]


# ------------------------------------------------------------------ mutations

INTERESTING_INTS = (0, 1, 2, 3, 5, 7, 63, 64, 255, 4096, 49151, 49152, 49153, 1 << 24, (1 << 24) + 1,
                    (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
INTERESTING_FLOATS = (0.0, -0.0, -1.0, 1e-30, 1e30, float("inf"), float("-inf"), float("nan"), 1.0, 0.5)
SAME_LENGTH_STRINGS = {   # alternative values of the same byte length, so nothing shifts
    4: [b"bert", b"rwkv", b"none", b"test", b"gpt3", b"t5\x00\x00", b"\xff\xfe\xfd\xfc"],
    5: [b"qwen2", b"gemma", b"llamb", b"bert ", b"Llama", b"llama"],
    6: [b"llama3", b"gemma4", b"falcon", b"refact", b"gpt-4o", b"tekken", b"qwen35", b"smollm",
        b"whites", b"\x00mollm"],
}


def _put(buf: bytearray, off: int, fmt: str, value) -> None:
    size = struct.calcsize(fmt)
    if off + size <= len(buf):
        if fmt[-1] in "BHIQ":
            value &= (1 << (8 * size)) - 1
        elif fmt[-1] in "bhiq":
            value = ((value + (1 << (8 * size - 1))) % (1 << (8 * size))) - (1 << (8 * size - 1))
        struct.pack_into(fmt, buf, off, value)


def _mutate(fm: FieldMap, head: bytearray, rng: random.Random, family: str) -> tuple[str, int]:
    """Edit `head` (a copy of the header) in place; return (description, file length)."""
    size = fm.size
    if family == "flip":
        parts = []
        structure = [(0, fm.tokens_span[0]), (fm.tokens_span[1], fm.data_offset)]
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.45:
                lo, hi = rng.choice(structure)
            elif r < 0.7:
                lo, hi = fm.tokens_span
            else:
                lo, hi = 0, fm.data_offset
            pos = rng.randrange(lo, hi)
            old = head[pos]
            how = rng.choice(("bit", "byte", "zero", "ff"))
            head[pos] = {"bit": old ^ (1 << rng.randrange(8)), "byte": rng.randrange(256),
                         "zero": 0, "ff": 0xFF}[how]
            parts.append(f"{pos}:{old:#x}->{head[pos]:#x}")
        return "flip " + " ".join(parts), size
    if family == "truncate":
        points = fm.boundaries + [fm.data_offset + (size - fm.data_offset) // 2, size - 1]
        cut = rng.choice(points) + rng.choice((0, 0, 1, -1, rng.randint(2, 9)))
        cut = max(0, min(cut, size - 1))
        return f"truncate at {cut}", cut
    if family == "huge":
        value = rng.choice(INTERESTING_INTS + (size, size + 1, rng.getrandbits(64)))
        kind = rng.choice(("count", "key_len", "str_len", "arr_count", "n_dims", "dim", "ttype", "toffset"))
        if kind == "count":
            off, fmt = rng.choice((8, 16)), "<q"
        elif kind in ("key_len", "str_len", "arr_count"):
            keys = [k for k, f in fm.kv.items() if kind == "key_len"
                    or (kind == "str_len" and f["tname"] == "str") or (kind == "arr_count" and "count" in f)]
            key = rng.choice(keys)
            f = fm.kv[key]
            off = {"key_len": f["key_len"], "str_len": f["value"], "arr_count": f.get("count")}[kind]
            fmt = "<Q"
            kind += f"({key})"
        else:
            name = rng.choice(list(fm.tensors))
            t = fm.tensors[name]
            if kind == "dim":
                off, fmt = t["dims"] + 8 * rng.randrange(t["n_dims_value"]), "<q"
            else:
                off = t[{"n_dims": "n_dims", "ttype": "type", "toffset": "offset"}[kind]]
                fmt = "<Q" if kind == "toffset" else "<I"
            kind += f"({name})"
        _put(head, off, fmt, value)
        return f"huge {kind} @{off} = {value}", size
    if family == "dup":
        if rng.random() < 0.75:
            length = rng.choice([n for n, ids in fm.by_len.items() if len(ids) > 1])
            i, j = rng.sample(fm.by_len[length], 2)
            head[fm.token_at[j]:fm.token_at[j] + length] = fm.tokens[i].encode()
            return f"dup token {j} := token {i} {fm.tokens[i]!r}", size
        # a NUL that makes libllama read a token as a shorter one
        j = rng.choice([i for i, t in enumerate(fm.tokens) if len(t.encode()) > 1])
        k = rng.randrange(1, len(fm.tokens[j].encode()))
        head[fm.token_at[j] + k] = 0
        return f"nul in token {j} {fm.tokens[j]!r} at byte {k}", size
    if family == "value":
        key = rng.choice([k for k, f in fm.kv.items() if not f["tname"].startswith("arr")])
        f = fm.kv[key]
        tname, off = f["tname"], f["value"]
        if tname == "str":
            n = struct.unpack_from("<Q", head, off)[0]
            choices = SAME_LENGTH_STRINGS.get(n)
            if not choices:
                pos = off + 8 + rng.randrange(max(n, 1))
                head[pos] = rng.randrange(256)
                return f"value {key} byte {pos - off - 8} -> {head[pos]:#x}", size
            new = rng.choice(choices)
            head[off + 8:off + 8 + n] = new
            return f"value {key} = {new!r}", size
        if tname in ("f32", "f64"):
            value = rng.choice(INTERESTING_FLOATS)
            _put(head, off, "<f" if tname == "f32" else "<d", value)
        else:
            fmt = {"u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I", "i32": "<i",
                   "bool": "<B", "u64": "<Q", "i64": "<q"}[tname]
            value = rng.choice(INTERESTING_INTS)
            _put(head, off, fmt, value)
        return f"value {key} ({tname}) = {value}", size
    if family == "type":
        key = rng.choice(list(fm.kv))
        f = fm.kv[key]
        off = f["elem_type"] if "elem_type" in f and rng.random() < 0.5 else f["type"]
        new = rng.randrange(14) if rng.random() < 0.9 else rng.getrandbits(32)
        _put(head, off, "<I", new)
        return f"type of {key} @{off} = {new}", size
    if family == "clean":
        return "no mutation", size
    raise ValueError(family)


def build_case(fm: FieldMap, real: FieldMap | None, seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    # the first cases walk through every family once, so even a short run covers them all
    family = FAMILIES[index] if index < len(FAMILIES) else rng.choices(FAMILIES, WEIGHTS)[0]
    if family == "real_cut":
        if real is None:
            family = "truncate"
        else:
            # the real model's header, mutated, with its data cut after up to 2 MB
            head = bytearray(real.header)
            sub = rng.choice(("flip", "huge", "dup", "value", "type", "clean"))
            what, _ = _mutate(real, head, rng, sub)
            end = real.data_offset + rng.randrange(0, 2 << 20)
            return Case(index, family, f"real header, {what}, data cut at {end}", bytes(head),
                        real.data_offset, end, "real")
    head = bytearray(fm.header)
    what, length = _mutate(fm, head, rng, family)
    if length <= len(head):
        return Case(index, family, what, bytes(head[:length]), 0, 0, "base")
    return Case(index, family, what, bytes(head), fm.data_offset, length, "base")


def write_case(case: Case, sources: dict[str, memoryview], path: Path) -> None:
    with open(path, "wb") as f:
        f.write(case.header)
        if case.tail_end > case.tail_start:
            f.write(sources[case.source][case.tail_start:case.tail_end])


# ------------------------------------------------------------------ running

def _worker_main(paths: list[str]) -> None:
    """Runs in the subprocess: the CLI's check + load for each file, one line per event."""
    from pylazy.errors import ModelLoadError
    from pylazy.gguf_check.cli import _load_and_run, run_cli
    abort_on = os.environ.get("PYLAZY_FUZZ_SELFTEST_ABORT")   # lets a test check crash detection
    no_check = os.environ.get("PYLAZY_FUZZ_NO_CHECK") == "1"
    for i, p in enumerate(paths):
        print(f"START {i}", flush=True)
        if abort_on and p.endswith(abort_on):
            os.abort()
        if no_check:   # --no-check: straight to native code, to see what the gate prevents
            try:
                code, msg = 0, _load_and_run(p)
            except ModelLoadError as e:
                code, msg = 2, str(e)
        else:
            code, msg = run_cli(p, load=True)
        print(f"DONE {i} {code} {msg.splitlines()[0] if msg else ''}", flush=True)


def _run_alone(path: Path, timeout: float) -> tuple[int | None, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "pylazy.gguf_check", str(path), "--load"], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s alone"
    tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
    return r.returncode, " | ".join(tail)


def _run_batch(cases: list[Case], paths: list[Path], timeout: float) -> list[Result]:
    results: list[Result] = []
    while len(results) < len(cases):
        todo = paths[len(results):]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *map(str, todo)]
        timed_out = False
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout * len(todo))
            out, rc, err = r.stdout, r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc, timed_out = "", None, True
        done = {}
        for line in out.splitlines():
            if line.startswith("DONE "):
                _, i, code, *msg = line.split(" ", 3)
                done[int(i)] = (int(code), msg[0] if msg else "")
        base = len(results)
        for i in range(len(todo)):
            if i not in done:
                break
            code, msg = done[i]
            bad = code not in (0, 2)
            results.append(Result(cases[base + i], None if bad else code, msg))
        if len(results) - base == len(todo) and rc == 0:
            continue
        if len(results) - base == len(todo):   # all cases answered but the worker exit was odd
            results[-1] = Result(results[-1].case, None, f"worker exit {rc} after the batch: {err[-300:]}")
            continue
        # the worker died on case `base + len(done)`: re-run that one alone to pinpoint it
        k = len(results)
        code, msg = _run_alone(paths[k], timeout)
        how = "timed out" if timed_out else f"worker exit {rc}"
        if code in (0, 2):
            msg = f"{how} in batch, but alone exit {code} ({msg}); worker stderr: {err[-300:]}"
        else:
            msg = f"{how}; alone {'exit ' + str(code) if code is not None else 'too'}: {msg}"
        results.append(Result(cases[k], None, msg))
    return results


def run_fuzz(n_cases: int, seed: int, workdir: Path | None = None, *, base: str | None = None,
             real: str | None = DEFAULT_MODEL, jobs: int = 2, batch: int = 25, timeout: float = 30.0,
             keep: Path | None = None, log=print) -> FuzzReport:
    t0 = time.time()
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fuzz_gguf_")) if own_dir else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        base = base or make_base(workdir)
        fm = FieldMap(base)
        sources = {"base": memoryview(Path(base).read_bytes())}
        real_fm = FieldMap(real) if real and os.path.exists(real) else None
        if real_fm is not None:
            sources["real"] = memoryview(real_fm.head_and_some)
        report = FuzzReport(seed=seed)

        def one_batch(start: int) -> list[Result]:
            cases = [build_case(fm, real_fm, seed, i) for i in range(start, min(start + batch, n_cases))]
            bdir = workdir / f"batch{start}"
            bdir.mkdir(exist_ok=True)
            paths = [bdir / f"case{c.index}.gguf" for c in cases]
            for c, p in zip(cases, paths):
                write_case(c, sources, p)
            results = _run_batch(cases, paths, timeout)
            for res, p in zip(results, paths):
                if res.code is None and keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, keep / f"crash_seed{seed}_case{res.case.index}.gguf")
            shutil.rmtree(bdir, ignore_errors=True)
            return results

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for results in pool.map(one_batch, range(0, n_cases, batch)):
                for res in results:
                    c = res.case
                    report.cases += 1
                    fam = report.by_family.setdefault(c.family, [0, 0])
                    if res.code is None:
                        report.crashes.append(f"seed {seed} case {c.index} [{c.family}] {c.what}: {res.message}")
                        log("CRASH " + report.crashes[-1])
                    elif res.code == 0:
                        report.loaded += 1
                        fam[0] += 1
                        if c.family in MUST_REJECT:
                            report.missed.append(f"seed {seed} case {c.index} [{c.family}] {c.what}")
                    else:
                        report.rejected += 1
                        fam[1] += 1
        report.seconds = time.time() - t0
        return report
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=int(os.environ.get("PYLAZY_FUZZ_CASES", 150)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", help="valid GGUF to mutate (default: a tiny model built here)")
    ap.add_argument("--real", default=DEFAULT_MODEL, help="model whose header is also mutated, data cut")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    ap.add_argument("--keep-crashes", type=Path, help="copy crashing files here")
    ap.add_argument("--show", type=int, nargs="*", help="print these cases' mutations and exit")
    ap.add_argument("--no-check", action="store_true",
                    help="skip check_gguf: shows what reaches native code without the gate")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.no_check:
        os.environ["PYLAZY_FUZZ_NO_CHECK"] = "1"   # inherited by the workers
    if args.worker is not None:
        _worker_main(args.worker)
        return 0
    if args.show is not None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz_gguf_"))
        fm = FieldMap(args.base or make_base(workdir))
        real_fm = FieldMap(args.real) if args.real and os.path.exists(args.real) else None
        for i in args.show:
            c = build_case(fm, real_fm, args.seed, i)
            print(i, c.family, c.what)
        return 0
    report = run_fuzz(args.cases, args.seed, args.workdir, base=args.base, real=args.real, jobs=args.jobs,
                      batch=args.batch, timeout=args.timeout, keep=args.keep_crashes)
    print(report.summary())
    for line in report.crashes + report.missed:
        print("  " + line)
    return 1 if report.crashes or report.missed else 0


if __name__ == "__main__":
    sys.exit(main())
