"""Trainable tokens (on their own and beside LoRA) against Hugging Face PEFT, tied heads included."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import VOCAB, inputs_for, output_of, perturb, tiny_llama
from peftkit import ConfigError, LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

peft = pytest.importorskip("peft")

IDS = [3, 17, 64, 100]


def _ids_batch(model):
    batch = inputs_for(model)
    batch["input_ids"][0, :4] = torch.tensor(IDS)  # the trained tokens do occur
    return batch


CASES = {
    "tokens_tied": (dict(tie_word_embeddings=True), lambda m: (TrainableTokensConfig(token_indices=IDS),
                                                              m.TrainableTokensConfig(token_indices=IDS))),
    "tokens_untied": (dict(tie_word_embeddings=False), lambda m: (TrainableTokensConfig(token_indices=IDS),
                                                                 m.TrainableTokensConfig(token_indices=IDS))),
    "lora_list_tied": (dict(tie_word_embeddings=True), lambda m: (
        LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS),
        m.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))),
    "lora_dict_untied": (dict(tie_word_embeddings=False), lambda m: (
        LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": IDS, "lm_head": [5, 9]}),
        m.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": IDS, "lm_head": [5, 9]}))),
    "lora_dict_tied_same": (dict(tie_word_embeddings=True), lambda m: (
        LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": IDS, "lm_head": IDS}),
        m.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": IDS, "lm_head": IDS}))),
}


def _keys(folder):
    return sorted(load_file(f"{folder}/adapter_model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_peftkit(case, tmp_path):
    kw, make = CASES[case]
    _, theirs = make(peft)
    pm = peft.get_peft_model(tiny_llama(**kw), theirs)
    perturb(pm, 3)
    pm.eval()
    batch = _ids_batch(pm)
    ref = output_of(pm, batch)
    assert (ref - output_of(tiny_llama(**kw), batch)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_llama(**kw), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_saved_loads_in_peft(case, tmp_path):
    kw, make = CASES[case]
    mine, theirs = make(peft)
    pm = get_peft_model(tiny_llama(**kw), mine)
    perturb(pm, 4)
    pm.eval()
    batch = _ids_batch(pm)
    ref = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(**kw), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(loaded, batch), ref, atol=1e-5, rtol=1e-5)
    peft.get_peft_model(tiny_llama(**kw), theirs).save_pretrained(str(tmp_path / "theirs"))
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")


def test_only_the_listed_rows_train_and_the_tied_head_follows():
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), TrainableTokensConfig(token_indices=IDS))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 1 and names[0].endswith("embed_tokens.deltas.default.rows")
    base = tiny_llama(tie_word_embeddings=True)
    batch = _ids_batch(model)
    torch.testing.assert_close(output_of(model, batch), output_of(base, batch))  # init_weights: unchanged
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    rows = model.base_model.model.model.embed_tokens.deltas["default"].rows
    emb = base.model.embed_tokens.weight
    assert (rows - emb[IDS]).abs().max() > 1e-4
    with torch.no_grad():
        h = torch.randn(1, 2, emb.shape[1])
        logits = model.base_model.model.lm_head(h)
        want = h @ emb.T
        want[..., IDS] = h @ rows.T
        torch.testing.assert_close(logits, want)
        ids = torch.arange(VOCAB)[None]
        got = model.base_model.model.model.embed_tokens(ids)[0]
        keep = [i for i in range(VOCAB) if i not in IDS]
        torch.testing.assert_close(got[keep], emb[keep])
        torch.testing.assert_close(got[IDS], rows)


def test_merge_unmerge_and_merge_and_unload():
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), TrainableTokensConfig(token_indices=IDS))
    perturb(model, 9)
    model.eval()
    batch = _ids_batch(model)
    ref = output_of(model, batch)
    before = model.base_model.model.model.embed_tokens.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, batch), ref)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.model.embed_tokens.weight, before)
    merged = model.merge_and_unload()
    torch.testing.assert_close(output_of(merged, batch), ref)


def test_bad_indices_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="more than once"):
        TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ConfigError, match="non-empty"):
        LoraConfig(trainable_token_indices=[])
    with pytest.raises(ConfigError, match="non-negative"):
        LoraConfig(trainable_token_indices={"embed_tokens": [-1]})
    with pytest.raises(ValueError, match="outside"):
        get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[VOCAB + 3]))
    with pytest.raises(ValueError, match="no such module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}))


def test_train_command_method_trainable_tokens(tmp_path):
    """``peftkit train --method trainable_tokens --set token_indices=[...]`` saves PEFT's file."""
    from peftkit.cli import main
    from test_train_data import tiny_chat_model, write_jsonl

    model_dir = tiny_chat_model(str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"order {i}: {i % 7} lamps"} for i in range(12)])
    assert main(["train", "--model", model_dir, "--data", data, "-o", str(tmp_path / "out"), "--threads", "1",
                 "--batch-size", "4", "--lr", "5e-2", "--max-steps", "2", "--save-every", "2",
                 "--method", "trainable_tokens", "--set", "token_indices=[5, 6, 7]"]) == 0
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    (key,) = [k for k in saved if k.endswith("embed_tokens.trainable_tokens_delta")]
    assert saved[key].shape[0] == 3


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_smollm2_tied_embedding_both_ways(lora, tmp_path):
    """SmolLM2-135M ties lm_head to its 49152 x 576 embedding: PEFT's file loads here and ours there."""
    from transformers import AutoModelForCausalLM

    from peftkit.models import ModelLoadError, resolve

    try:
        path = resolve(None, log=lambda *_: None)
    except ModelLoadError as e:
        pytest.skip(str(e))
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    ids = [49150, 49151, 2, 17]
    make = (lambda L: L.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=ids)) if lora else (
        lambda L: L.TrainableTokensConfig(token_indices=ids))
    batch = {"input_ids": torch.tensor([[1, 49150, 300, 49151, 17, 9, 2, 44]])}
    theirs = peft.get_peft_model(load(), make(peft))
    assert theirs.base_model.model.config.tie_word_embeddings
    perturb(theirs, 1)
    ref = output_of(theirs.eval(), batch)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(load(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-4, rtol=1e-4)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(load(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(back, batch), ref, atol=1e-4, rtol=1e-4)
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")


def test_inspect_names_the_embedding(tmp_path):
    from peftkit.train.tools import describe

    for name, cfg in {"tt": TrainableTokensConfig(token_indices=IDS),
                      "lora": LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS)}.items():
        get_peft_model(tiny_llama(tie_word_embeddings=True), cfg).save_pretrained(str(tmp_path / name))
    assert describe(str(tmp_path / "tt"))["adapted_module_names"] == ["embed_tokens", "lm_head"]
    assert describe(str(tmp_path / "lora"))["adapted_module_names"] == ["embed_tokens", "q_proj"]


@pytest.mark.parametrize("lora", [False, True])
def test_low_cpu_mem_usage_load_merges_and_unmerges(lora, tmp_path):
    cfg = LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS) if lora else TrainableTokensConfig(token_indices=IDS)
    pm = get_peft_model(tiny_llama(tie_word_embeddings=True), cfg)
    perturb(pm, 1)
    pm.eval()
    batch = _ids_batch(pm)
    ref = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path))
    m = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path), low_cpu_mem_usage=True).eval()
    assert not [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    torch.testing.assert_close(output_of(m, batch), ref)
    m.merge_adapter()
    torch.testing.assert_close(output_of(m, batch), ref, atol=1e-5, rtol=1e-5)
    m.unmerge_adapter()
    torch.testing.assert_close(m.base_model.model.model.embed_tokens.weight,
                               tiny_llama(tie_word_embeddings=True).model.embed_tokens.weight)


def test_two_adapters_in_one_mixed_batch():
    """Rows of a batch may use different token adapters (PEFT's adapter_names=...)."""
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), TrainableTokensConfig(token_indices=IDS))
    model.add_adapter("other", TrainableTokensConfig(token_indices=IDS[:2] + [7]))
    for name in ("default", "other"):
        model.set_adapter(name)
        perturb(model, 11 if name == "other" else 12)
    model.eval()
    batch = _ids_batch(model)
    batch["input_ids"][1, :3] = torch.tensor([7, 3, 17])
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = output_of(model, batch)
    with model.disable_adapter():
        plain = output_of(model, batch)
    mixed = model(**batch, adapter_names=["other", "__base__"]).logits
    torch.testing.assert_close(mixed[0], alone["other"][0])
    torch.testing.assert_close(mixed[1], plain[1])
    assert (alone["other"][0] - alone["default"][0]).abs().max() > 1e-4


