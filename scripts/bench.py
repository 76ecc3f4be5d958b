#!/usr/bin/env python3
"""pylazy vs llama-cpp-python speed tables: the same as `python -m pylazy bench ARGS...`.

    PYTHONPATH=. python scripts/bench.py --quick
    PYTHONPATH=. python scripts/bench.py --json docs/bench-cpu.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a source checkout

from pylazy.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
