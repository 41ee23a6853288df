"""add_weighted_adapter: each combination rule against its definition, and against Hugging Face PEFT."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import inputs_for, output_of, tiny_llama

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora.combine import COMBINATION_TYPES, merge_tensors
from peftkit.core.inject import sites


# ----- the rules on small matrices, against entry-by-entry definitions ------------------------
def _top_share(t, density):
    k = int(density * t.numel())
    flat = t.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda j: -abs(float(flat[j])))[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(t.shape)


def _ties_by_entry(tensors, weights, sign_method):
    out = torch.zeros_like(tensors[0]).reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    for j in range(out.numel()):
        vals = [float(f[j]) for f in flats]
        votes = sum(vals) if sign_method == "total" else sum((v > 0) - (v < 0) for v in vals)
        elected = 1 if votes >= 0 else -1
        agree = [i for i, v in enumerate(vals) if (v > 0) - (v < 0) == elected]
        out[j] = sum(weights[i] * vals[i] for i in agree) / max(len(agree), 1)
    return out.reshape(tensors[0].shape)


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 5, generator=g) for _ in range(3)], [0.7, -0.4, 1.3]


def test_linear_and_magnitude_prune_are_weighted_sums(small):
    ts, w = small
    wt = torch.tensor(w)
    torch.testing.assert_close(merge_tensors("linear", ts, wt), sum(wi * t for wi, t in zip(w, ts)))
    want = sum(wi * _top_share(t, 0.4) for wi, t in zip(w, ts))
    torch.testing.assert_close(merge_tensors("magnitude_prune", ts, wt, density=0.4), want)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_trims_elects_and_disjoint_merges(small, sign_method):
    ts, w = small
    trimmed = [_top_share(t, 0.5) for t in ts]
    got = merge_tensors("ties", ts, torch.tensor(w), density=0.5, majority_sign_method=sign_method)
    torch.testing.assert_close(got, _ties_by_entry(trimmed, w, sign_method))


def test_dare_drops_and_rescales_with_the_given_generator(small):
    ts, w = small
    density = 0.6
    got = merge_tensors("dare_linear", ts, torch.tensor(w), density=density, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    masks = [torch.bernoulli(torch.full_like(t, density), generator=g) for t in ts]
    torch.testing.assert_close(got, sum(wi * t * m / density for wi, t, m in zip(w, ts, masks)))
    got_ties = merge_tensors("dare_ties", ts, torch.tensor(w), density=density, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got_ties, _ties_by_entry([t * m / density for t, m in zip(ts, masks)], w, "total"))


def test_rules_match_peft_merge_utils(small):
    from peft.utils import merge_utils as mu

    ts, w = small
    wt = torch.tensor(w)
    torch.testing.assert_close(merge_tensors("ties", ts, wt, density=0.5), mu.ties(ts, wt, 0.5, "total"))
    torch.testing.assert_close(merge_tensors("magnitude_prune", ts, wt, density=0.3), mu.magnitude_prune(ts, wt, 0.3))
    torch.manual_seed(9)
    ref = mu.dare_ties(ts, wt, 0.5, "frequency")
    torch.manual_seed(9)
    torch.testing.assert_close(merge_tensors("dare_ties", ts, wt, density=0.5, majority_sign_method="frequency"), ref)


# ----- whole models: same factors as Hugging Face PEFT, exactness of cat/svd ------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same three adapters in a PEFT model and (loaded from PEFT's files) in a peftkit model."""
    import peft

    folder = str(tmp_path_factory.mktemp("combine"))
    targets = ["q_proj", "v_proj"]
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights=False))
    ref.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    ref.add_adapter("c", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    ref.save_pretrained(folder)
    ours = PeftModel.from_pretrained(tiny_llama(), folder)
    for name in ("b", "c"):
        ours.load_adapter(os.path.join(folder, name), name)
    return ref, ours


def _factors(model, name, peft_side):
    out = {}
    for path, mod in model.named_modules():
        if peft_side and hasattr(mod, "lora_A") and name in mod.lora_A:
            out[path.removeprefix("base_model.model.")] = (mod.lora_A[name].weight, mod.lora_B[name].weight)
    if not peft_side:
        for path, site in sites(model.base_model.model):
            if name in site.deltas:
                d = site.deltas[name]
                out[path] = (d.lora_A, d.lora_B)
    return out


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind,adapters,weights", [
    ("linear", ["default", "b"], [0.6, -0.9]),
    ("ties", ["default", "b"], [0.6, 0.9]),
    ("dare_linear", ["default", "b"], [0.6, 0.9]),
    ("dare_ties", ["default", "b"], [1.0, 0.5]),
    ("magnitude_prune", ["default", "b"], [0.6, 0.9]),
    ("cat", ["default", "b", "c"], [0.5, 1.5, -1.0]),
    ("svd", ["default", "b", "c"], [0.5, 1.5, -1.0]),
    ("ties_svd", ["default", "c"], [0.5, 1.5]),
    ("dare_linear_svd", ["default", "b"], [0.5, 1.5]),
])
def test_combination_matches_peft(pair, kind, adapters, weights):
    ref, ours = pair
    name = f"mix_{kind}"
    # DARE's random drops consume the generator in a library-specific order (PEFT initialises the
    # new adapter first); density 1 keeps every entry, so the rest of its rule is compared here
    # and its drop-and-rescale in test_dare_drops_and_rescales_with_the_given_generator.
    kw = {} if kind in ("linear", "cat", "svd") else {"density": 1.0 if "dare" in kind else 0.5}
    ref.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
    ours.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
    theirs, mine = _factors(ref, name, True), _factors(ours, name, False)
    assert sorted(theirs) == sorted(mine)
    for path in mine:
        (ta, tb), (ma, mb) = theirs[path], mine[path]
        # singular vectors are defined up to sign, and PEFT pads cat to the summed rank of the
        # configs even where fewer adapters sit: compare the products for those
        if kind.endswith("svd") or kind == "cat":
            torch.testing.assert_close(mb @ ma, tb @ ta, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(ma, ta)
            torch.testing.assert_close(mb, tb)
    if kind != "cat":
        assert ours.peft_config[name].r == ref.peft_config[name].r


def test_cat_and_full_rank_svd_are_exact_sums():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      use_rslora=True))
    w = {"default": 0.3, "b": -1.2}
    model.add_weighted_adapter(list(w), list(w.values()), "cat", combination_type="cat")
    model.add_weighted_adapter(list(w), list(w.values()), "svd", combination_type="svd", svd_rank=32)
    for path, site in sites(model.base_model.model):
        base = site.base_layer
        want = sum(wi * site.deltas[n].delta_weight(base) for n, wi in w.items() if n in site.deltas)
        torch.testing.assert_close(site.deltas["cat"].delta_weight(base), want)
        torch.testing.assert_close(site.deltas["svd"].delta_weight(base), want, atol=1e-5, rtol=1e-4)
    assert model.peft_config["cat"].r == 6 and model.peft_config["cat"].rank_pattern  # v_proj: rank 2
    batch = inputs_for(model)
    model.set_adapter("cat")
    out_cat = output_of(model, batch)
    model.set_adapter("svd")
    torch.testing.assert_close(output_of(model, batch), out_cat, atol=1e-5, rtol=1e-4)


