"""Load tests of ``peftkit serve`` on loopback: closed-loop batching, and open-loop Poisson load
comparing the static and the continuous scheduler.

    python benchmarks/serve_load.py                       # closed loop: tiny Llama, 1/8/32 adapters
    python benchmarks/serve_load.py --model smollm2 --requests 64 --concurrency 16
    python benchmarks/serve_load.py --poisson --rates 4,8,16,32 --requests 60   # static vs continuous

Starts the server in this process (uvicorn on 127.0.0.1, a free port) and loads N LoRA r=8 q,v
adapters (distinct random weights). Nothing leaves the machine; every run is bounded in count
and time.

Closed loop (default): ``--requests`` completions from ``--concurrency`` client threads, each
for the next adapter in turn (greedy, ``--max-tokens`` tokens): requests/s, tokens/s, latency
p50/p90/p99 and the mean batch size. ``--unbatched`` repeats each run with ``max_batch=1``.

Open loop (``--poisson``): for each ``--scheduler`` and each rate in ``--rates`` (requests/s;
0 sends the same requests one at a time, each when the previous is done: the unloaded floor),
``--requests`` streamed completions arrive at Poisson times (the same seeded arrivals, prompts,
output lengths and adapters for both schedulers), whether or not earlier ones are done. Prompt
lengths are drawn from ``--prompt-lens`` and output lengths from ``--output-lens`` (uniformly),
over 8 adapters and the base. Reports generated tokens/s, time to first token (TTFT) and
per-request latency at p50/p99, and names the rate at which static batching's p99 latency has
doubled from its lowest-rate value, with continuous/static ratios there.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
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


def make_engine(args, model, tok, scheduler: str, max_batch: int):
    """An engine over ``model`` with the benchmark's queue and batching settings."""
    from peftkit.serve.engine import Engine

    return Engine(model, tok, max_batch=max_batch, batch_wait_s=args.wait_ms / 1000, max_queue=4 * args.requests,
                  scheduler=scheduler)


def stop(server, thread, engine):
    """Shut the server and engine down; returns the bare base model for the next run."""
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    return engine.model.unload() if hasattr(engine.model, "unload") else engine.model


def load_run(args, model, tok, folders, n_adapters: int, max_batch: int, scheduler: str) -> dict:
    engine = make_engine(args, model, tok, scheduler, max_batch)
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
        model = stop(server, thread, engine)
    lat = sorted(r[0] for r in results)
    q = statistics.quantiles(lat, n=100)
    sizes = list(engine.batch_sizes)[-(engine.batches - first):] if engine.batches > first else [0]
    return dict(rps=len(lat) / wall, tps=sum(r[1] for r in results) / wall, p50=q[49], p90=q[89], p99=q[98],
                batch=sum(sizes) / max(1, len(sizes)), model=model)


# ----- open loop: Poisson arrivals ---------------------------------------------------------------
WORDS = ("the river north data model light stone query table report green quiet small answer train "
         "music paper window city number garden system letter winter market").split()


