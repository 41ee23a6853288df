"""Soft prompts and LLaMA-Adapter, what is their own: encoders, initialisation, checkpointing, errors.

Each prompt method over the model families (shapes and loss, disable, unload, several adapters,
the mixed-batch refusal, training, generate, save/load, PEFT parity) is a row of the table in
tests/matrix.py, run by tests/test_matrix.py."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import FAMILIES, VOCAB, inputs_for, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from matrix import ROWS_BY_NAME, TASKS, V
from peftkit import (AdaptionPromptConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                     PromptTuningConfig, get_peft_model)


def build(family, method):
    """The table's ``method`` row on ``family``: (the base factory, a fresh PeftModel)."""
    factory = FAMILIES[family][0]
    torch.manual_seed(0)
    return factory, get_peft_model(factory(), ROWS_BY_NAME[method].config(family))


def batch_for(family, model, padded=True):
    b = inputs_for(model, batch=2, seq=6)
    if padded:
        b["attention_mask"][0, :2] = 0
    task = TASKS[family]
    if task == "CAUSAL_LM":
        b["labels"] = b["input_ids"].clone()
    elif task == "SEQ_CLS":
        b["labels"] = torch.tensor([0, 1])
    else:
        b["labels"] = b.pop("decoder_input_ids")
    return b


def test_resume_training_through_the_encoder(tmp_path):
    factory, model = build("llama", "p_mlp")
    perturb(model, 0, 0.5)
    model.save_pretrained(str(tmp_path))
    resumed = PeftModel.from_pretrained(factory(), str(tmp_path), is_trainable=True)
    enc, enc2 = model.base_model.prompt_encoder["default"], resumed.base_model.prompt_encoder["default"]
    assert type(enc2).__name__ == "PromptEncoder"  # the MLP came back, not only its output
    for (n, p), (_, q) in zip(enc.state_dict().items(), enc2.state_dict().items()):
        assert torch.equal(p, q), n
    assert resumed.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    b = batch_for("llama", model)
    resumed.train()
    resumed(**b).loss.backward()
    assert enc2.mlp_head[0].weight.grad is not None


def test_multiple_prompt_adapters_switch_and_delete():
    factory, model = build("llama", "prompt")
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V))
    model.eval()
    b = batch_for("llama", model)
    first = model(**b).logits
    model.set_adapter("other")
    assert not torch.allclose(model(**b).logits, first)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["base_model.prompt_encoder.other.embedding.weight"]
    model.delete_adapter("other")
    torch.testing.assert_close(model(**b).logits, first, atol=0, rtol=0)


def test_load_adapter_beside_the_first(tmp_path):
    factory, saved = build("gpt2", "prefix")
    perturb(saved, 0, 0.5)
    saved.eval()
    b = batch_for("gpt2", saved)
    ref = saved(**b).logits
    saved.save_pretrained(str(tmp_path))
    _, model = build("gpt2", "prefix")
    model.eval()
    own = model(**b).logits
    model.load_adapter(str(tmp_path), "loaded")
    torch.testing.assert_close(model(**b).logits, own, atol=0, rtol=0)  # loading does not switch
    model.set_adapter("loaded")
    torch.testing.assert_close(model(**b).logits, ref, atol=1e-6, rtol=0)


def test_gradient_checkpointing():
    for method in ("prompt", "adaption"):
        _, model = build("llama", method)
        model.get_base_model().gradient_checkpointing_enable()
        model.train()
        perturb(model, 0, 0.5)
        model(**batch_for("llama", model)).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(base, ROWS_BY_NAME["prefix"].config("llama"))


def test_print_trainable_parameters_exact(capsys):
    _, model = build("llama", "prompt")
    model.print_trainable_parameters()
    total = sum(p.numel() for p in tiny_llama().parameters()) + V * 32
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {V * 32:,d} || all params: {total:,d} || trainable%: {100 * V * 32 / total:.4f}")