def test_combined_adapter_saves_and_reloads(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "both", combination_type="cat")
    assert model.peft_config["both"].rank_pattern  # q_proj rank 6, v_proj rank 2
    model.set_adapter("both")
    batch = inputs_for(model)
    want = output_of(model, batch)
    model.save_pretrained(str(tmp_path), selected_adapters=["both"])
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "both"))
    torch.testing.assert_close(output_of(again, batch), want)
    import peft  # per-layer ranks (rank_pattern on escaped paths) read the same in Hugging Face PEFT

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "both"))
    torch.testing.assert_close(output_of(theirs, batch), want, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_refused_and_leave_the_model_unchanged():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("d", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    before = set(model.peft_config)
    with pytest.raises(ValueError, match="equal ranks"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["default", "default"], [1, 1], "x", combination_type="ties")
    with pytest.raises(ValueError, match="DoRA"):
        model.add_weighted_adapter(["default", "d"], [1, 1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="Unknown adapters"):
        model.add_weighted_adapter(["nope"], [1], "x")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default"], [1], "b")
    with pytest.raises(ValueError, match="not one of"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="average")
    assert set(model.peft_config) == before
    assert set(COMBINATION_TYPES) >= {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


def test_conv_and_embedding_sites_combine_exactly():
    from conftest import VOCAB, TinyConvNet

    model = get_peft_model(TinyConvNet(), LoraConfig(r=2, target_modules=["emb", "conv1", "conv2", "head"],
                                                     init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "conv1", "conv2"], init_lora_weights=False))
    w = {"default": 0.5, "b": 2.0}
    model.add_weighted_adapter(list(w), list(w.values()), "cat", combination_type="cat")
    model.add_weighted_adapter(list(w), list(w.values()), "svd", combination_type="svd", svd_rank=64)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    for path, site in sites(model.base_model.model):
        want = sum(wi * site.deltas[n].delta_weight(site.base_layer) for n, wi in w.items() if n in site.deltas)
        torch.testing.assert_close(site.deltas["cat"].delta_weight(site.base_layer), want)
        torch.testing.assert_close(site.deltas["svd"].delta_weight(site.base_layer), want, atol=1e-4, rtol=1e-4)
    model.set_adapter("cat")
    out = model(ids)
    model.set_adapter("svd")
    torch.testing.assert_close(model(ids), out, atol=1e-4, rtol=1e-4)
