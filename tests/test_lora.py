"""LoRA's own behaviours: parameter counts, targeting, PiSSA/OLoRA, the in-place path, hooks.

LoRA, rsLoRA and DoRA over the model families (identity, merging, several adapters, mixed
batches, training, save/load, PEFT parity) are rows of the table in tests/matrix.py, run by
tests/test_matrix.py."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import FAMILIES, TinyConvNet, inputs_for, output_of, perturb, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.site import Site

def build(family, init=True, **kw):
    factory, targets = FAMILIES[family]
    base = factory()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)
    return base, cfg


def test_trainable_count_matches_formula():
    base, _ = build("llama")
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, cfg)
    h, kv, inter, layers = 32, 16, 64, 2  # q: 32->32, v: 32->16 (GQA), down: 64->32
    expected = layers * 4 * ((h + h) + (h + kv) + (inter + h))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in base.parameters())  # base + adapter, each once
    dora = get_peft_model(build("llama")[0], LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert dora.get_nb_trainable_parameters()[0] == 2 * (4 * (h + h) + h)


def test_plain_module_sites_conv_embedding():
    base = TinyConvNet().eval()
    ids = torch.randint(0, 128, (3, 10))
    ref = base(ids)
    for dora in (False, True):
        m = copy.deepcopy(base)
        model = get_peft_model(m, LoraConfig(r=2, target_modules=["emb", "conv1", "conv2", "head"],
                                             use_dora=dora, init_lora_weights=False)).eval()
        out = model(ids)
        assert not torch.allclose(out, ref)
        model.merge_adapter()
        torch.testing.assert_close(model(ids), out, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(ids), ref)
        model.unload()
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)


def test_seed_example_runs_as_written():
    from conftest import tiny_neox

    model = get_peft_model(tiny_neox(), LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"],
                                                   lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    out = model(**inputs_for(model.get_base_model()), labels=inputs_for(model.get_base_model())["input_ids"])
    out.loss.backward()
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_default_targets_and_all_linear_and_patterns():
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2))  # llama default: q_proj, v_proj
    paths = sorted(p for p, m in model.named_modules() if isinstance(m, Site))
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["q_proj", "v_proj"] * 2
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    names = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, Site)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                                    rank_pattern={"layers.1.self_attn.q_proj": 3},
                                                    alpha_pattern={"q_proj": 6}))
    sites = [(p, m) for p, m in model.named_modules() if isinstance(m, Site)]
    assert [p for p, _ in sites] == ["base_model.model.model.layers.1.self_attn.q_proj"]
    d = sites[0][1].deltas["default"]
    assert d.r == 3 and d.scaling == 2.0
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=r".*layers\.0\.mlp\.(up|down)_proj",
                                                    exclude_modules=["down_proj"]))
    assert [p.rsplit(".", 3)[-3:] for p, m in model.named_modules() if isinstance(m, Site)] == [["0", "mlp", "up_proj"]]


def test_multiple_adapters_set_delete_and_mixed_rows():
    from conftest import tiny_llama

    base = tiny_llama()
    batch = inputs_for(base, batch=4)
    ref = output_of(base, batch)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True, init_lora_weights=False))
    assert model.active_adapter == "default"
    outs = {}
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        outs[name] = output_of(model, batch)
        trainable = {n.split(".deltas.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {name}
    outs["__base__"] = ref
    rows = ["b", "__base__", "default", "c"]
    mixed = output_of(model, {**batch, "adapter_names": rows})
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**batch, adapter_names=["nope"] * 4)
    model.delete_adapter("b")
    assert "b" not in model.peft_config
    assert not any(".deltas.b." in n for n, _ in model.named_parameters())
    model.set_adapter("default")
    torch.testing.assert_close(output_of(model, batch), outs["default"])


def test_pissa_and_olora_start_at_base_and_convert_to_plain_lora():
    from conftest import tiny_llama
    from peftkit.methods.lora.init import to_plain_lora

    for init in ("pissa", "pissa_niter_4", "olora"):
        base = tiny_llama()
        batch = inputs_for(base)
        ref = output_of(base, batch)
        orig_w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)).eval()
        torch.testing.assert_close(output_of(model, batch), ref, atol=1e-4, rtol=1e-4)
        site = model.base_model.model.model.layers[0].self_attn.q_proj
        d = site.deltas["default"]
        a0, b0 = d.lora_A.detach().clone(), d.lora_B.detach().clone()
        with torch.no_grad():
            d.lora_A.add_(0.05)
        a, b = to_plain_lora(d.lora_A, d.lora_B, a0, b0)
        # plain LoRA of rank 2r over the ORIGINAL weight reproduces the trained PiSSA layer
        trained = site.base_layer.weight + d.scaling * d.lora_B @ d.lora_A
        torch.testing.assert_close(orig_w + d.scaling * b @ a, trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_saved_as_plain_lora_for_the_original_base(init, tmp_path):
    from conftest import tiny_llama

    batch = inputs_for(tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=init))
    model.save_pretrained(str(tmp_path / "init"))
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    trained = output_of(model.eval(), batch)
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain"))  # the ORIGINAL base
    assert plain.peft_config["default"].r == 8
    torch.testing.assert_close(output_of(plain, batch), trained, atol=1e-4, rtol=1e-4)


def test_torch_compile_traces_sites_without_graph_breaks():
    import torch._dynamo as dynamo
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True)).eval()
    explained = dynamo.explain(model.get_base_model())(**inputs_for(model.get_base_model()))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_set_adapter_cost_does_not_touch_other_adapters():
    """With many adapters loaded, switching toggles only the two adapters involved."""
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    for i in range(5):
        model.add_adapter(f"x{i}", LoraConfig(r=2, target_modules=["q_proj"]))
    touched = []
    real = torch.nn.Parameter.requires_grad_

    def spy(self, flag=True):
        touched.append(self)
        return real(self, flag)

    torch.nn.Parameter.requires_grad_ = spy
    try:
        model.set_adapter("x3")
    finally:
        torch.nn.Parameter.requires_grad_ = real
    per_adapter = 2 * 2  # two layers x (A, B)
    assert len(touched) == 2 * per_adapter  # the old active adapter off, the new one on
    trainable = {n.split(".deltas.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"x3"}


def test_loaded_parameters_own_their_storage_and_train(tmp_path):
    """Loading skips random init and adopts the file's tensors; nothing may stay a placeholder."""
    from conftest import tiny_llama
    from peftkit.core.method import is_placeholder

    base = TinyConvNet().eval()
    ids = torch.randint(0, 128, (3, 10))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["emb", "conv1", "head"],
                                                           use_dora=True, init_lora_weights=False))
    saved = model.eval()(ids)
    model.save_pretrained(str(tmp_path / "conv"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "conv"), is_trainable=True)
    params = [p for p in loaded.parameters() if p.requires_grad]
    assert params and not any(is_placeholder(p) for p in loaded.parameters())
    torch.testing.assert_close(loaded.eval()(ids), saved)
    loaded.train()
    opt = torch.optim.SGD(params, lr=0.1)
    loaded(ids).float().pow(2).mean().backward()
    opt.step()
    assert not torch.allclose(loaded.eval()(ids), saved)
    # PiSSA rewrites the base when built, so it must still run while loading its own file
    batch = inputs_for(tiny_llama())
    pissa = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with torch.no_grad():
        pissa.base_model.model.model.layers[0].self_attn.q_proj.deltas["default"].lora_B.add_(0.05)
    want = output_of(pissa.eval(), batch)
    pissa.save_pretrained(str(tmp_path / "pissa"))
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pissa"))
    torch.testing.assert_close(output_of(again, batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hooked", [False, True])
def test_in_place_site_path_matches_reference_math_and_keeps_hooks(hooked):
    """A plain LoRA on nn.Linear adds its update in place into a base output it computes itself;
    outputs and every gradient must equal y = W x + b + s B A x written out by hand, and a layer
    with a forward hook must still be called (so the hook runs)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    net = torch.nn.Sequential(lin)
    calls = []
    if hooked:
        lin.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    site = model.base_model.model[0]
    assert isinstance(site, Site) and site._into is not None
    delta = site.deltas["default"]
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = model(x)
    ref_x = x.detach().clone().requires_grad_(True)
    a, b = delta.lora_A.detach().clone().requires_grad_(True), delta.lora_B.detach().clone().requires_grad_(True)
    ref = ref_x @ lin.weight.T + lin.bias + delta.scaling * (ref_x @ a.T) @ b.T
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(delta.lora_A.grad, a.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(delta.lora_B.grad, b.grad, rtol=0, atol=1e-5)
    assert lin.weight.grad is None
    assert calls == ([torch.Size([3, 5, 10])] if hooked else [])
    with torch.no_grad():  # inference takes the same in-place path
        torch.testing.assert_close(model(x), ref.detach(), rtol=0, atol=1e-6)


def _hook_every_base_layer(model):
    """A no-op forward hook on each Site's base layer: the Site then no longer owns the base
    output, so every update is added out of place (the general path)."""
    return [s.base_layer.register_forward_hook(lambda m, i, o: None)
            for s in model.modules() if isinstance(s, Site)]


def test_in_place_site_path_on_gpt2_conv1d_equals_the_general_path():
    """GPT-2's Conv1D (weight in x out) takes the in-place path too: output and gradients equal the
    general path's (the update added out of place)."""
    base, cfg = build("gpt2", init=False)
    model = get_peft_model(base, cfg).eval()  # eval: GPT-2's own dropout would differ between runs
    sites = [m for m in model.modules() if isinstance(m, Site)]
    assert sites and all(s._into is not None and s._tokenwise for s in sites)
    batch = inputs_for(model.get_base_model())

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch).logits
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, fused_grads = run()
    handles = _hook_every_base_layer(model)
    general, general_grads = run()
    for h in handles:
        h.remove()
    torch.testing.assert_close(fused, general, rtol=0, atol=1e-5)
    for n in general_grads:
        torch.testing.assert_close(fused_grads[n], general_grads[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mixed", [False, True])
def test_forward_hooks_keep_what_they_saw(family, mixed):
    """Activation capture: a forward hook on an adapted layer's base layer keeps its output. A
    no-grad forward must not add the adapter's update into that very tensor (single adapter,
    GPT-2's Conv1D and mixed-adapter batches alike)."""
    base, cfg = build(family, init=False)
    model = get_peft_model(base, cfg).eval()
    if mixed:
        model.add_adapter("other", dataclasses.replace(cfg))
        model.set_adapter("other")
        perturb(model, 9)
        model.set_adapter("default")
    site = next(m for m in model.modules() if isinstance(m, Site))
    kept, copies = [], []

    def hook(m, i, o):
        kept.append(o)
        copies.append(o.detach().clone())

    site.base_layer.register_forward_hook(hook)
    batch = inputs_for(model.get_base_model())
    n = batch["input_ids"].shape[0]
    names = (["default", "other"] * n)[:n] if mixed else None
    with torch.no_grad():
        model(**batch, adapter_names=names) if mixed else model(**batch)
    assert kept and all(torch.equal(k, c) for k, c in zip(kept, copies))


def test_modules_to_save_called_with_keywords_only():
    """A module in modules_to_save that its parent calls with keyword arguments only
    (``vision(pixel_values=...)``) works once wrapped, as in PEFT."""
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, pixel_values=None):
            return self.proj(pixel_values)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = Inner()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.vision(pixel_values=x))

    torch.manual_seed(0)
    net = Outer()
    x = torch.randn(3, 4)
    want = net(x)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["head"], modules_to_save=["vision"]))
    torch.testing.assert_close(model(x), want)
    with torch.no_grad():
        model.base_model.model.vision.deltas["default"].module.proj.weight.add_(1.0)
    assert not torch.allclose(model(x), want)  # the trainable copy runs, called by keyword
    with model.disable_adapter():
        torch.testing.assert_close(model(x), want)