@pytest.mark.parametrize("lora", [False, True])
def test_gpt2_wte_and_its_tied_head_both_ways(lora, tmp_path):
    """GPT-2's input embedding is transformer.wte, tied to lm_head."""
    from conftest import tiny_gpt2

    make = (lambda L: L.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[3, 5, 9])) if lora else (
        lambda L: L.TrainableTokensConfig(token_indices=[3, 5, 9]))
    pm = peft.get_peft_model(tiny_gpt2(), make(peft))
    perturb(pm, 1)
    pm.eval()
    batch = inputs_for(pm)
    batch["input_ids"][0, :3] = torch.tensor([3, 5, 9])
    ref = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(back, batch), ref, atol=1e-5, rtol=1e-5)
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")


# ----- T5: one weight, four modules (shared, encoder/decoder embed_tokens, lm_head) -------------------
T5_CASES = {
    "tokens": lambda L: L.TrainableTokensConfig(token_indices=IDS),
    "lora_list": lambda L: L.LoraConfig(r=2, target_modules=["q"], trainable_token_indices=IDS),
    "lora_dict_shared": lambda L: L.LoraConfig(r=2, target_modules=["q"], trainable_token_indices={"shared": IDS}),
    # a dict key names every module ending in it: both embed_tokens, each with rows of its own (no tying)
    "lora_dict_embed_tokens": lambda L: L.LoraConfig(r=2, target_modules=["q"],
                                                     trainable_token_indices={"embed_tokens": IDS}),
}


