"""The OpenAI-compatible HTTP app: FastAPI routes over a pool of ``pylazy.Llama`` slots.

    POST /v1/completions, POST /v1/chat/completions   (stream: SSE ending "data: [DONE]")
    GET  /v1/models, GET /health, GET / (the web chat)

Every refused request gets OpenAI's ``{"error": {message, type, param, code}}`` with 400
(bad JSON, unknown field, wrong type, bad value, prompt over the context), 404/405 for
routes, 413 for bodies over ``MAX_BODY_BYTES``; nothing a client sends stops the server.
Responses carry ``usage`` and pylazy's own counters under ``"pylazy"`` (streams: on the
chunk with the finish reason).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflowError
from ..grammar import GrammarMask, grammar_for_response_format
from ..llama_ref import reference_llama
from .schemas import (ChatRequest, CompletionRequest, RequestError, chat_kwargs, completion_kwargs,
                      error_body)
from .slots import Cancelled, Job, Slot, SlotPool, cancel_processor

MAX_BODY_BYTES = 16 * 2 ** 20
STATIC = Path(__file__).resolve().parent / "static"
# the scalar counters of Llama.stats that a response reports (the per-layer lists stay home)
STAT_KEYS = ("prompt_tokens", "reused_tokens", "prefill_s", "decode_s", "total_s", "ttft_s", "decode_tok_s",
             "generated_tokens", "computed_fraction", "revived_tokens", "kv_bytes", "full_steps",
             "recycled_steps", "recycle_k", "mean_query_similarity", "lazy_schedule")


def _error_response(exc: BaseException, param: Optional[str] = None) -> JSONResponse:
    """The HTTP answer for an exception raised while validating or running a request."""
    if isinstance(exc, RequestError):
        return JSONResponse(error_body(str(exc), exc.type, exc.param, exc.code), status_code=exc.status)
    if isinstance(exc, ContextOverflowError) or (isinstance(exc, ValueError) and "context window" in str(exc)):
        return JSONResponse(error_body(str(exc), param=param, code="context_length_exceeded"), status_code=400)
    if isinstance(exc, (ValueError, TypeError)):   # Llama's own checks of the arguments
        return JSONResponse(error_body(str(exc), param=param), status_code=400)
    if isinstance(exc, jinja2.TemplateError):   # the model's chat template refused the messages
        return JSONResponse(error_body(f"chat template: {exc}", param="messages"), status_code=400)
    return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)


def _validation_message(exc: ValidationError) -> tuple:
    """(OpenAI-style message, param) for the first problem pydantic found."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc}", loc
    return f"{loc}: {first['msg']}", loc.split(".")[0] or None


def _public_stats(stats: Dict[str, Any], slot: Slot, policy: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: stats.get(k) for k in STAT_KEYS if k in stats}
    out["slot"] = slot.index
    out["policy"] = policy
    return out


def _policy_json(value: Any) -> Any:
    if value is None:
        return None
    return {"type": type(value).__name__, **dataclasses.asdict(value)}


def _history_key(kind: str, kw: Dict[str, Any]) -> str:
    """Text standing for the request's prompt, to send a conversation back to its slot."""
    if kind == "chat":
        return "".join(f"{m['role']}\x1f{m.get('content') or ''}\x1e" for m in kw["messages"])
    return kw["prompt"] if isinstance(kw["prompt"], str) else json.dumps(kw["prompt"])


def _answer_text(kind: str, obj: Dict[str, Any]) -> str:
    choice = obj["choices"][0] if obj.get("choices") else {}
    if kind == "chat":
        part = choice.get("message") or choice.get("delta") or {}
        return part.get("content") or ""
    return choice.get("text") or ""


@dataclasses.dataclass
class _Exchange:
    """One request on its way: its kind, the job running it, the answer text so far."""

    kind: str
    key: str
    policy: Dict[str, Any]
    job: Optional[Job] = None
    answer: List[str] = dataclasses.field(default_factory=list)

    def record(self, event: tuple) -> tuple:
        if event[0] in ("result", "chunk"):
            self.answer.append(_answer_text(self.kind, event[1][0] if event[0] == "result" else event[1]))
        return event

    def history_after(self) -> str:
        """The slot's history key once this answer is cached there."""
        text = "".join(self.answer)
        return self.key + (f"assistant\x1f{text}\x1e" if self.kind == "chat" else text)


