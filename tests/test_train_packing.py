"""Padding-free packing and the chunked LM loss are exact: a packed batch gives the loss and the
gradients of the same examples run one by one (tiny Llama, fp32), the chunked loss those of the
plain loss, and ``peftkit train`` trains the same adapter packed or padded. Seconds, no downloads."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_llama
from peftkit import LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.train.data import IGNORE, Collator
from peftkit.train.loss import (causal_lm_loss_sum, chunk_rows, chunked_cross_entropy, frozen_linear_head,
                                head_bypassed)
from peftkit.train.packing import PackedCollator, packing_mismatch, plan_batches
from peftkit.train.varlen import restore_attention, segment_bounds, use_packed_attention

LENGTHS = (5, 17, 9, 30, 2)


def examples(lengths=LENGTHS, seed=1, vocab=128) -> list[dict]:
    """Random token ids with the first third of each example (the "prompt") out of the loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        k = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * k + ids[k:]})
    return out


def lora_model(attn="sdpa"):
    """Tiny Llama with a LoRA whose B is not zero, so every adapter tensor gets a gradient.

    ``attn="varlen"``: SDPA switched to peftkit's per-example attention (peftkit/train/varlen.py).
    """
    model = tiny_llama(attn_implementation="sdpa" if attn == "varlen" else attn)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if attn == "varlen":
        assert use_packed_attention(pm) == "sdpa"
    pm.train()
    return pm


def grads_of(pm) -> list[torch.Tensor]:
    gs = [p.grad.clone() for p in pm.parameters() if p.requires_grad]
    pm.zero_grad(set_to_none=True)
    return gs


def targets(exs) -> int:
    return sum(sum(x != IGNORE for x in e["labels"][1:]) for e in exs)


def one_by_one(pm, exs):
    """Loss (summed over examples, each divided by the batch's target count) and gradients."""
    n = targets(exs)
    total = 0.0
    for e in exs:
        out = pm(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]),
                 num_items_in_batch=n, use_cache=False)
        out.loss.backward()
        total += out.loss.item()
    return total, grads_of(pm)


