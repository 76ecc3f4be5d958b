"""Slots: the ``Llama`` contexts requests queue for, and the threads that run them.

One slot is one ``pylazy.Llama`` (its own engine context and KV cache); ``--parallel N``
makes N. A request waits (FIFO) for a free slot, runs on a worker thread of its own, and
gives the slot back when its call has returned or raised. Among free slots a request takes
the one whose previous request shares the longest prefix with its own (a conversation's
next turn lands where its history is cached, so ``Llama`` reuses the prefix), else the one
idle longest.

Stopping: every call gets a logits processor that raises ``Cancelled`` once the request's
``cancel`` event is set (client gone, server stopping). It runs before each token is drawn,
so generation stops within one decode step and the context is left consistent (the tokens
evaluated so far stay cached for the next request).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Tuple

import numpy as np


class Cancelled(Exception):
    """The request was cancelled (client disconnected or server stopping)."""


@dataclass
class Slot:
    index: int
    llama: Any
    history_key: str = ""     # what the last request's prompt and answer were, as text
    idle_since: float = field(default_factory=time.monotonic)
    requests: int = 0


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    """Free slots and the FIFO of requests waiting for one. Use from the event loop only."""

    def __init__(self, llamas: List[Any]):
        self.slots = [Slot(i, llm) for i, llm in enumerate(llamas)]
        self._free: List[Slot] = list(self.slots)
        self._waiters: Deque[Tuple[asyncio.Future, str]] = collections.deque()

    @property
    def n_idle(self) -> int:
        return len(self._free)

    @property
    def n_waiting(self) -> int:
        return sum(1 for fut, _ in self._waiters if not fut.done())

    def _take(self, key: str) -> Slot:
        best = max(self._free, key=lambda s: (common_prefix(s.history_key, key), -s.idle_since))
        self._free.remove(best)
        return best

    async def acquire(self, key: str) -> Slot:
        """A slot for a request whose prompt reads as ``key``; waits in line if none is free."""
        if self._free and not self.n_waiting:
            return self._take(key)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, key))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # handed over just as we gave up
                self.release(fut.result())
            raise

    def release(self, slot: Slot) -> None:
        slot.idle_since = time.monotonic()
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self._free.append(slot)


def cancel_processor(cancel: threading.Event) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A logits processor that stops the call once ``cancel`` is set."""

    def check(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if cancel.is_set():
            raise Cancelled()
        return scores
    return check


class Job:
    """One request's call on a slot, run on its own thread.

    ``call(llama)`` returns a response dict or a chunk iterator. Events go to an asyncio
    queue as ("result", (dict, stats)) or ("chunk", dict) ... ("end", stats), or ("error",
    exc) at any point; "result", "end" or "error" is last. ``stats`` is a copy of the
    slot's ``Llama.stats`` taken on the worker thread, before the slot is free again. ``on_done(slot, failed)`` runs on the event loop
    after the call has fully finished, then the slot goes back to the pool.
    """

    def __init__(self, pool: SlotPool, slot: Slot, call: Callable[[Any], Any],
                 on_done: Optional[Callable[[Slot, Optional[BaseException]], None]] = None):
        self.pool, self.slot, self.call, self.on_done = pool, slot, call, on_done
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"pylazy-slot-{slot.index}", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _put(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:   # the event loop has closed (server stopped): nobody listens
            self.cancel.set()

    def _run(self) -> None:
        error: Optional[BaseException] = None
        try:
            llama = self.slot.llama
            out = self.call(llama)
            if isinstance(out, dict):
                self._put("result", (out, dict(llama.stats)))
            else:
                try:
                    for chunk in out:
                        self._put("chunk", chunk)
                finally:
                    close = getattr(out, "close", None)
                    if close is not None:
                        close()
            self._put("end", dict(llama.stats))
        except BaseException as exc:   # reported to the request; the server goes on
            error = exc
            self._put("error", exc)
        finally:
            self.slot.requests += 1
            try:
                self._loop.call_soon_threadsafe(self._finish, error)
            except RuntimeError:
                pass

    def _finish(self, error: Optional[BaseException]) -> None:
        try:
            if self.on_done is not None:
                self.on_done(self.slot, error)
        finally:
            self.pool.release(self.slot)
