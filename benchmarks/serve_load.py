"""Load test of ``peftkit serve`` on loopback: requests/s and latency with 1, 8 and 32 adapters.

    python benchmarks/serve_load.py                       # tiny Llama, char tokenizer
    python benchmarks/serve_load.py --model smollm2 --requests 64 --concurrency 16

Starts the server in this process (uvicorn on 127.0.0.1, a free port), loads N LoRA r=8 q,v
adapters (distinct random weights), then fires ``--requests`` completions from ``--concurrency``
client threads, each request for the next adapter in turn (greedy, ``--max-tokens`` tokens).
Reports requests/s, generated tokens/s, latency p50/p90/p99 and the mean batch size the engine
formed. ``--unbatched`` repeats each run with ``max_batch=1`` (one generate per request) to show
what batching across adapters buys. Bounded in count and time; nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CharTokenizer:
    """Printable ASCII <-> ids 2..96 (0: pad, 1: EOS) for the random tiny model."""

    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 2) % 95) for i in ids if i > 1)


def base(name: str):
    """(model, tokenizer) for ``name``: the tiny Llama of ../shared/BASELINES.md, or SmolLM2."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=4096, eos_token_id=1)
        return LlamaForCausalLM(cfg).eval(), CharTokenizer()
    from peftkit.models import load_model, load_tokenizer, resolve

    path = resolve(None if name == "smollm2" else name)
    return load_model(path).eval(), load_tokenizer(path)


def start(engine):
    """Serve ``engine`` on a free loopback port; returns (server, thread, port)."""
    import uvicorn

    from peftkit.serve.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def request(port: int, body: dict, timeout: float) -> tuple[float, int]:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {out}")
    return time.perf_counter() - t, out["usage"]["completion_tokens"]


def load_run(args, model, tok, folders, n_adapters: int, max_batch: int) -> dict:
    from peftkit.serve.engine import Engine

    engine = Engine(model, tok, max_batch=max_batch, batch_wait_s=args.wait_ms / 1000, max_queue=4 * args.requests)
    for i in range(n_adapters):
        engine.load_adapter(f"a{i}", folders[i])
    server, thread, port = start(engine)
    prompt = "Write a short note about the weather in the mountains."
    bodies = [{"model": f"a{i % n_adapters}", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
              for i in range(args.requests)]
    try:
        request(port, bodies[0], args.timeout)  # warm-up
        first = engine.batches
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda b: request(port, b, args.timeout), bodies))
        wall = time.perf_counter() - t
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
    lat = sorted(r[0] for r in results)
    q = statistics.quantiles(lat, n=100)
    sizes = engine.batch_sizes[first:]
    model = engine.model.unload() if hasattr(engine.model, "unload") else engine.model
    return dict(rps=len(lat) / wall, tps=sum(r[1] for r in results) / wall, p50=q[49], p90=q[89], p99=q[98],
                batch=sum(sizes) / max(1, len(sizes)), model=model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--adapters", default="1,8,32", help="comma list of adapter counts")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--unbatched", action="store_true", help="also run with max_batch=1")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; the clients share this process, and spinning OpenMP threads starve them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit import LoraConfig, get_peft_model

    counts = [int(c) for c in args.adapters.split(",")]
    model, tok = base(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(max(counts)):
            torch.manual_seed(100 + i)
            pm = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            folders.append(os.path.join(tmp, f"a{i}"))
            pm.save_pretrained(folders[-1])
            model = pm.unload()
        for n in counts:
            for mb in ([args.max_batch, 1] if args.unbatched else [args.max_batch]):
                r = load_run(args, model, tok, folders, n, mb)
                model = r.pop("model")
                rows.append((n, mb, r))
                print(f"adapters={n} max_batch={mb}: {r['rps']:.2f} req/s", file=sys.stderr)
    print(f"## peftkit serve, {args.model}: {args.requests} requests, {args.concurrency} concurrent, "
          f"{args.max_tokens} new tokens each, greedy, loopback\n")
    print("| adapters | max_batch | requests/s | tokens/s | p50 | p90 | p99 | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, mb, r in rows:
        print(f"| {n} | {mb} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} s | {r['p90']:.2f} s | "
              f"{r['p99']:.2f} s | {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
