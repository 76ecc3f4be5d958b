"""Tuned profiles: per-model-file default policies that `pylazy tune` writes and Llama reads.

A profile is a JSON file named after the model file's identity, in the profiles folder:
``$PYLAZY_PROFILES`` if set ("off" disables profiles), else ``<cache>/profiles`` (the cache
folder of pylazy/parts.py, ``~/.cache/pylazy``). Its ``lazy`` and ``recycle`` entries become the
defaults of ``Llama(model_path=...)`` for that file wherever the caller leaves them unset
(``...``); an explicit ``lazy=`` / ``recycle=`` (``None`` included: full attention) wins.

The identity is not the path (a copied or moved file keeps its profile) and not a hash of the
whole file (that would read 0.5-5 GB on every load): sha256 over the size and 16 blocks of
64 KiB at evenly spaced offsets, the first block covering the GGUF header and metadata. Two
files that differ only between the sampled blocks would share a profile; GGUF files that differ
in weights, quantization or metadata differ in the sampled blocks or in size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Tuple

from .errors import PylazyError
from .policy import LazyPrefill, Recycle, StreamingWindow

FORMAT = 1
_BLOCKS, _BLOCK = 16, 1 << 16
_POLICY_CLASSES = {"LazyPrefill": LazyPrefill, "Recycle": Recycle, "StreamingWindow": StreamingWindow}


def profiles_dir() -> Optional[Path]:
    """The profiles folder, or None when profiles are off (PYLAZY_PROFILES=off)."""
    env = os.environ.get("PYLAZY_PROFILES")
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    if env:
        return Path(env).expanduser()
    from .parts import cache_root
    return cache_root() / "profiles"


def file_identity(path: str) -> str:
    """A short hex key for the model file's content (see the module doc)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"pylazy-profile-id {size}\n".encode())
    with open(path, "rb") as f:
        for i in range(_BLOCKS):
            f.seek(max(0, (size - _BLOCK) * i // (_BLOCKS - 1)))
            h.update(f.read(_BLOCK))
    return h.hexdigest()[:24]


def profile_path(model_path: str, folder: Optional[Path] = None) -> Optional[Path]:
    folder = profiles_dir() if folder is None else Path(folder)
    return None if folder is None else folder / f"{file_identity(model_path)}.json"


def policy_to_dict(policy) -> Optional[dict]:
    """{"type": class name, **fields} of a policy object; None stays None."""
    if policy is None:
        return None
    if type(policy).__name__ not in _POLICY_CLASSES:
        raise TypeError(f"not a pylazy policy: {policy!r}")
    return {"type": type(policy).__name__, **dataclasses.asdict(policy)}


def policy_from_dict(d: Optional[dict]):
    """The inverse of policy_to_dict; the policy classes validate the values."""
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("type") not in _POLICY_CLASSES:
        raise ValueError(f"a policy must be an object with type one of {sorted(_POLICY_CLASSES)}, got {d!r}")
    cls = _POLICY_CLASSES[d["type"]]
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "type"}
    return cls(**fields)


def save_profile(model_path: str, profile: dict, folder: Optional[Path] = None) -> Path:
    """Write the profile for this model file; returns its path."""
    path = profile_path(model_path, folder)
    if path is None:
        raise PylazyError("profiles are off (PYLAZY_PROFILES=off); nowhere to write the profile")
    policy_from_dict(profile.get("lazy")), policy_from_dict(profile.get("recycle"))   # refuse bad ones
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **profile}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_profile(model_path: str, folder: Optional[Path] = None) -> Optional[dict]:
    """The profile of this model file with its policies as objects, or None if there is none.

    A profile that cannot be read raises PylazyError naming the file: a default that
    silently vanished would change results without a word."""
    folder = profiles_dir() if folder is None else Path(folder)
    if folder is None or not folder.is_dir():   # no folder: no hashing either
        return None
    path = profile_path(model_path, folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else data!r}, expected {FORMAT}")
        lazy, recycle = policy_from_dict(data.get("lazy")), policy_from_dict(data.get("recycle"))
    except (ValueError, TypeError) as e:
        raise PylazyError(f"{path}: not a valid pylazy profile ({e}); delete it or run `pylazy tune` "
                          "again") from None
    if lazy is not None and not isinstance(lazy, LazyPrefill):
        raise PylazyError(f"{path}: 'lazy' must be a LazyPrefill, got {type(lazy).__name__}")
    if isinstance(recycle, LazyPrefill):
        raise PylazyError(f"{path}: 'recycle' must be a Recycle or StreamingWindow")
    return {**data, "lazy": lazy, "recycle": recycle, "path": str(path)}


def default_policies(model_path: str, lazy: Any, recycle: Any) -> Tuple[Any, Any, Optional[str]]:
    """(lazy, recycle, profile path or None): Llama's constructor arguments with those left unset
    (``...``) taken from the file's profile, or None (full attention) without one."""
    profile = load_profile(model_path) if (lazy is ... or recycle is ...) else None
    used = None
    if lazy is ...:
        lazy = profile["lazy"] if profile else None
        used = profile["path"] if profile else None
    if recycle is ...:
        recycle = profile["recycle"] if profile else None
        used = profile["path"] if profile else None
    return lazy, recycle, used


def profile_summary(model_path: str) -> Optional[str]:
    """One line for `pylazy info`: the profile's path and policies, or None."""
    p = load_profile(model_path)
    if p is None:
        return None
    tuned = p.get("tuned", {})
    return (f"{p['path']} (lazy={p['lazy']!r}, recycle={p['recycle']!r}; tuned at "
            f"{tuned.get('length')} tokens on {tuned.get('prompts')} prompts, "
            f"min accuracy {tuned.get('min_accuracy')} of full)")
