"""Data formats of ``peftkit train``: detection, loss masks, errors with line numbers, the demo task.

Also home of :func:`tiny_chat_model`, the local model + tokenizer folder the CLI tests use: a tiny
Llama and a byte-level BPE tokenizer trained here, with a ChatML chat template; no downloads.
"""
from __future__ import annotations

import json
import os

import pytest

from peftkit.train import data as D
from peftkit.train import task as T

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [T.answer_text(t["target"]) + " " + t["messages"][1]["content"] for t in T.generate(60, 0, seed=3)[0]]


def build_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + ["positive negative neutral great awful"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def tiny_chat_model(folder: str) -> str:
    """Save a tiny Llama + tokenizer into ``folder`` (a local model transformers loads); return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_formats_are_detected():
    assert D.detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert D.detect_format({"messages": []}) == "chat"
    assert D.detect_format({"text": "a", "label": 1}) == "classification"
    assert D.detect_format({"text": "a"}) == "text"
    assert D.detect_format({"input": "a"}) is None
    assert D.detect_format([1]) is None


def test_completion_loss_covers_completion_and_eos_only(tok):
    e = D.encode({"prompt": "Order from Kim:", "completion": " box"}, "completion", tok, 128)
    prompt_len = len(tok("Order from Kim:")["input_ids"])
    assert e["labels"][:prompt_len] == [D.IGNORE] * prompt_len
    assert e["labels"][prompt_len:] == e["input_ids"][prompt_len:]
    assert e["input_ids"][-1] == tok.eos_token_id


def test_chat_loss_covers_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]
    e = D.encode({"messages": msgs}, "chat", tok, 256)
    learnt = tok.decode([i for i, l in zip(e["input_ids"], e["labels"]) if l != D.IGNORE])
    assert learnt == "one<|im_end|>\ntwo<|im_end|>\n"
    whole = tok.decode(e["input_ids"])
    assert whole == tok.apply_chat_template(msgs, tokenize=False)


def test_text_and_classification(tok):
    e = D.encode({"text": "great box"}, "text", tok, 64)
    assert e["labels"] == e["input_ids"]
    labels = D.label_map([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    assert labels == {"neg": 0, "pos": 1}
    assert D.encode({"text": "great", "label": "pos"}, "classification", tok, 64, labels)["labels"] == 1
    assert D.label_map([{"text": "a", "label": 2}, {"text": "b", "label": 0}]) == {"2": 2, "0": 0}
    with pytest.raises(D.DataError, match="mix"):
        D.label_map([{"text": "a", "label": 2}, {"text": "b", "label": "x"}])


def test_truncation_drops_examples_without_answer(tok):
    long_prompt = "Order from Kim " * 40
    ds, dropped = D.build_dataset([{"prompt": long_prompt, "completion": " box"},
                                   {"prompt": "a", "completion": " box"}], "completion", tok, 16)
    assert dropped == 1 and len(ds) == 1 and len(ds[0]["input_ids"]) <= 16


def test_collator_pads_right_with_ignored_labels(tok):
    batch = D.Collator(tok.pad_token_id)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                          {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, tok.pad_token_id, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": "b"', "line 2: not valid JSON"),
    ('{"input": "a"}', "line 2: expected one JSON object per line"),
    ('{"text": "a"}', "line 2: this line is in the 'text' format but the file started in the 'completion'"),
    ('{"prompt": "a", "completion": 3}', "line 2: 'completion' must be a string"),
])
def test_malformed_line_names_line_and_expectation(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(D.DataError, match=message):
        D.read_jsonl(path)


def test_chat_without_assistant_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(D.DataError, match="line 1: the conversation has no 'assistant'"):
        D.read_jsonl(path)


def test_demo_task_is_deterministic_and_held_out():
    a_train, a_eval = T.generate(200, 50, seed=0)
    b_train, b_eval = T.generate(200, 50, seed=0)
    assert a_train == b_train and a_eval == b_eval
    train_msgs = {r["messages"][1]["content"] for r in a_train}
    assert not any(r["messages"][1]["content"] in train_msgs for r in a_eval)
    assert T.generate(20, 5, seed=1)[0] != a_train[:20]


def test_demo_task_answers_and_score():
    train, _ = T.generate(100, 0, seed=0)
    replies = [r["messages"][2]["content"] for r in train]
    assert T.score(replies, [r["target"] for r in train]) == 1.0
    # spacing is forgiven, a wrong type or value is not
    assert T.parse_answer('Sure: {"a":1}  trailing') == {"a": 1}
    t = train[0]["target"]
    wrong = dict(t, quantity=str(t["quantity"]))
    assert T.score([json.dumps(t, indent=2), json.dumps(wrong), "no json"], [t, t, t]) == pytest.approx(1 / 3)
    # a quantity of one may be written "a"/"an"; plural items appear as their singular in the answer
    assert all(isinstance(r["target"]["quantity"], int) for r in train)
    assert all(r["target"]["item"] in {s for s, _ in T.ITEMS} for r in train)
