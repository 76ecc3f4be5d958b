"""`pylazy serve` as its users meet it: a server process on 127.0.0.1 started here, the
official `openai` client and raw HTTP against it, answers checked against pylazy.Llama."""
from __future__ import annotations

import http.client
import json
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
jsonschema = pytest.importorskip("jsonschema")

from pylazy import LazyPrefill, Llama, Recycle  # noqa: E402
from tests.server_process import request, start_server, stop_server  # noqa: E402

N_CTX = 512
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--ctx", str(N_CTX))
    yield base
    assert proc.poll() is None, "the server died during the tests"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm():
    m = Llama(n_ctx=N_CTX, verbose=False)
    yield m
    m.close()


def expected_text(llm, prompt=PROMPT, **kw):
    return llm(prompt, temperature=0, **kw)["choices"][0]["text"]


def expected_chat(llm, messages=CHAT, **kw):
    return llm.create_chat_completion(messages, temperature=0, **kw)["choices"][0]["message"]["content"]


def test_health_and_models(server, client):
    status, health = request("GET", server, "/health")
    assert status == 200 and health["status"] == "ok" and health["slots_idle"] == 1
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert models[0].owned_by == "pylazy"
    status, raw = request("GET", server, "/v1/models")
    assert raw["object"] == "list" and raw["data"][0]["meta"]["n_ctx"] == N_CTX


def test_completion_equals_llama(client, llm):
    local = llm(PROMPT, max_tokens=24, temperature=0)
    want = local["choices"][0]["text"]
    out = client.completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == want and len(want) > 20
    assert out.choices[0].finish_reason == "length"
    assert out.usage.model_dump(exclude_none=True) == local["usage"] and out.usage.completion_tokens == 24
    assert out.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    stats = out.model_extra["pylazy"]
    assert stats["generated_tokens"] == 24 and stats["kv_bytes"] > 0 and stats["computed_fraction"] == 1.0