def assert_close_lists(a, b, atol=1e-6):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def test_packed_collator_layout():
    batch = PackedCollator()([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                              {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # no target across the boundary
    assert batch["use_cache"] is False and "attention_mask" not in batch


def test_packed_collator_refuses_classification_examples():
    with pytest.raises(ValueError, match="per-token 'labels'"):
        PackedCollator()([{"input_ids": [1, 2], "labels": 1}])
    with pytest.raises(ValueError, match="empty batch"):
        PackedCollator()([])


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_loss_and_gradients_equal_one_by_one(attn):
    pm = lora_model(attn)
    exs = examples()
    loss_alone, g_alone = one_by_one(pm, exs)
    out = pm(**PackedCollator()(exs))  # the model's own loss: mean over the row's targets
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss_alone, abs=1e-6)
    assert_close_lists(grads_of(pm), g_alone)
    # and the padded batch agrees too (what --no-packing trains on)
    out = pm(**Collator(0)(exs), num_items_in_batch=targets(exs))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss_alone, abs=1e-6)
    assert_close_lists(grads_of(pm), g_alone)


def test_a_kv_cache_would_silently_break_packing():
    """Why the collator passes use_cache=False: with a cache transformers skips packed detection."""
    pm = lora_model()
    exs = examples()
    batch = PackedCollator()(exs)
    with torch.no_grad():
        alone = torch.cat([pm(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in exs])
        packed = pm(**batch).logits[0]
        cached = pm(**{**batch, "use_cache": True}).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (cached - alone).abs().max() > 1e-2
    assert packing_mismatch(pm, [e["input_ids"] for e in exs[:2]]) is None


@pytest.mark.parametrize("rows", [1, 7, 64, None])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_the_plain_loss(rows, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    b = torch.randn(50, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, 50, (45,), generator=g)
    plain = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    (gh_plain,) = torch.autograd.grad(plain * 0.37, h)
    chunked = chunked_cross_entropy(h, w, b, y, rows)
    (gh,) = torch.autograd.grad(chunked * 0.37, h)
    torch.testing.assert_close(chunked, plain, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gh, gh_plain, atol=1e-10, rtol=1e-8)


def test_chunked_loss_refuses_a_trained_head_and_bad_shapes():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="frozen head"):
        chunked_cross_entropy(h, w, None, y)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        chunked_cross_entropy(h[None], w.detach(), None, y)
    assert chunk_rows(49152) == 170 and chunk_rows(10**9) == 1


def test_chunked_loss_on_the_model_equals_its_loss_with_packing():
    pm = lora_model()
    exs = examples()
    loss_alone, g_alone = one_by_one(pm, exs)
    head = frozen_linear_head(pm.get_base_model())
    assert head is pm.get_base_model().lm_head
    batch = PackedCollator()(exs)
    labels = batch.pop("labels")
    with head_bypassed(pm, head):
        hidden = pm(**batch).logits
    assert pm.get_base_model().lm_head is head and hidden.shape[-1] == 32
    total, count = causal_lm_loss_sum(hidden, labels, head, rows=3)  # several chunks
    assert count.item() == targets(exs)
    (total / count).backward()
    assert (total / count).item() == pytest.approx(loss_alone, abs=1e-6)
    assert_close_lists(grads_of(pm), g_alone)


def test_frozen_linear_head_declines_a_trainable_head():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    assert frozen_linear_head(model) is None
    model.lm_head.weight.requires_grad_(False)
    assert frozen_linear_head(model) is model.lm_head


class Leaky(nn.Module):
    """A 'language model' whose every position sees the whole row so far (a running mean),
    ignoring position_ids: packing is not exact for it."""

    def __init__(self, vocab=128, dim=8):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.config = type("C", (), {"_attn_implementation": "leaky"})()

    def forward(self, input_ids, position_ids=None, use_cache=None, **_):
        x = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return type("O", (), {"logits": self.out(x)})()


def test_packing_mismatch_names_the_problem_and_the_plan_falls_back_to_length_groups():
    exs = examples()
    why = packing_mismatch(Leaky(), [e["input_ids"] for e in exs[:2]])
    assert "crosses example boundaries" in why and "'leaky'" in why
    plan = plan_batches(Leaky(), exs, pad_id=0, causal=True)
    assert not plan.packed and plan.group_by_length and isinstance(plan.collator, Collator)
    assert any("packing off" in n for n in plan.notes)


def test_plan_batches_packs_lora_and_not_prompt_methods():
    plan = plan_batches(lora_model(), examples(), pad_id=0, causal=True)
    assert plan.packed and not plan.group_by_length and plan.loss_head is not None and not plan.notes
    off = plan_batches(lora_model(), examples(), pad_id=0, causal=True, packing=False, loss_chunk=0)
    assert not off.packed and not off.group_by_length and off.loss_head is None
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    plan = plan_batches(prompt, examples(), pad_id=0, causal=True)
    assert not plan.packed and plan.group_by_length and plan.loss_head is None
    assert "prompt methods" in plan.notes[0]
    cls = plan_batches(lora_model(), examples(), pad_id=0, causal=False)
    assert not cls.packed and cls.loss_head is None


def test_segment_bounds_follow_transformers_packed_rule():
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6) == [0, 3, 5, 6]
    assert segment_bounds(torch.tensor([[0, 1, 2, 3]]), 4) is None  # one example: plain causal
    assert segment_bounds(torch.tensor([[0, 1], [0, 1]]), 2) is None  # a padded batch is not packed
    assert segment_bounds(None, 3) is None


def test_varlen_attention_leaves_padded_batches_and_generation_alone():
    pm = lora_model("varlen")
    exs = examples()
    loss_alone, g_alone = one_by_one(pm, exs)  # no packing: transformers' SDPA path underneath
    out = pm(**Collator(0)(exs), num_items_in_batch=targets(exs))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss_alone, abs=1e-6)
    assert_close_lists(grads_of(pm), g_alone)
    pm.eval()
    ids = torch.tensor([exs[3]["input_ids"][:10]])
    with torch.no_grad():
        varlen = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        restore_attention(pm, "sdpa")
        assert pm.get_base_model().config._attn_implementation == "sdpa"
        plain = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert varlen.tolist() == plain.tolist()