def test_prompt_init_sample_vocab_and_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "sentiment"])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path))
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach().clone()
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="classify the sentiment", tokenizer_name_or_path=str(tmp_path))
    model = get_peft_model(base, cfg)
    got = model.base_model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(got, emb[[1, 2, 3, 1, 2]])  # repeated, then cut to V
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                            prompt_tuning_init="SAMPLE_VOCAB"))
    got = model.base_model.prompt_encoder["default"].embedding.weight
    assert all(any(torch.equal(r, e) for e in emb) for r in got)


@pytest.mark.parametrize("make,match", [
    (lambda: get_peft_model(tiny_llama(), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2,
                                                               adapter_layers=5)), "only 2"),
    (lambda: get_peft_model(tiny_bert_cls(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1)), "model types"),
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "positive integer"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "tokenizer_name_or_path"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "MLP"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
    (lambda: get_peft_model(tiny_llama(), PromptTuningConfig(
        num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
        tokenizer_name_or_path="no/such/tokenizer")), "local folder"),
])
def test_bad_configs_say_what_to_do(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_uses_say_what_to_do(tmp_path):
    _, model = build("llama", "prefix")
    with pytest.raises(ValueError, match="mix"):
        model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(input_ids=torch.tensor([[5, 6]]), use_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=torch.tensor([[5, 6]]), adapter_names=["default"])
    model.save_pretrained(str(tmp_path))
    other = get_peft_model(tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V))
    with pytest.raises(ValueError, match="another base model"):
        other.load_adapter(str(tmp_path), "x")
    assert list(other.peft_config) == ["default"]  # the failed load left nothing behind


def test_warnings_only_for_ignored_ids():
    _, model = build("llama", "prompt")
    b = batch_for("llama", model)
    b["position_ids"] = torch.arange(6).expand(2, -1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model(**b)
    assert any("position_ids" in str(x.message) for x in w)


def test_labels_of_virtual_tokens_are_ignored():
    _, model = build("llama", "prompt")
    b = batch_for("llama", model, padded=False)
    out = model(**b)
    logits = out.logits[:, V - 1:-1]  # the last virtual token predicts the first real one, and so on
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_bert_prefix_reaches_every_layer_and_masks_align():
    """PEFT cannot run this pair under transformers 5, so check it from first principles:
    the same prefix with its mask columns zeroed must give the base model's logits."""
    factory, model = build("bert", "prefix")
    with torch.no_grad():
        for p in model.base_model.prompt_encoder.parameters():
            p.normal_()
    model.eval()
    b = batch_for("bert", model)
    b.pop("labels")
    base = factory().eval()(**b).logits
    host, cfg = model.base_model, model.peft_config["default"]
    cache = host.method("default").prefix_cache(host, "default", cfg, 2)
    masked = torch.cat([torch.zeros(2, V, dtype=torch.long), b["attention_mask"]], dim=1)
    positions = torch.arange(b["input_ids"].shape[1]).expand(2, -1)  # encoders keep 0..T-1
    hidden = model.get_base_model()(input_ids=b["input_ids"], attention_mask=masked, cache=cache,
                                    position_ids=positions).logits
    torch.testing.assert_close(hidden, base, atol=1e-5, rtol=0)
    assert (model(**b).logits - base).abs().max() > 100 * (hidden - base).abs().max()  # the prefix acts


@pytest.mark.parametrize("method", ["prompt", "prefix", "adaption"])
def test_beam_search_and_sampled_sequences(method):
    _, model = build("llama", method)
    perturb(model, 0, 0.5)
    model.eval()
    ids, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    beams = model.generate(input_ids=ids, attention_mask=mask, **kw)
    alone = model.generate(input_ids=ids[1:, 1:], **kw)
    assert beams[1, 3:].tolist() == alone[0, 2:].tolist()
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                             num_return_sequences=2, pad_token_id=0)
    assert sampled.shape == (4, 6)