def _t5_batch(model):
    batch = _ids_batch(model)
    batch["decoder_input_ids"][1, :2] = torch.tensor(IDS[:2])  # the decoder sees trained tokens too
    return batch


@pytest.mark.parametrize("case", sorted(T5_CASES))
def test_t5_encoder_and_decoder_see_the_rows_as_in_peft(case, tmp_path):
    """T5's encoder and decoder call their own embed_tokens (same weight as ``shared``): the rows
    reach both, unmerged equals merged, and files and outputs equal PEFT's both ways."""
    from conftest import tiny_t5

    pm = peft.get_peft_model(tiny_t5(), T5_CASES[case](peft))
    perturb(pm, 5, scale=0.5)
    pm.eval()
    batch = _t5_batch(pm)
    ref = output_of(pm, batch)
    assert (ref - output_of(tiny_t5(), batch)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(tiny_t5(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(str(tmp_path / "ours"))
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(tiny_t5(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(back, batch), ref, atol=1e-5, rtol=1e-5)
    if case != "lora_dict_embed_tokens":  # untied rows of their own cannot merge into one weight consistently
        fresh = get_peft_model(tiny_t5(), T5_CASES[case](__import__("peftkit")))
        fresh.load_adapter(str(tmp_path / "theirs"), "default", is_trainable=True)
        fresh.eval()
        unmerged = output_of(fresh, batch)
        fresh.merge_adapter()
        torch.testing.assert_close(output_of(fresh, batch), unmerged, atol=1e-5, rtol=1e-5)
        fresh.unmerge_adapter()
        torch.testing.assert_close(output_of(fresh, batch), unmerged, atol=1e-5, rtol=1e-5)  # LoRA: float rounding


def test_t5_tied_rows_train_once(tmp_path):
    """One tensor D trains for all four modules: a gradient flows from encoder, decoder and head."""
    from conftest import tiny_t5

    model = get_peft_model(tiny_t5(), TrainableTokensConfig(token_indices=IDS))
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    assert params == ["base_model.model.shared.deltas.default.rows"]
    batch = _t5_batch(model)
    (rows,) = [p for p in model.parameters() if p.requires_grad]
    for keep in ("encoder", "decoder"):  # each input path alone gives D a gradient
        rows.grad = None
        out = model(**batch, output_hidden_states=True)
        h = out.encoder_last_hidden_state if keep == "encoder" else out.decoder_hidden_states[0]
        h.sum().backward()
        assert rows.grad is not None and rows.grad.abs().sum() > 0, keep


def test_older_t5_file_without_the_encoder_decoder_copies_loads(tmp_path):
    """Files peftkit wrote before the encoder/decoder copies (shared + lm_head only) still load:
    the copies repeat the embedding's rows, so they are accepted but not required."""
    from safetensors.torch import save_file
    from conftest import tiny_t5

    model = get_peft_model(tiny_t5(), TrainableTokensConfig(token_indices=IDS))
    perturb(model, 2, scale=0.5)
    model.eval()
    batch = _t5_batch(model)
    ref = output_of(model, batch)
    model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in tensors if "embed_tokens" in k} == {
        "base_model.model.encoder.embed_tokens.trainable_tokens_delta",
        "base_model.model.decoder.embed_tokens.trainable_tokens_delta"}
    save_file({k: v for k, v in tensors.items() if "embed_tokens" not in k}, str(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_t5(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), ref, atol=1e-6, rtol=0)
    bad = {**tensors, "base_model.model.lm_head.trainable_tokens_delta": torch.zeros(2, 32)}
    save_file(bad, str(tmp_path / "adapter_model.safetensors"))
    from peftkit import CheckpointError

    with pytest.raises(CheckpointError, match="lm_head.trainable_tokens_delta.*shape"):
        PeftModel.from_pretrained(tiny_t5(), str(tmp_path))


def test_second_adapters_rows_are_frozen_until_it_is_active():
    """add_adapter with trainable_token_indices: the new rows do not train while another adapter is active."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens.deltas.other.rows" in n)
    model.delete_adapter("other")  # its rows leave the bookkeeping with it
    model.set_adapter("default")
    assert any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens.deltas.default.rows" in n)


TIE_WARN_CASES = {
    "tt_default": lambda L: L.TrainableTokensConfig(token_indices=[1, 5]),
    "tt_embed": lambda L: L.TrainableTokensConfig(token_indices=[1, 5], target_modules=["embed_tokens"]),
    "lora_embed": lambda L: L.LoraConfig(target_modules=["embed_tokens"]),
    "lora_lm_head": lambda L: L.LoraConfig(target_modules=["lm_head", "q_proj"]),
    "lora_modules_to_save": lambda L: L.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora_tokens": lambda L: L.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5]),
    "ia3_lm_head": lambda L: L.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("case", sorted(TIE_WARN_CASES))
def test_tied_layer_warning_as_peft(case, tied):
    """PEFT warns when target_modules/modules_to_save name embed_tokens or lm_head on a tied model
    (LoRA's message names ensure_weight_tying); peftkit gives the same warnings in the same cases."""
    import warnings

    import peftkit

    got = {}
    for lib in (peft, peftkit):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.get_peft_model(tiny_llama(tie_word_embeddings=tied), TIE_WARN_CASES[case](lib))
        got[lib] = [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)]
    assert got[peftkit] == got[peft]
    assert bool(got[peft]) == (tied and case not in ("tt_default", "lora_tokens"))


def test_rows_of_a_module_trained_in_full_are_refused():
    """modules_to_save and trainable_token_indices on one embedding: PEFT's error for the dict
    form (same message); for the list form (PEFT 0.21 nests the rows over the full copy) peftkit
    refuses the pair with the same first sentence and leaves the model as it was."""
    cfg = lambda L, tti: L.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],  # noqa: E731
                                      trainable_token_indices=tti)
    errs = {}
    for lib in (peft, __import__("peftkit")):
        with pytest.raises(ValueError) as e:
            lib.get_peft_model(tiny_llama(), cfg(lib, {"embed_tokens": [1, 2]}))
        errs[lib] = str(e.value)
    assert errs[peft] in errs[__import__("peftkit")]
    model = tiny_llama()
    with pytest.raises(ConfigError, match="already marked to be trained fully.*model.embed_tokens"):
        get_peft_model(model, cfg(__import__("peftkit"), [1, 2]))
    assert not any(type(m).__name__ == "Site" for m in model.modules())


def tiny_bert_mlm():
    """BERT for masked LM: the decoder (with a bias of its own) is tied to word_embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)).eval()


@pytest.mark.parametrize("lora", [False, True])
def test_bert_mlm_tied_decoder_with_bias_as_peft(lora, tmp_path):
    make = (lambda L: L.LoraConfig(r=2, target_modules=["query"], trainable_token_indices=IDS)) if lora else (
        lambda L: L.TrainableTokensConfig(token_indices=IDS))
    pm = peft.get_peft_model(tiny_bert_mlm(), make(peft))
    perturb(pm, 1, scale=0.5)
    pm.eval()
    batch = _ids_batch(pm)
    ref = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(tiny_bert_mlm(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    ours.save_pretrained(str(tmp_path / "ours"))
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")