def workload(args, rate: float, n_adapters: int, tok) -> list[dict]:
    """The seeded open-loop workload for ``rate``: arrival time, body and prompt length per request."""
    rng = random.Random(args.seed)
    plens = [int(x) for x in args.prompt_lens.split(",")]
    olens = [int(x) for x in args.output_lens.split(",")]
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        want = rng.choice(plens)
        words = []
        while len(tok.encode(" ".join(words), add_special_tokens=False)) < want:
            words.append(rng.choice(WORDS))
        model = rng.choice([f"a{i}" for i in range(n_adapters)] + ["base"])
        out.append({"at": t, "body": {"model": model, "prompt": " ".join(words), "max_tokens": rng.choice(olens),
                                      "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}})
    return out


def streamed(port: int, body: dict, timeout: float, t0: float) -> dict:
    """Send one streamed completion; time to first text and to the end, and completion tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens = None, 0
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        if first is None and any(c.get("text") for c in event["choices"]):
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens, "end": end}


def poisson_run(args, model, tok, folders, scheduler: str, rate: float) -> dict:
    """One open-loop run: the rate's workload against a fresh engine with ``scheduler``."""
    n = len(folders)
    engine = make_engine(args, model, tok, scheduler, args.max_batch)
    for i in range(n):
        engine.load_adapter(f"a{i}", folders[i])
    server, thread, port = start(engine)
    load = workload(args, rate, n, tok)
    results, errors = [None] * len(load), []
    try:
        streamed(port, {**load[0]["body"], "max_tokens": 2}, args.timeout, time.perf_counter())  # warm-up
        steps0, t0 = engine.batches, time.perf_counter()

        def client(i):
            at = t0 + load[i]["at"]
            time.sleep(max(0.0, at - time.perf_counter()))
            try:
                results[i] = streamed(port, load[i]["body"], args.timeout, max(at, time.perf_counter()))
            except Exception as e:  # recorded, not fatal: the run reports how many failed
                errors.append(f"{type(e).__name__}: {e}")

        def one_by_one():  # rate 0: each request alone, the next when it is done (the unloaded floor)
            for i in range(len(load)):
                if time.perf_counter() < t0 + args.max_seconds:
                    client(i)

        if rate > 0:
            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(load))]
        else:
            threads = [threading.Thread(target=one_by_one, daemon=True)]
        for th in threads:
            th.start()
        deadline = t0 + args.max_seconds
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.perf_counter()))
        timed_out = sum(th.is_alive() for th in threads)
        steps = engine.batches - steps0
        rows = list(engine.batch_sizes)[-steps:] if steps else [0]
    finally:
        model = stop(server, thread, engine)
    done = [r for r in results if r is not None]
    if len(done) < 2:
        raise RuntimeError(f"{scheduler} at {rate}/s: only {len(done)} requests finished; errors: {errors[:3]}")
    ttft = sorted(r["ttft"] for r in done)
    lat = sorted(r["latency"] for r in done)
    span = max(r["end"] for r in done) - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1]  # noqa: E731
    return dict(done=len(done), failed=len(errors) + timed_out, tps=sum(r["tokens"] for r in done) / span,
                ttft50=q(ttft, 50), ttft99=q(ttft, 99), lat50=q(lat, 50), lat99=q(lat, 99),
                rows=sum(rows) / len(rows), model=model)


def verdict(rows: dict) -> str:
    """Where static's p99 latency has doubled from its lowest-rate value (rate 0: requests one at
    a time), continuous vs static."""
    rates = sorted(r for (s, r) in rows if s == "static")
    if not rates or not any(("continuous", r) in rows for r in rates):
        return "(run both schedulers to compare them)"
    floor = rows[("static", rates[0])]["lat99"]
    hit = next((r for r in rates if rows[("static", r)]["lat99"] >= 2 * floor and ("continuous", r) in rows), None)
    if hit is None:
        return (f"static p99 latency never doubled (from {floor:.2f} s at {rates[0]:g}/s); "
                "add higher --rates to reach that point")
    st, co = rows[("static", hit)], rows[("continuous", hit)]
    return (f"static p99 latency doubles by {hit:g} req/s ({floor:.2f} s at {rates[0]:g}/s -> {st['lat99']:.2f} s). "
            f"There, continuous / static: p99 TTFT {co['ttft99']:.2f} / {st['ttft99']:.2f} s = "
            f"{co['ttft99'] / st['ttft99']:.2f}x (target < 0.5x), throughput {co['tps']:.1f} / {st['tps']:.1f} "
            f"tokens/s = {co['tps'] / st['tps']:.2f}x (target >= 1x), p99 latency "
            f"{co['lat99'] / st['lat99']:.2f}x.")


def adapters_for(model, n: int, tmp: str):
    """Save ``n`` random LoRA r=8 q,v adapters of ``model`` under ``tmp``; (bare model, folders)."""
    from peftkit import LoraConfig, get_peft_model

    folders = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        folders.append(os.path.join(tmp, f"a{i}"))
        pm.save_pretrained(folders[-1])
        model = pm.unload()
    return model, folders


