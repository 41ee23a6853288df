"""``LoraConfig(ensure_weight_tying=True)`` against Hugging Face PEFT: one adapter for a tied
embedding and head (LoRA targets or ``modules_to_save``), PEFT's rewritten config and files both
ways, the same outputs and summed gradients, merging once, PEFT's warnings and errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import inputs_for, output_of, peft_twins, perturb, tiny_llama
import peftkit

peft = pytest.importorskip("peft")
LIBS = (peft, peftkit)

CASES = {
    "lora_embed": dict(target_modules=["embed_tokens", "q_proj"]),
    "lora_head_named": dict(target_modules=["lm_head"]),
    "lora_regex": dict(target_modules=r".*(q_proj|embed_tokens)"),
    # a regex must match the bare name "embed_tokens" for PEFT to tie (it warns otherwise): untied here
    "lora_regex_untied": dict(target_modules=r".*\.(q_proj|embed_tokens)"),
    "copy_embed": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "copy_head_named": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def _config(lib, case):
    kw = {k: (list(v) if isinstance(v, list) else v) for k, v in CASES[case].items()}  # PEFT edits lists in place
    return lib.LoraConfig(r=2, lora_alpha=4, ensure_weight_tying=True, **kw)


def _make(lib, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(tiny_llama(tie_word_embeddings=True), _config(lib, case))


def _files(folder):
    with open(f"{folder}/adapter_config.json") as f:
        cfg = json.load(f)
    tm = cfg["target_modules"]
    return (sorted(load_file(f"{folder}/adapter_model.safetensors")), tm if isinstance(tm, str) else sorted(tm),
            sorted(cfg["modules_to_save"] or []), cfg["ensure_weight_tying"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    theirs = _make(peft, case)
    perturb(theirs, 2, scale=0.3)
    theirs.eval()
    batch = inputs_for(theirs)
    ref = output_of(theirs, batch)
    assert (ref - output_of(tiny_llama(tie_word_embeddings=True), batch)).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "theirs"))
        ours = peftkit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path / "theirs"))
        torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
        ours.save_pretrained(str(tmp_path / "ours"))
        back = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(back, batch), ref, atol=1e-5, rtol=1e-5)
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    fresh = _make(peftkit, case)
    assert _files_config(fresh) == _files_config(_make(peft, case))


def _files_config(model):
    cfg = model.peft_config["default"]
    tm = cfg.target_modules
    return tm if isinstance(tm, str) else sorted(tm), sorted(cfg.modules_to_save or [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_adapter_merges_once(case):
    if case == "lora_regex_untied":
        pytest.skip("not tied: the embedding's update reaches the tied head only once merged (PEFT warns)")
    """Merging the shared adapter changes the one weight once: merged equals unmerged (PEFT 0.21
    adds a tied LoRA update once per layer, i.e. twice, so its merged model differs)."""
    ours = _make(peftkit, case)
    perturb(ours, 2, scale=0.3)
    ours.eval()
    batch = inputs_for(ours)
    ref = output_of(ours, batch)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-4, rtol=1e-4)
    ours.unmerge_adapter()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    plain = ours.merge_and_unload()
    torch.testing.assert_close(output_of(plain, batch), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["lora_embed", "copy_embed"])
def test_gradients_are_the_sum_of_both_uses(case):
    """PEFT keeps two Parameters over the same storage (the head's is a transposed view); their
    gradients, summed, are the one gradient of peftkit's single tensor."""
    theirs, ours = peft_twins(lambda: tiny_llama(tie_word_embeddings=True), lambda L: _config(L, case),
                              seed=5, scale=0.3)
    batch = inputs_for(ours)
    for model in (theirs, ours):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    t = {n: p for n, p in theirs.named_parameters() if p.requires_grad and "q_proj" not in n}
    o = {n: p for n, p in ours.named_parameters() if p.requires_grad and "q_proj" not in n}
    if case == "lora_embed":
        emb = "base_model.model.model.embed_tokens"
        want_a = t[f"{emb}.lora_embedding_A.default"].grad + t["base_model.model.lm_head.lora_B.default.weight"].grad.T
        want_b = t[f"{emb}.lora_embedding_B.default"].grad + t["base_model.model.lm_head.lora_A.default.weight"].grad.T
        assert sorted(o) == [f"{emb}.deltas.default.lora_embedding_A", f"{emb}.deltas.default.lora_embedding_B"]
        torch.testing.assert_close(o[f"{emb}.deltas.default.lora_embedding_A"].grad, want_a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o[f"{emb}.deltas.default.lora_embedding_B"].grad, want_b, atol=1e-5, rtol=1e-4)
    else:
        (name,) = o
        (want,) = [p.grad for p in t.values()]  # PEFT ties the head's copy to the same Parameter
        torch.testing.assert_close(o[name].grad, want, atol=1e-5, rtol=1e-4)


def _warned(lib, model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lib.get_peft_model(model, lib.LoraConfig(r=2, **kw))
            err = None
        except ValueError as e:
            err = str(e)
    return sorted(str(w.message) for w in caught if "tying" in str(w.message) or "tie_word" in str(w.message)), err


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj"], ensure_weight_tying=True),
    dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
    dict(target_modules=["q_proj"], trainable_token_indices=[1, 2], ensure_weight_tying=True),
    dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]},
         ensure_weight_tying=True),
    dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]},
         ensure_weight_tying=True),
], ids=["nothing_named", "embedding", "tokens", "tokens_mismatch", "tokens_same"])
def test_warnings_and_errors_as_peft(kw, tied):
    got = {lib: _warned(lib, tiny_llama(tie_word_embeddings=tied), **kw) for lib in LIBS}
    assert got[peftkit] == got[peft]