def test_completion_stream_equals_llama(client, llm):
    want = expected_text(llm, max_tokens=24)
    chunks = list(client.completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 5   # really streamed
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_chat_equals_llama(client, llm):
    want = expected_chat(llm, max_tokens=32)
    out = client.chat.completions.create(model="any", messages=CHAT, max_tokens=32, temperature=0)
    assert out.choices[0].message.content == want and len(want) > 10
    assert out.choices[0].message.role == "assistant"
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_equals_llama_and_reuses_the_cache(client, llm):
    want = expected_chat(llm, max_tokens=32)
    stream = client.chat.completions.create(model="any", messages=CHAT, max_tokens=32, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    stats = chunks[-1].model_extra["pylazy"]
    assert stats["reused_tokens"] > 0   # the same conversation again: its prompt was cached
    # the next turn of the conversation reuses prompt + answer
    turn = CHAT + [{"role": "assistant", "content": want}, {"role": "user", "content": "One more?"}]
    out = client.chat.completions.create(model="any", messages=turn, max_tokens=8, temperature=0)
    assert out.model_extra["pylazy"]["reused_tokens"] == stats["prompt_tokens"] // 512 * 512   # whole n_ubatch chunks only (issue 18)
    assert out.choices[0].message.content == expected_chat(llm, turn, max_tokens=8)


def test_policies_per_request(client, llm):
    long_prompt = "The sea was calm and the sky was grey over the harbour. " * 12 + PROMPT
    want = expected_text(llm, long_prompt, max_tokens=16, lazy=LazyPrefill(), recycle=Recycle(k=32, stride=4))
    out = client.completions.create(model="any", prompt=long_prompt, max_tokens=16, temperature=0,
                                    extra_body={"lazy": {}, "recycle": {"k": 32, "stride": 4}})
    assert out.choices[0].text == want
    stats = out.model_extra["pylazy"]
    assert stats["computed_fraction"] < 0.8 and stats["recycled_steps"] > 0 and stats["recycle_k"] == 32
    assert stats["policy"]["lazy"]["type"] == "LazyPrefill" and stats["policy"]["recycle"]["k"] == 32
    full = client.completions.create(model="any", prompt=long_prompt, max_tokens=16, temperature=0,
                                     extra_body={"lazy": None, "recycle": None})
    assert full.model_extra["pylazy"]["computed_fraction"] == 1.0
    assert full.choices[0].text == expected_text(llm, long_prompt, max_tokens=16)
    window = client.completions.create(model="any", prompt=long_prompt, max_tokens=8, temperature=0,
                                       extra_body={"recycle": {"type": "streaming", "sinks": 4, "window": 60}})
    assert window.model_extra["pylazy"]["policy"]["recycle"]["type"] == "StreamingWindow"


def test_json_schema_response_format(client, llm):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}
    messages = [{"role": "user", "content": "Give a JSON object with the name and age of a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    out = client.chat.completions.create(model="any", messages=messages, max_tokens=60, temperature=0,
                                         response_format=fmt)
    text = out.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert text == expected_chat(llm, messages, max_tokens=60, response_format=fmt)
    grammar = 'root ::= ("yes" | "no") "."'
    yes_no = client.completions.create(model="any", prompt="Q: Is water wet?\nA:", max_tokens=8, temperature=0,
                                       extra_body={"grammar": grammar})
    assert yes_no.choices[0].text in ("yes.", "no.")


def test_logprobs_seed_stop(client, llm):
    out = client.completions.create(model="any", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    want = llm(PROMPT, max_tokens=8, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert lp.tokens == want["tokens"] and lp.token_logprobs == pytest.approx(want["token_logprobs"], abs=1e-5)
    a, b = (client.completions.create(model="any", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    full = expected_text(llm, max_tokens=24)
    stop = full.split()[2]
    cut = client.completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    long_stop = full[len(full) // 2:]   # a stop string longer than a token or two, given as a str
    cut = client.completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0, stop=long_stop)
    assert cut.choices[0].text == full[:full.index(long_stop)]


BAD_COMPLETIONS = [   # (request body or raw bytes, status, param or code the error names)
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "lazy": {"layers": [0.25, 0.5], "keep": [0.3, 0.6]}}, 400, "lazy"),
    ({"prompt": "x", "lazy": {"layers": [100], "keep": [0.5]}}, 400, "lazy"),
    ({"prompt": "x", "lazy": {"keep_all": True}}, 400, "lazy"),
    ({"prompt": "x", "lazy": "yes"}, 400, "lazy"),
    ({"prompt": "x", "recycle": {"k": 0}}, 400, "recycle"),
    ({"prompt": "x", "recycle": {"k": "many"}}, 400, "recycle"),
    ({"prompt": "x", "recycle": {"stride": 4}}, 400, "recycle"),
    ({"prompt": "x", "recycle": {"type": "bogus", "k": 4}}, 400, "recycle"),
    ({"prompt": "x", "recycle": True}, 400, "recycle"),
    ({"prompt": "x", "recycle": {"window": 0}}, 400, "recycle"),
    ({"prompt": "x", "grammar": "root ::= missing"}, 400, "grammar"),
    ({"prompt": "x", "grammar": 'root ::= root "a"'}, 400, "grammar"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""}, 400,
     "response_format"),
    ({"prompt": "x", "mirostat_mode": 2}, 400, "mirostat_mode"),
    ({"prompt": "word " * 600, "max_tokens": 4}, 400, "context_length_exceeded"),
]
BAD_CHATS = [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
     400, "response_format"),
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "context_length_exceeded"),
]


def _names(error):
    return {error["param"], error["code"]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_input_gets_openai_errors_and_the_next_request_is_right(server, llm, stream):
    want = expected_text(llm, max_tokens=12)
    for path, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHATS)):
        for body, status, name in cases:
            if isinstance(body, dict):
                body = dict(body, stream=stream)
                raw = json.dumps(body).encode()
            else:
                raw = body
            got, answer = request("POST", server, path, raw=raw)
            assert got == status, (body, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
            assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
            assert name in _names(answer["error"]), (body, answer)
            got, ok = request("POST", server, "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
            assert got == 200 and ok["choices"][0]["text"] == want, (body, ok)


def test_routes_and_limits(server):
    status, answer = request("GET", server, "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    status, answer = request("GET", server, "/v1/completions")
    assert status == 405 and "error" in answer
    status, answer = request("POST", server, "/v1/completions", raw=b"{}",
                             headers={"Content-Length": str(64 * 2 ** 20)}, timeout=10)
    assert status == 413 and "error" in answer
    status, page = request("GET", server, "/")
    assert status == 200 and "<html" in page.lower()


def _idle(server, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if request("GET", server, "/health")[1]["slots_idle"] == 1:
            return True
        time.sleep(0.05)
    return False


def test_disconnect_stops_generation_and_frees_the_slot(server, llm):
    """A stream closed after a few chunks, and a plain request given up by its client: both
    generations end as cancelled (not after the ~500 tokens each asked for), the slot is free."""
    before = request("GET", server, "/health")[1]["requests"]
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 0,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = 0
    while events < 3:
        line = resp.fp.readline()
        events += line.startswith(b"data: ")
    t0 = time.monotonic()
    conn.sock.close()
    conn.close()
    assert _idle(server), "the slot stayed busy after the client left"
    freed_s = time.monotonic() - t0
    conn = http.client.HTTPConnection(host, int(port), timeout=0.5)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 0,
                                                        "temperature": 0}),
                 {"Content-Type": "application/json"})
    with pytest.raises(OSError):   # timeout: the client gives up
        conn.getresponse()
    conn.close()
    assert _idle(server), "the slot stayed busy after the client gave up"
    assert freed_s < 30   # the counter below is the proof; this only bounds the wait
    after = request("GET", server, "/health")[1]["requests"]
    assert after["cancelled"] == before["cancelled"] + 2 and after["failed"] == before["failed"]
    status, ok = request("POST", server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert status == 200 and ok["choices"][0]["text"] == expected_text(llm, max_tokens=12)


def test_parallel_slots_queue_and_conversation_affinity(llm):
    """--parallel 2: concurrent requests all answered right by both slots; a conversation's
    next turn goes to the slot that holds it (its prompt comes from the cache)."""
    import concurrent.futures
    proc, base = start_server("--ctx", str(N_CTX), "--parallel", "2")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [PROMPT, "def fibonacci(n):", "Once upon a time,", "The three laws of motion are"] * 2
        want = {}
        for p in set(prompts):
            llm.reset()
            want[p] = expected_text(llm, p, max_tokens=12)

        def ask(p):
            out = client.completions.create(model="any", prompt=p, max_tokens=12, temperature=0)
            return p, out.choices[0].text, out.model_extra["pylazy"]["slot"]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(ask, prompts))
        assert [text for _, text, _ in results] == [want[p] for p in prompts]
        assert {slot for _, _, slot in results} == {0, 1}
        # two conversations, one per slot; each second turn returns to its own slot
        a = [{"role": "user", "content": "Name three primary colors."}]
        b = [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}]
        first = {}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for key, msgs in (("a", a), ("b", b)):
                first[key] = pool.submit(client.chat.completions.create, model="any", messages=msgs,
                                         max_tokens=16, temperature=0)
            first = {k: f.result() for k, f in first.items()}
        for key, msgs in (("a", a), ("b", b)):
            reply = first[key].choices[0].message.content
            turn = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks!"}]
            out = client.chat.completions.create(model="any", messages=turn, max_tokens=8, temperature=0)
            assert out.model_extra["pylazy"]["slot"] == first[key].model_extra["pylazy"]["slot"]
            assert out.model_extra["pylazy"]["reused_tokens"] == first[key].usage.prompt_tokens // 512 * 512   # whole chunks (issue 18)
        assert request("GET", base, "/health")[1]["requests"]["failed"] == 0
    finally:
        assert proc.poll() is None
        stop_server(proc)


def test_serve_command_line(capsys):
    from pylazy import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--parallel" in out and "--recycle-k" in out and "--n-ctx" in out
    for bad, message in ((["--parallel", "0"], "--parallel"), (["--ctx", "-1"], "--ctx"),
                         (["--port", "70000"], "--port"), (["--stride", "4"], "--recycle-k"),
                         (["--lazy-layers", "100", "--lazy-keep", "0.5"], "pruning layer 100")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["serve", *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert cli.main(["serve", "-m", "/no/such/model.gguf"]) == 2
    assert "not found" in capsys.readouterr().err
