"""Training data: JSON Lines files in four formats, tokenised with loss masks, and batching.

Formats (one JSON object per line; every line of a file uses the same one):

- ``{"prompt": ..., "completion": ...}``: the loss covers the completion (and EOS) only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; the loss covers the assistant turns only.
- ``{"text": ...}``: plain language modelling; the loss covers every token.
- ``{"text": ..., "label": ...}``: sequence classification; labels may be strings or integers.

Labels of tokens outside the loss are -100, the value PyTorch's cross-entropy ignores. Long
examples are cut to ``max_length`` tokens from the right; an example left with no token in the
loss is dropped and counted, since it would only add a 0/0 to the loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

IGNORE = -100
FORMATS = {
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "text": ("text",),
}
EXPECTED = ('one JSON object per line, with keys {"prompt","completion"}, {"messages": [...]}, '
            '{"text"} or {"text","label"}')


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and what was expected."""


def detect_format(record: Any) -> Optional[str]:
    """The format of one record, or None when it matches none."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "messages" in keys:
        return "chat"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _check(record: dict, fmt: str, where: str) -> None:
    if fmt == "chat":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            '{"role": ..., "content": ...} objects.')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {m!r}.")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: the conversation has no 'assistant' message, so nothing to learn from.")
        return
    for key in FORMATS[fmt]:
        value = record[key]
        if key == "label":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{where}: 'label' must be a string or an integer, got {value!r}.")
        elif not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}.")


def read_jsonl(path: str) -> tuple[list[dict], str]:
    """Read and validate a JSON Lines file; returns (records, format). Blank lines are skipped."""
    records, fmt = [], None
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"Cannot read data file {path!r}: {e.strerror}.") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected {EXPECTED}.") from None
            this = detect_format(record)
            if this is None:
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: expected {EXPECTED}; got {got}.")
            if fmt is None:
                fmt = this
            elif this != fmt:
                raise DataError(f"{where}: this line is in the {this!r} format but the file started "
                                f"in the {fmt!r} format (keys {list(FORMATS[fmt])}); use one format per file.")
            _check(record, fmt, where)
            records.append(record)
    if not records:
        raise DataError(f"{path}: no examples found; expected {EXPECTED}.")
    return records, fmt


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, in_loss) pieces: assistant turns are in the loss.

    Each assistant turn is the text the template adds between the conversation up to it (with
    the generation prompt) and the conversation including it, so whatever the template writes
    around a reply (end-of-turn tokens) is learnt with it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("The chat format needs a tokenizer with a chat template; this tokenizer has "
                        "none. Use the {\"prompt\",\"completion\"} format instead, or a chat model.")

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], gen=True), render(messages[: i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise DataError("This tokenizer's chat template does not render conversations "
                            "incrementally, so assistant turns cannot be located; use the "
                            "{\"prompt\",\"completion\"} format instead.")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    rest = render(messages)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces


def encode(record: dict, fmt: str, tokenizer, max_length: int, label_ids: Optional[dict] = None) -> Optional[dict]:
    """Token ids, attention mask and labels for one record (None when nothing is left in the loss)."""
    if fmt == "classification":
        ids = tokenizer(record["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": label_ids[str(record["label"])]}
    if fmt == "text":
        ids = tokenizer(record["text"])["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)} if len(ids) > 1 else None
    if fmt == "completion":
        prompt = tokenizer(record["prompt"])["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
        pieces = [(prompt, False), (answer, True)]
    else:
        pieces = [(tokenizer(t, add_special_tokens=False)["input_ids"], loss)
                  for t, loss in chat_segments(tokenizer, record["messages"])]
    ids, labels = [], []
    for piece, loss in pieces:
        ids += piece
        labels += piece if loss else [IGNORE] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):  # the first label is never predicted
        return None
    return {"input_ids": ids, "labels": labels}


class EncodedDataset(torch.utils.data.Dataset):
    """A list of encoded examples (small enough to keep in memory: JSON Lines fine-tuning sets)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def build_dataset(records: list[dict], fmt: str, tokenizer, max_length: int,
                  label_ids: Optional[dict] = None) -> tuple[EncodedDataset, int]:
    """Encode ``records``; returns the dataset and how many examples were dropped as too long."""
    out = [encode(r, fmt, tokenizer, max_length, label_ids) for r in records]
    kept = [e for e in out if e is not None]
    return EncodedDataset(kept), len(out) - len(kept)


def label_map(records: list[dict]) -> dict[str, int]:
    """Classification labels (as strings) -> class ids: integers are kept, strings numbered in sorted order."""
    labels = {r["label"] for r in records}
    if all(isinstance(x, int) for x in labels):
        if min(labels) < 0:
            raise DataError(f"Integer labels must be >= 0 (class ids); got {min(labels)}.")
        return {str(x): x for x in labels}
    if any(isinstance(x, int) for x in labels):
        raise DataError("Labels mix strings and integers; use one kind in a file.")
    return {x: i for i, x in enumerate(sorted(labels))}


@dataclass
class Collator:
    """Right-pads a list of encoded examples into a batch (labels padded with -100)."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """Stack ``batch`` into tensors padded to its longest example."""
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], list)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long) if seq_labels else None
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
            if seq_labels:
                labels[i, :n] = torch.tensor(b["labels"])
        if not seq_labels:
            labels = torch.tensor([b["labels"] for b in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
