"""``peftkit serve`` through the official ``openai`` Python client (pinned in requirements-dev.txt):
models list and retrieve, completions and chat completions, streaming and not, with
``stream_options.include_usage``; OpenAI-shaped errors for unknown models and routes; 503 with
Retry-After when the queue is full."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.serve.app import Limits, create_app  # noqa: E402
from peftkit.serve.engine import Engine, Job  # noqa: E402

EOS = 1


class CharTokenizer:
    """Printable ASCII <-> ids 2..96 of the tiny models' vocabulary (0: pad, 1: EOS)."""

    eos_token_id, pad_token_id, chat_template = EOS, 0, None

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 2) % 95) for i in ids if i > EOS)


def serve(engine, limits=None):
    server = uvicorn.Server(uvicorn.Config(create_app(engine, limits or Limits(max_tokens=32)), host="127.0.0.1",
                                           port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    torch.manual_seed(4)
    get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).save_pretrained(str(root / "alpha"))
    engine = Engine(tiny_llama(), CharTokenizer(), max_batch=8)
    engine.load_adapter("alpha", str(root / "alpha"))
    server, thread, port = serve(engine)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpx2Client(trust_env=False))
    yield {"client": client, "port": port, "root": root, "engine": engine}
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def reference(root, adapter, prompt, max_tokens):
    model = tiny_llama()
    if adapter != "base":
        model = PeftModel.from_pretrained(model, str(root / adapter))
    ids = torch.tensor([CharTokenizer().encode(prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return CharTokenizer().decode(out[: out.index(EOS)] if EOS in out else out), ids.shape[1]


def raw(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read().decode()
    conn.close()
    return out


def test_models_list_and_retrieve(served):
    client = served["client"]
    assert [m.id for m in client.models.list()] == ["base", "alpha"]
    card = client.models.retrieve("alpha")
    assert card.id == "alpha" and card.object == "model" and card.owned_by == "peftkit"
    assert client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("missing")
    assert "does not exist" in err.value.message and err.value.body["type"] == "not_found_error"


def test_completions_plain_and_streamed_with_usage(served):
    client, want = served["client"], reference(served["root"], "alpha", "Hello", 10)
    out = client.completions.create(model="alpha", prompt="Hello", max_tokens=10, temperature=0)
    assert out.choices[0].text == want[0] and out.object == "text_completion" and out.model == "alpha"
    assert out.usage.prompt_tokens == want[1] and out.usage.completion_tokens >= len(want[0])
    chunks = list(client.completions.create(model="alpha", prompt="Hello", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == out.usage.model_dump()
    plain = list(client.completions.create(model="alpha", prompt="Hello", max_tokens=10, temperature=0, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_chat_completions_plain_and_streamed_with_usage(served):
    client = served["client"]
    messages = [{"role": "user", "content": "Hi there"}]
    want = reference(served["root"], "base", "user: Hi there\nassistant:", 8)
    out = client.chat.completions.create(model="base", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == want[0] and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.usage.prompt_tokens == want[1]
    stream = client.chat.completions.create(model="base", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want[0]
    assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(model="base", messages=messages, stream_options={"include_usage": True})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=messages)


def test_unknown_routes_and_methods_get_openai_error_bodies(served):
    with pytest.raises(openai.NotFoundError) as err:
        served["client"].embeddings.create(model="base", input="x")
    assert "Unknown route POST /v1/embeddings" in err.value.message
    for method, path, status in (("GET", "/nowhere", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/completions", 405)):
        got, _, text = raw(served["port"], method, path)
        assert got == status
        body = json.loads(text)["error"]
        assert set(body) == {"message", "type", "param", "code"} and path in body["message"]


def test_full_queue_is_503_with_retry_after():
    engine = Engine(tiny_llama(), CharTokenizer(), max_batch=2, max_queue=1)
    server, thread, port = serve(engine)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpx2Client(trust_env=False))
    try:
        with engine.lock:  # the worker holds one job and waits; one more fills the queue
            for i in range(2):
                engine.submit(Job(prompt_ids=[5, 6], adapter="base", max_tokens=2, emit=lambda k, v: None))
                deadline = time.monotonic() + 30
                while i == 0 and engine.queued() and time.monotonic() < deadline:
                    time.sleep(0.01)  # the first is taken by the worker, which then waits for the lock
            with pytest.raises(openai.InternalServerError) as err:
                client.completions.create(model="base", prompt="x", max_tokens=2)
            assert err.value.status_code == 503 and int(err.value.response.headers["retry-after"]) >= 1
            assert err.value.body["type"] == "server_overloaded"
        deadline = time.monotonic() + 30
        while engine.queued() and time.monotonic() < deadline:  # the held requests drain
            time.sleep(0.02)
        out = client.completions.create(model="base", prompt="x", max_tokens=2)
        assert out.choices[0].finish_reason in ("length", "stop")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