def test_rescale_on_a_tied_adapter_as_peft():
    theirs, ours = peft_twins(lambda: tiny_llama(tie_word_embeddings=True), lambda L: _config(L, "lora_embed"),
                              seed=6, scale=0.3)
    batch = inputs_for(ours)
    with peft.helpers.rescale_adapter_scale(theirs, 0.5):
        ref = output_of(theirs, batch)
    with peftkit.helpers.rescale_adapter_scale(ours, 0.5):
        torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(target_modules=["embed_tokens", "q"]),
                                dict(target_modules=["q"], modules_to_save=["embed_tokens"])], ids=["lora", "copy"])
def test_encoder_decoder_with_tied_embeddings_is_refused_before_any_work(kw):
    """T5's encoder and decoder embed_tokens share `shared`'s weight: their adapters cannot be
    tied (PEFT 0.21 gives them LoRAs of their own that it cannot reload, or crashes for copies);
    peftkit says so and leaves the model as it was."""
    from conftest import tiny_t5

    model = tiny_t5()
    with pytest.raises(peftkit.ConfigError, match="encoder-decoder.*trainable_token_indices"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=2, ensure_weight_tying=True, **kw))
    assert not any(type(m).__name__ == "Site" for m in model.modules())


def test_gpt2_head_named_ties_to_wte_and_reloads_tied(tmp_path):
    """GPT-2's input embedding is transformer.wte: naming lm_head makes one adapter on wte for
    both (PEFT's rewrite and files); the saved config names wte by its path, and loading it ties
    again (PEFT 0.21 does not re-tie there: its check looks for embed_tokens/lm_head only)."""
    from conftest import tiny_gpt2

    theirs, ours = peft_twins(tiny_gpt2, lambda L: L.LoraConfig(r=2, target_modules=["lm_head", "c_attn"],
                                                                ensure_weight_tying=True), seed=3, scale=0.3)
    batch = inputs_for(ours)
    ref = output_of(theirs, batch)
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=1e-5)
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(str(tmp_path))
        theirs.save_pretrained(str(tmp_path / "theirs"))
        again = peftkit.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    assert _files(tmp_path) == _files(tmp_path / "theirs")
    torch.testing.assert_close(output_of(again, batch), ref, atol=1e-5, rtol=1e-5)
    again.merge_adapter()
    torch.testing.assert_close(output_of(again, batch), ref, atol=1e-4, rtol=1e-4)


def test_hotswap_a_tied_adapter(tmp_path):
    """hotswap_adapter swaps the embedding's tensors; the head's copies in the file are accepted."""
    from peftkit.methods.lora.hotswap import hotswap_adapter

    first, second = _make(peftkit, "lora_embed"), _make(peftkit, "lora_embed")
    perturb(first, 1, scale=0.3)
    perturb(second, 2, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.save_pretrained(str(tmp_path / "a"))
        second.save_pretrained(str(tmp_path / "b"))
        model = peftkit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path / "a"))
    batch = inputs_for(model)
    hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    torch.testing.assert_close(output_of(model, batch), output_of(second.eval(), batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case,key", [
    ("lora_embed", "base_model.model.lm_head.lora_A.weight"),
    ("copy_embed", "base_model.model.lm_head.weight"),
    ("tokens", "base_model.model.lm_head.trainable_tokens_delta"),
])
def test_a_tied_copy_that_differs_is_refused(case, key, tmp_path):
    """The head's copy must repeat the embedding's tensor; a file whose copy differs (saved from
    untied layers) is refused, naming both keys, instead of loading the embedding's alone."""
    from safetensors.torch import save_file

    if case == "tokens":
        model = peftkit.get_peft_model(tiny_llama(tie_word_embeddings=True), peftkit.TrainableTokensConfig(token_indices=[3, 5]))
    else:
        model = _make(peftkit, case)
    perturb(model, 1, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path))
        peftkit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path))  # as saved: fine
        tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
        assert key in tensors
        tensors[key] = tensors[key] + 1
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(peftkit.CheckpointError, match="should repeat .* values differ"):
            peftkit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path))


def test_embedding_named_by_its_own_suffix_is_not_tied_as_in_peft(tmp_path):
    """BertForMaskedLM's `word_embeddings` is not one of PEFT's embedding names: with
    ensure_weight_tying PEFT warns that nothing is tied and adapts the embedding alone; so does
    peftkit, with the same outputs (a saved config's full path, as the rewrite writes it, does tie)."""
    from test_trainable_tokens import tiny_bert_mlm

    cfg = lambda L: L.LoraConfig(r=2, target_modules=["word_embeddings"], ensure_weight_tying=True)  # noqa: E731
    got = {lib: _warned(lib, tiny_bert_mlm(), target_modules=["word_embeddings"], ensure_weight_tying=True)
           for lib in LIBS}
    assert got[peftkit] == got[peft] and got[peft][0]
    theirs, ours = peft_twins(tiny_bert_mlm, cfg, seed=2, scale=0.5)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 7, 9]])}
    torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-5, rtol=1e-5)
