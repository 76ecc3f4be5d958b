"""Request bodies of the OpenAI-compatible endpoints, and their translation into
``pylazy.Llama`` keyword arguments.

Fields are OpenAI's (``/v1/completions``, ``/v1/chat/completions``) plus llama-cpp-python
server's sampling extras (``top_k``, ``min_p``, ``repeat_penalty``, ``grammar``, ...) and
pylazy's per-request ``lazy`` / ``recycle`` objects. Unknown top-level fields are rejected,
as OpenAI rejects them ("Unrecognized request argument"); types are strict (a string is no
number), so a typo fails loudly instead of sampling with a default.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from typing_extensions import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..policy import LazyPrefill, Recycle, StreamingWindow

Number = Union[StrictInt, StrictFloat]
PolicyJSON = Union[None, StrictBool, Dict[str, Any]]


class RequestError(ValueError):
    """A request the server refuses: HTTP status, OpenAI error type, offending param, code."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.code, self.status, self.type = param, code, status, type


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    """Fields both endpoints share. Ranges are OpenAI's where it has one."""

    model: Optional[StrictStr] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Number = Field(0.8, ge=0.0, le=2.0)
    top_p: Number = Field(0.95, ge=0.0, le=1.0)
    min_p: Number = Field(0.05, ge=0.0, le=1.0)
    typical_p: Number = Field(1.0, ge=0.0, le=1.0)
    top_k: StrictInt = Field(40, ge=0)
    repeat_penalty: Number = Field(1.0, gt=0.0)
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[StrictInt] = None
    stop: Union[None, StrictStr, Annotated[List[StrictStr], Field(max_length=16)]] = None
    logit_bias: Optional[Dict[str, Number]] = None
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request")
    user: Optional[StrictStr] = None
    grammar: Optional[StrictStr] = None
    response_format: Optional[Dict[str, Any]] = None
    mirostat_mode: StrictInt = Field(0, ge=0, le=0, description="mirostat is not implemented")
    mirostat_tau: Number = 5.0
    mirostat_eta: Number = 0.1
    tfs_z: Number = 1.0
    lazy: PolicyJSON = None
    recycle: PolicyJSON = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]] = ""
    suffix: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    best_of: StrictInt = Field(1, ge=1, le=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: StrictStr
    text: Optional[StrictStr] = None


class Message(BaseModel):
    # Clients echo assistant messages back with OpenAI's extra keys (refusal, audio, ...): ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[None, StrictStr, List[ContentPart]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[StrictStr] = None
    function_call: Optional[Dict[str, Any]] = None


class ChatRequest(_Sampling):
    messages: List[Message] = Field(..., min_length=1)
    temperature: Number = Field(0.2, ge=0.0, le=2.0)   # llama-cpp-python's chat default
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Union[None, StrictStr, Dict[str, Any]] = None
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Union[None, StrictStr, Dict[str, Any]] = None
    parallel_tool_calls: Optional[StrictBool] = None


# ----- translation into Llama keywords ---------------------------------------------------
_LAZY_KEYS = {"layers", "keep", "pool"}
_RECYCLE_KEYS = {"k", "stride", "dynamic_threshold", "check_every", "pool", "share"}
_WINDOW_KEYS = {"sinks", "window", "stride"}


def _policy_call(cls, keys: set, value: Dict[str, Any], param: str):
    unknown = sorted(set(value) - keys)
    if unknown:
        raise RequestError(f"{param}: unknown field(s) {unknown}; allowed: {sorted(keys)}", param)
    try:
        return cls(**value)
    except (TypeError, ValueError) as exc:   # the policy classes name the bad value
        raise RequestError(f"{param}: {exc}", param) from None


def lazy_policy(value: PolicyJSON) -> Optional[LazyPrefill]:
    """null / false: full prefill; true or {}: the default LazyPrefill(); {layers, keep, pool}."""
    if value is None or value is False:
        return None
    if value is True:
        return LazyPrefill()
    return _policy_call(LazyPrefill, _LAZY_KEYS, value, "lazy")


def recycle_policy(value: PolicyJSON) -> Union[None, Recycle, StreamingWindow]:
    """null / false: full attention in decode; {k, stride, ...}: Recycle; {"type":
    "streaming", sinks, window, stride} (or a "window" key): StreamingWindow."""
    if value is None or value is False:
        return None
    if value is True:
        raise RequestError("recycle: give an object such as {\"k\": 256} (k has no default)", "recycle")
    value = dict(value)
    kind = value.pop("type", "streaming" if "window" in value else "recycle")
    if kind == "streaming":
        return _policy_call(StreamingWindow, _WINDOW_KEYS, value, "recycle")
    if kind != "recycle":
        raise RequestError(f"recycle: type must be 'recycle' or 'streaming', got {kind!r}", "recycle")
    if "k" not in value:
        raise RequestError("recycle: k (tokens kept per KV head) is required", "recycle")
    return _policy_call(Recycle, _RECYCLE_KEYS, value, "recycle")


def _logit_bias(bias: Optional[Dict[str, float]], n_vocab: int) -> Optional[Dict[int, float]]:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < n_vocab:
            raise RequestError(f"logit_bias: {key!r} is not a token id in [0, {n_vocab})", "logit_bias")
        if not -100 <= value <= 100:
            raise RequestError(f"logit_bias: {value} for token {key} is outside [-100, 100]", "logit_bias")
        out[int(key)] = float(value)
    return out


def _common_kwargs(req: _Sampling, n_vocab: int) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(
        temperature=float(req.temperature), top_p=float(req.top_p), min_p=float(req.min_p),
        typical_p=float(req.typical_p), top_k=req.top_k, repeat_penalty=float(req.repeat_penalty),
        presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty),
        seed=req.seed, stop=req.stop if req.stop is not None else [], stream=req.stream,
        logit_bias=_logit_bias(req.logit_bias, n_vocab), tfs_z=float(req.tfs_z),
        mirostat_tau=float(req.mirostat_tau), mirostat_eta=float(req.mirostat_eta))
    if req.grammar is not None:
        from llama_cpp.llama_grammar import LlamaGrammar
        kw["grammar"] = LlamaGrammar.from_string(req.grammar)   # parsed (and refused) by Llama
    if req.response_format is not None:
        kw["response_format"] = req.response_format
    # absent = the server's default policy; null/false = full attention
    if "lazy" in req.model_fields_set:
        kw["lazy"] = lazy_policy(req.lazy)
    if "recycle" in req.model_fields_set:
        kw["recycle"] = recycle_policy(req.recycle)
    return kw