class Server:
    """The app's state: the slot pool, the model's name, the running jobs."""

    def __init__(self, llamas: List[Any], model_name: str):
        self.pool = SlotPool(llamas)
        self.model_name = model_name
        self.created = int(time.time())
        self.jobs: set = set()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}   # requests that reached a slot
        first = llamas[0]
        self.n_vocab, self.n_ctx, self.n_layer = first.n_vocab(), first.n_ctx(), first.n_layer()
        # A tokenizer of the server's own (the slots' are busy on their threads) to check
        # grammars before a request queues for a slot.
        from llama_cpp._utils import suppress_stdout_stderr
        with suppress_stdout_stderr(disable=False):   # its context warns about n_ctx on stderr
            self._vocab = reference_llama(first.model_path, vocab_only=True, verbose=False)

    def defaults(self) -> Dict[str, Any]:
        first = self.pool.slots[0].llama
        return {"lazy": first.lazy, "recycle": first.recycle}

    async def handle(self, request: Request, kind: str) -> Response:
        try:
            req, kw = await self._parse(request, kind)
        except RequestError as exc:
            return _error_response(exc)
        policy = {**self.defaults(), **{k: kw[k] for k in ("lazy", "recycle") if k in kw}}
        ex = _Exchange(kind, _history_key(kind, kw), {k: _policy_json(v) for k, v in policy.items()})
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            if not await self._start(ex, kw, watcher):
                return Response(status_code=499)   # the client left while queued
            first = ex.record(await self._first_event(ex.job, watcher))
        finally:
            watcher.cancel()   # a stream's connection is watched by sse-starlette from here on
        if first[0] == "error":
            if isinstance(first[1], Cancelled):
                return Response(status_code=499)
            return _error_response(first[1], "messages" if kind == "chat" else "prompt")
        if not req.stream:
            result, stats = first[1]
            result["pylazy"] = _public_stats(stats, ex.job.slot, ex.policy)
            return JSONResponse(result)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(self._sse(ex, first, include_usage), ping=15)

    async def _parse(self, request: Request, kind: str):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError("request body must be a JSON object", code="invalid_json")
        model = ChatRequest if kind == "chat" else CompletionRequest
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise RequestError(message, param) from None
        make = chat_kwargs if kind == "chat" else completion_kwargs
        kw = make(req, self.n_vocab)
        kw["model"] = self.model_name   # the response names the model that answered
        if kw.get("lazy") is not None:
            try:
                kw["lazy"].resolve(self.n_layer)
            except ValueError as exc:
                raise RequestError(f"lazy: {exc}", "lazy") from None
        await asyncio.to_thread(self._check_grammar, kw)
        return req, kw

    def _check_grammar(self, kw: Dict[str, Any]) -> None:
        """Turn response_format into kw["grammar"]; refuse a grammar that does not parse."""
        param = "grammar"
        if "response_format" in kw:
            try:
                from_format = grammar_for_response_format(kw.pop("response_format"))
            except ValueError as exc:
                raise RequestError(f"response_format: {exc}", "response_format") from None
            if from_format is not None:
                param = "response_format"
                if "grammar" in kw:
                    raise RequestError("give grammar or a JSON response_format, not both", param)
                kw["grammar"] = from_format
        if kw.get("grammar") is not None:
            try:
                GrammarMask(self._vocab._model.vocab, kw["grammar"]).close()
            except ValueError as exc:
                raise RequestError(f"{param}: {exc}", param) from None

    def close(self) -> None:
        for job in list(self.jobs):   # running generations end within a decode step
            job.cancel.set()
        self._vocab.close()

    @staticmethod
    async def _watch_disconnect(request: Request) -> None:
        """Returns once the client has gone (after the body was read, only that can come)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def _start(self, ex: _Exchange, kw: Dict[str, Any], watcher) -> bool:
        """Wait for a slot and start the job on it; False if the client left first."""
        acquire = asyncio.ensure_future(self.pool.acquire(ex.key))
        done, _ = await asyncio.wait({acquire, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if acquire not in done:
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
            return False

        def call(llama):
            fn = llama.create_chat_completion if ex.kind == "chat" else llama.create_completion
            return fn(**kw, logits_processor=cancel_processor(ex.job.cancel))

        def on_done(slot: Slot, error: Optional[BaseException]) -> None:
            self.jobs.discard(ex.job)
            outcome = "completed" if error is None else "cancelled" if isinstance(error, Cancelled) else "failed"
            self.counts[outcome] += 1
            # a cancelled answer is cut short: its text is only a guide to what the slot holds
            slot.history_key = ex.history_after() if error is None or outcome == "cancelled" else ""

        ex.job = Job(self.pool, acquire.result(), call, on_done)
        self.jobs.add(ex.job)
        ex.job.start()
        return True

    @staticmethod
    async def _first_event(job: Job, watcher) -> tuple:
        """The job's first event (result, first chunk or error); the client leaving
        meanwhile cancels the job."""
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            job.cancel.set()
        return await get

    async def _sse(self, ex: _Exchange, event: tuple, include_usage: bool):
        """SSE data events: the chunks as they come; the chunk with the finish reason waits
        for the end, to carry usage and stats."""
        final: Optional[Dict[str, Any]] = None
        try:
            while True:
                kind, value = event
                if kind == "chunk":
                    if final is not None:   # not the last after all: keep the order
                        yield json.dumps(final)
                        final = None
                    if value["choices"] and value["choices"][0].get("finish_reason") is not None:
                        final = value
                    else:
                        yield json.dumps(value)
                elif kind == "end":
                    yield json.dumps(_final_chunk(final, value, ex))
                    if include_usage:
                        yield json.dumps(_usage_chunk(final, value))
                    yield "[DONE]"
                    return
                else:   # an error after the stream began: OpenAI clients raise on an "error" event
                    if not isinstance(value, Cancelled):
                        yield json.dumps(_error_json(value))
                    yield "[DONE]"
                    return
                event = ex.record(await ex.job.events.get())
        finally:
            ex.job.cancel.set()   # client gone (or done): stop within a decode step, free the slot


def _error_json(exc: BaseException) -> Dict[str, Any]:
    return json.loads(_error_response(exc).body)


def _usage(stats: Dict[str, Any]) -> Dict[str, int]:
    p, c = int(stats.get("prompt_tokens") or 0), int(stats.get("generated_tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _final_chunk(final: Optional[Dict[str, Any]], stats: Dict[str, Any], ex: _Exchange) -> Dict[str, Any]:
    final = dict(final or {"choices": []})
    final["usage"] = _usage(stats)
    final["pylazy"] = _public_stats(stats, ex.job.slot, ex.policy)
    return final


def _usage_chunk(final: Optional[Dict[str, Any]], stats: Dict[str, Any]) -> Dict[str, Any]:
    """OpenAI's stream_options.include_usage: one more chunk, no choices, the usage."""
    base = {k: final[k] for k in ("id", "object", "created", "model") if final and k in final}
    return {**base, "choices": [], "usage": _usage(stats)}


def create_app(llamas: List[Any], model_name: str) -> FastAPI:
    """The app serving ``llamas`` (one slot each) under the model id ``model_name``."""
    server = Server(llamas, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="pylazy", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, "chat")

    @app.get("/v1/models")
    async def models():
        meta = {"n_ctx": server.n_ctx, "n_vocab": server.n_vocab, "slots": len(server.pool.slots),
                "defaults": {k: _policy_json(v) for k, v in server.defaults().items()}}
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                             "created": server.created, "owned_by": "pylazy",
                                             "meta": meta}]}

    @app.get("/health")
    async def health():
        pool = server.pool
        return {"status": "ok", "slots_idle": pool.n_idle, "slots_processing": len(pool.slots) - pool.n_idle,
                "requests_waiting": pool.n_waiting, "requests": dict(server.counts)}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app
