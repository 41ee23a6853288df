"""Scaled word embeddings (Gemma 3's and BART's ``...ScaledWordEmbedding``: ``y = c * E[x]``) and
tied embeddings under adapters: the adapter's rows carry the same factor ``c``, so the unmerged
model equals the merged one and PEFT's on the same weights; a ``modules_to_save`` copy of a tied
embedding merges without changing the tied head."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import peft_twins, perturb
import peftkit

peft = pytest.importorskip("peft")


def tiny_gemma3(tie: bool = False):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=tie)
    return Gemma3ForCausalLM(cfg).eval()


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     scale_embedding=True)
    return BartForConditionalGeneration(cfg).eval()


def _batch(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 128, (2, 8), generator=g)
    ids[0, :3] = torch.tensor([5, 9, 17])
    out = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = torch.randint(4, 128, (2, 5), generator=g)
        out["decoder_input_ids"][1, :2] = torch.tensor([9, 17])
    return out


CASES = {
    "lora_gemma": (tiny_gemma3, lambda L: L.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])),
    "dora_gemma": (tiny_gemma3, lambda L: L.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True)),
    "tokens_gemma_tied": (lambda: tiny_gemma3(tie=True), lambda L: L.TrainableTokensConfig(token_indices=[5, 9, 17])),
    "lora_tokens_gemma_tied": (lambda: tiny_gemma3(tie=True), lambda L: L.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices=[5, 9, 17])),
    "lora_bart": (tiny_bart, lambda L: L.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])),
    "tokens_bart": (tiny_bart, lambda L: L.TrainableTokensConfig(token_indices=[5, 9, 17])),
}


#: LoRA on BART's encoder and decoder embed_tokens, which share one weight with ``shared`` and the
#: head: merging adds both updates into that weight (PEFT's tied-layer warning), in both libraries
SHARED_WEIGHT_LORA = {"lora_bart"}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_scaled_embedding_adapters_equal_peft_and_merge_exactly(case, tmp_path):
    make, config = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), config(peft))
    assert hasattr(make().get_input_embeddings(), "embed_scale")
    perturb(theirs, 1, scale=0.5)
    theirs.eval()
    batch = _batch(theirs)
    ref = _logits(theirs, batch)
    assert (ref - _logits(make(), batch)).abs().max() > 1e-3  # the adapter changes the output
    theirs.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peftkit.PeftModel.from_pretrained(make(), str(tmp_path), is_trainable=True).eval()
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), atol=1e-4, rtol=1e-5)
    if case not in SHARED_WEIGHT_LORA:
        torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)


def test_mixed_batch_on_a_scaled_embedding():
    """Two LoRA adapters on Gemma 3's scaled embed_tokens, one per row, equal each run alone."""
    model = peftkit.get_peft_model(tiny_gemma3(), peftkit.LoraConfig(r=2, target_modules=["embed_tokens"]))
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["embed_tokens"]))
    for name in ("default", "other"):
        model.set_adapter(name)
        perturb(model, 2 if name == "other" else 1, scale=0.5)
    model.eval()
    batch = _batch(model)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = _logits(model, batch)
    mixed = model(**batch, adapter_names=["default", "other"]).logits.detach()
    torch.testing.assert_close(mixed[0], alone["default"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone["other"][1], atol=1e-5, rtol=1e-5)


def test_modules_to_save_copy_of_a_tied_embedding_merges_without_touching_the_head():
    """A trained copy of embed_tokens on a tied model: merging must not write the copy into the
    weight the output head shares (the unmerged model's head keeps the base rows); merge_and_unload
    gives PEFT's model (the copy in place of embed_tokens, the head as it was)."""
    theirs, ours = peft_twins(lambda: tiny_gemma3(tie=True), lambda L: L.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), seed=4, scale=0.5)
    batch = _batch(ours)
    ref = _logits(theirs, batch)
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)
    head = ours.get_output_embeddings().weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.get_output_embeddings().weight, head)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-5, rtol=1e-5)
    plain_ours, plain_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(_logits(plain_ours, batch), _logits(plain_theirs, batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(plain_ours, batch), ref, atol=1e-5, rtol=1e-5)


def test_non_scalar_embed_scale_is_not_applied_with_peft_warning():
    """PEFT applies only a scalar embed_scale and warns otherwise; so does peftkit."""
    got = {}
    for lib in (peft, peftkit):
        model = tiny_gemma3()
        model.model.embed_tokens.embed_scale = torch.full((32,), 2.0)  # broadcasts over d in the base layer
        pm = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pm(input_ids=torch.tensor([[5, 6]])).logits
        got[lib] = ([str(w.message) for w in caught if "embed_scale" in str(w.message)], out)
    assert got[peftkit][0] == got[peft][0] and got[peft][0]
    torch.testing.assert_close(got[peftkit][1], got[peft][1], atol=1e-5, rtol=1e-5)