def test_paths_may_be_pathlib(tmp_path):
    """save_pretrained, from_pretrained, load_adapter and LoraConfig.from_pretrained take
    os.PathLike folders as Hugging Face PEFT does, not only str."""
    from peftkit import LoraConfig as LC

    base, cfg = build("llama", init=False)
    model = get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path / "a")
    assert LC.from_pretrained(tmp_path / "a").r == cfg.r
    batch = inputs_for(model.get_base_model())
    want = output_of(model, batch)
    again = PeftModel.from_pretrained(build("llama")[0], tmp_path / "a").eval()
    again.load_adapter(tmp_path / "a", "second")
    again.set_adapter("second")
    torch.testing.assert_close(output_of(again, batch), want, rtol=0, atol=0)


def test_peft_type_and_modules_to_save_attributes_as_in_peft():
    import peft

    for lib in (peft, __import__("peftkit")):
        base, _ = build("llama")
        m = lib.get_peft_model(base, lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        assert str(m.peft_type.value) == "LORA"
        assert m.modules_to_save == {"lm_head"}
        base, _ = build("llama")
        assert lib.get_peft_model(base, lib.LoraConfig(r=4, target_modules=["q_proj"])).modules_to_save is None


def test_training_under_autocast_works_and_matches_the_model_without_the_in_place_path():
    """Trainer(bf16=True) trains under autocast: the products then run in bf16 while the adapter
    stays fp32, so the in-place path must step aside (the general path lets autocast cast)."""
    base, _ = build("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    _hook_every_base_layer(model)  # the general path only
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = model(input_ids=ids, labels=ids).loss
    assert torch.equal(loss.detach(), again.detach())


def test_state_dict_lists_each_adapter_tensor_once():
    """The Site's cached active Delta (the in-place path) and modules_to_save copy are plain
    attributes, not child modules: state_dict and named_modules name each tensor once."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys))
    assert not any("._into." in k or "._replace." in k or "._run" in k for k in keys)
    assert sum(".deltas.default.lora_A" in k for k in keys) == 2
    site = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(site._modules) == {"base_layer", "deltas"} and site._into[0] is site.deltas["default"]


def test_load_state_dict_with_assign_keeps_set_adapter_right():
    """load_state_dict(assign=True) puts new Parameter objects in place; set_adapter must then
    train the new adapter's tensors and freeze the others' (not the replaced objects')."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.set_adapter("b")
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".deltas." in n}
    assert flags and all(v == (".deltas.b." in n) for n, v in flags.items())
    model.set_adapter("default")
    assert all(p.requires_grad == (".deltas.default." in n) for n, p in model.named_parameters() if ".deltas." in n)
