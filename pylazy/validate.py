"""Checks of the Python API's arguments (Llama and its calls): each returns the value it accepts."""
from __future__ import annotations

from numbers import Integral
from typing import Any, Optional

from .generate import RecyclePolicy
from .policy import LazyPrefill, Recycle, StreamingWindow

Lazy = Optional[LazyPrefill]


def check_lazy(lazy: Any) -> Lazy:
    if lazy is not None and not isinstance(lazy, LazyPrefill):
        raise TypeError(f"lazy must be a pylazy.LazyPrefill or None, got {type(lazy).__name__}")
    return lazy


def check_recycle(recycle: Any) -> RecyclePolicy:
    if recycle is not None and not isinstance(recycle, (Recycle, StreamingWindow)):
        raise TypeError("recycle must be a pylazy.Recycle, pylazy.StreamingWindow or None, "
                        f"got {type(recycle).__name__}")
    return recycle


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
