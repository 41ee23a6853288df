"""Trainable tokens, peftkit vs Hugging Face PEFT, side by side in one process.

    python benchmarks/trainable_tokens_vs_peft.py --model smollm2 --rounds 5 --batch 1 --seq 128
    python benchmarks/trainable_tokens_vs_peft.py --model tiny --rounds 9

SmolLM2-135M has a tied 49152 x 576 embedding. Both libraries train the same 16 token rows
(``TrainableTokensConfig``); PEFT's forward builds the whole merged matrix (``index_copy`` of
V x d) at the embedding and again at the tied head every step, and so the head's full V x d
weight gradient; peftkit replaces only the looked-up rows and the head's k logits. Timed per
round, rotating order: one training step (forward, backward, AdamW on the rows) of the whole
model, over the frozen model's step (same batch, gradients through activations only); then the
part that differs alone (embedding, tied head and loss; best of --repeat per round). Ratios are
medians (min-max) of per-round ratios. Nothing here is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IDS = list(range(1000, 1016))


def step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def ends_fn(model, ids):
    """What differs between the libraries: the input embedding and the tied output head, with the
    loss's log-softmax between them, forward + backward + the rows' AdamW step."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = head(emb(ids))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per variant and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft

    import peftkit

    base = common.load_base(args.model)
    batch = common.batch_for(base, args.batch, args.seq)
    cols = batch["input_ids"][:, ::8].shape[1]
    batch["input_ids"][:, ::8] = torch.tensor(IDS)[torch.arange(cols) % len(IDS)]  # one token in 8 is trained
    lower = common.load_base(args.model)
    lower.requires_grad_(False)
    lower.enable_input_require_grads()
    lower.train()
    ours = peftkit.get_peft_model(common.load_base(args.model), peftkit.TrainableTokensConfig(token_indices=IDS)).train()
    theirs = peft.get_peft_model(common.load_base(args.model), peft.TrainableTokensConfig(token_indices=IDS)).train()
    with torch.no_grad():
        a, b = ours(**batch).logits, theirs(**batch).logits
    print(f"model {args.model}: tied={base.config.tie_word_embeddings}, vocab {base.config.vocab_size}, "
          f"batch {args.batch}x{args.seq}; logits max |peftkit - peft| = {(a - b).abs().max().item():.2e}")
    steps = {"frozen": step_fn(lower, batch), "peftkit": step_fn(ours, batch), "peft": step_fn(theirs, batch)}
    for f in steps.values():
        f()  # warm-up
    times, shares = common.interleave(steps, args.rounds, ref="frozen")
    print(f"training step over the frozen model's: peftkit {common.ratio_summary(times, 'peftkit', 'frozen')}, "
          f"peft {common.ratio_summary(times, 'peft', 'frozen')}; peft / peftkit "
          f"{common.ratio_summary(times, 'peft', 'peftkit')}")
    ids = batch["input_ids"]
    ends = {"peftkit": ends_fn(ours, ids), "peft": ends_fn(theirs, ids)}
    for f in ends.values():
        f()
    etimes, _ = common.interleave(ends, args.rounds, ref="peftkit", repeat=args.repeat)
    print(f"embedding + tied head + loss alone (forward, backward, step): peft / peftkit "
          f"{common.ratio_summary(etimes, 'peft', 'peftkit')}; peftkit "
          f"{statistics.median(etimes['peftkit']) * 1e3:.0f} ms, peft {statistics.median(etimes['peft']) * 1e3:.0f} ms")

if __name__ == "__main__":
    main()