def test_varlen_attention_only_replaces_plain_sdpa():
    assert use_packed_attention(tiny_llama(attn_implementation="eager")) is None
    windowed = tiny_llama()
    windowed.config.sliding_window = 8
    assert use_packed_attention(windowed) is None
    assert windowed.config._attn_implementation == "sdpa"


def _trained_adapter(collator, loss_head_on: bool, tmp_path, name, attn="sdpa"):
    from transformers import TrainingArguments

    from peftkit.train.data import EncodedDataset
    from peftkit.train.loop import make_trainer
    from peftkit.train.loss import frozen_linear_head as head_of

    torch.manual_seed(0)
    pm = lora_model(attn)
    data = EncodedDataset(examples(lengths=(5, 17, 9, 30, 12, 3, 22, 8), seed=4))
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to="none",
                             use_cpu=True, save_strategy="no", seed=0, data_seed=0, remove_unused_columns=False,
                             label_names=["labels"], disable_tqdm=True, optim="adamw_torch")
    head = head_of(pm.get_base_model()) if loss_head_on else None
    trainer = make_trainer(pm, args, data, None, collator, seq_loss=True, loss_head=head, loss_rows=5)
    trainer.train()
    return {k: v.clone() for k, v in pm.get_adapter_state_dict().items()}, trainer.state.log_history


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_trainer_steps_packed_with_chunked_loss_equal_padded_steps(tmp_path, attn):
    padded, log_p = _trained_adapter(Collator(0), False, tmp_path, "padded")
    packed, log_k = _trained_adapter(PackedCollator(), True, tmp_path, "packed", attn)
    assert padded.keys() == packed.keys()
    for k in padded:
        torch.testing.assert_close(packed[k], padded[k], atol=1e-6, rtol=1e-5)
    loss = lambda log: [h["loss"] for h in log if "loss" in h]  # noqa: E731
    assert loss(log_k) == pytest.approx(loss(log_p), abs=1e-5)


def test_peftkit_train_packs_by_default_and_not_with_no_packing(tmp_path):
    from peftkit.cli import main
    from test_train_data import tiny_chat_model, write_jsonl

    model = tiny_chat_model(str(tmp_path / "model"))
    rows = [{"prompt": f"Say {w} twice:", "completion": f" {w} {w}" * (1 + i % 3)}
            for i, w in enumerate(["lamp", "chair", "box", "kettle", "watch", "bench", "knife", "mirror"])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["train", "--model", model, "--data", data, "--threads", "1", "--batch-size", "4", "--lr", "5e-3",
              "--log-every", "1"]
    results = {}
    for name, extra in (("packed", []), ("padded", ["--no-packing", "--loss-chunk", "0"])):
        assert main([*common, "-o", str(tmp_path / name), *extra]) == 0
        with open(tmp_path / name / "metrics.json") as fh:
            results[name] = json.load(fh)
        assert os.path.isfile(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert results["packed"]["batches"]["packed"] and results["packed"]["batches"]["loss_chunk_rows"]
    assert results["packed"]["batches"]["packed_attention"]
    assert results["padded"]["batches"] == {"packed": False, "group_by_length": False, "loss_chunk_rows": None,
                                            "packed_attention": False}
    assert results["packed"]["train_loss"] == pytest.approx(results["padded"]["train_loss"], abs=1e-5)


def test_packed_collator_with_hugging_face_peft_and_a_plain_trainer(tmp_path):
    """The documented use: real peft's get_peft_model + transformers.Trainer, packed == padded."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    from peftkit.train.data import EncodedDataset

    data = EncodedDataset(examples(lengths=(5, 17, 9, 30, 12, 3, 22, 8), seed=4))
    out = {}
    for name, collator in (("padded", Collator(0)), ("packed", PackedCollator())):
        torch.manual_seed(0)
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear",
                                                               init_lora_weights=False))
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                                 data_seed=0, remove_unused_columns=False, disable_tqdm=True, optim="adamw_torch")
        Trainer(model=pm, args=args, train_dataset=data, data_collator=collator).train()
        out[name] = {k: v.detach().clone() for k, v in pm.named_parameters() if v.requires_grad}
    for k in out["padded"]:
        torch.testing.assert_close(out["packed"][k], out["padded"][k], atol=1e-6, rtol=1e-5)