def main_poisson(args, model, tok) -> None:
    """The open-loop comparison (see the module docstring)."""
    schedulers = args.scheduler.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, folders = adapters_for(model, 8, tmp)
        for rate in rates:
            for sch in schedulers:
                t = time.perf_counter()
                r = poisson_run(args, model, tok, folders, sch, rate)
                model = r.pop("model")
                rows[(sch, rate)] = r
                print(f"{sch} at {rate:g}/s: {r['tps']:.1f} tok/s, p99 TTFT {r['ttft99']:.2f} s, "
                      f"p99 latency {r['lat99']:.2f} s ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    print(f"## peftkit serve, {args.model}: open-loop Poisson arrivals (rate 0: one at a time), {args.requests} streamed requests per rate, "
          f"8 adapters + base, prompt lengths {{{args.prompt_lens}}}, output lengths {{{args.output_lens}}} tokens, "
          f"greedy, max_batch {args.max_batch}, loopback\n")
    print("| rate (req/s) | scheduler | done / failed | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 "
          "| mean rows per step (static: per generate) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (sch, rate), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] != "static")):
        print(f"| {rate:g}{' (one at a time)' if rate == 0 else ''} | {sch} | {r['done']} / {r['failed']} | {r['tps']:.1f} | {r['ttft50']:.3f} s | "
              f"{r['ttft99']:.3f} s | {r['lat50']:.3f} s | {r['lat99']:.3f} s | {r['rows']:.1f} |")
    print("\n" + verdict(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--scheduler", default=None,
                    help="comma list of static, continuous (default: continuous; --poisson: static,continuous)")
    ap.add_argument("--adapters", default="1,8,32", help="closed loop: comma list of adapter counts")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 96; --poisson: 60)")
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: client threads")
    ap.add_argument("--max-tokens", type=int, default=16, help="closed loop: new tokens per request")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=10.0, help="static scheduler: batch gathering time")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--unbatched", action="store_true", help="closed loop: also run with max_batch=1")
    ap.add_argument("--poisson", action="store_true", help="open-loop Poisson load, static vs continuous")
    ap.add_argument("--rates", default="0,2,8,16,32,64",
                    help="--poisson: comma list of request rates (req/s); 0: one request at a time")
    ap.add_argument("--prompt-lens", default="8,32,96", help="--poisson: prompt lengths (tokens) drawn from")
    ap.add_argument("--output-lens", default="4,16,32,64", help="--poisson: output lengths (tokens) drawn from")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="--poisson: most seconds one run may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; the clients share this process, and spinning OpenMP threads starve them")
    args = ap.parse_args()
    args.requests = args.requests or (60 if args.poisson else 96)
    args.scheduler = args.scheduler or ("static,continuous" if args.poisson else "continuous")
    bad = set(args.scheduler.split(",")) - {"static", "continuous"}
    if bad:
        ap.error(f"--scheduler takes static and/or continuous, not {sorted(bad)}")
    torch.set_num_threads(args.threads)
    model, tok = base(args.model)
    if args.poisson:
        main_poisson(args, model, tok)
        return
    counts = [int(c) for c in args.adapters.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, folders = adapters_for(model, max(counts), tmp)
        for sch in args.scheduler.split(","):
            for n in counts:
                for mb in ([args.max_batch, 1] if args.unbatched else [args.max_batch]):
                    r = load_run(args, model, tok, folders, n, mb, sch)
                    model = r.pop("model")
                    rows.append((sch, n, mb, r))
                    print(f"{sch} adapters={n} max_batch={mb}: {r['rps']:.2f} req/s", file=sys.stderr)
    print(f"## peftkit serve, {args.model}: {args.requests} requests, {args.concurrency} concurrent, "
          f"{args.max_tokens} new tokens each, greedy, loopback\n")
    print("| scheduler | adapters | max_batch | requests/s | tokens/s | p50 | p90 | p99 | mean rows per batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sch, n, mb, r in rows:
        print(f"| {sch} | {n} | {mb} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} s | {r['p90']:.2f} s | "
              f"{r['p99']:.2f} s | {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