def completion_kwargs(req: CompletionRequest, n_vocab: int) -> Dict[str, Any]:
    """Llama.create_completion keywords (prompt included) for a completion request."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError("one prompt per request (a list of several prompts is not supported)", "prompt")
        prompt = prompt[0]
    kw = _common_kwargs(req, n_vocab)
    kw.update(prompt=prompt, suffix=req.suffix, max_tokens=req.max_tokens, echo=req.echo,
              logprobs=req.logprobs)
    return kw


def _message_dict(msg: Message, index: int) -> Dict[str, Any]:
    content: Any = msg.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise RequestError(f"messages[{index}]: only text content parts are supported, "
                                   f"got {part.type!r}", "messages")
            texts.append(part.text)
        content = "".join(texts)
    if content is None and msg.role not in ("assistant", "function"):
        raise RequestError(f"messages[{index}]: a {msg.role} message needs content", "messages")
    out: Dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id", "function_call"):
        if getattr(msg, key) is not None:
            out[key] = getattr(msg, key)
    return out


def chat_kwargs(req: ChatRequest, n_vocab: int) -> Dict[str, Any]:
    """Llama.create_chat_completion keywords (messages included) for a chat request."""
    kw = _common_kwargs(req, n_vocab)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    kw.update(messages=[_message_dict(m, i) for i, m in enumerate(req.messages)],
              max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
              tools=req.tools, tool_choice=req.tool_choice, functions=req.functions,
              function_call=req.function_call)
    return kw
