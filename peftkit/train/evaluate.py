"""Evaluation: greedy generation in batches, exact match, loss/perplexity, classification accuracy."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .data import Collator


def prompt_of(record: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """(prompt text the model continues, reference answer) of a completion or chat record.

    For a conversation the prompt is everything before the last assistant turn, rendered with
    the generation prompt, exactly as in training.
    """
    if fmt == "completion":
        return record["prompt"], record["completion"]
    if fmt != "chat":
        raise ValueError(f"Generation needs prompt/completion or chat data, not the {fmt!r} format.")
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
    return prompt, msgs[last]["content"]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   chat_rendered: bool = True, progress: Optional[str] = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pads go left
    replies: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for s in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not chat_rendered)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def exact_match(replies: list[str], references: list[str]) -> float:
    """Share of replies equal to their reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(r.strip() == t.strip() for r, t in zip(replies, references)) / len(references)


@torch.no_grad()
def loss_and_accuracy(model, dataset, pad_id: int, batch_size: int = 8) -> dict:
    """Mean loss over ``dataset`` (token-weighted for LM data) and accuracy for classification."""
    was_training = model.training
    model.eval()
    collate = Collator(pad_id)
    total, count, correct = 0.0, 0, 0
    try:
        for s in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            out = model(**batch)
            labels = batch["labels"]
            if labels.dim() == 1:  # classification: one label per row
                total += out.loss.item() * len(labels)
                count += len(labels)
                correct += (out.logits.argmax(-1) == labels).sum().item()
            else:
                n = (labels[:, 1:] != -100).sum().item()  # the first token is never predicted
                total += out.loss.item() * n
                count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    result = {"loss": loss}
    if dataset and not isinstance(dataset[0]["labels"], list):
        result["accuracy"] = correct / max(count, 1)
    else:
        result["perplexity"] = math.exp(min(loss, 50.0))
    return result


def answer_tokens(tokenizer, references: list[str]) -> int:
    """A max_new_tokens that fits the longest reference answer with room for the end token."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=16)
    return longest + 8

