"""OFT and BOFT against Hugging Face PEFT 0.21 and on their own.

Files both ways (logits <= 1e-5 in fp32), exact merge and unmerge, gradients only into the
adapter, mixed-adapter batches, save/load with two adapters, the Cayley(-Neumann) blocks against
PEFT's own function, and clear errors for bad configs. Tiny models only: seconds.

PEFT computes BOFT with more than one butterfly factor only through its CUDA extension (on a CPU
it silently falls back to one factor). The ``peft_boft_everywhere`` fixture gives PEFT a stand-in
for that extension's block-diagonal kernel (``torch.block_diag``), so PEFT's own permutations and
products run on this machine and the comparison covers every factor count.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from conftest import inputs_for, output_of, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from peftkit import BOFTConfig, ConfigError, OFTConfig, PeftModel, get_peft_model
from peftkit.methods.oft import cayley, closest_divisor

peft = pytest.importorskip("peft")

LLAMA_OFT = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
LLAMA_BOFT = ["q_proj", "v_proj", "down_proj"]

# name -> (config kwargs, targets); the same kwargs build peftkit's and PEFT's config
CASES = {
    "oft": (dict(oft_block_size=8), LLAMA_OFT),
    "oft_r": (dict(r=4, oft_block_size=0), LLAMA_OFT),
    "oft_exact_cayley": (dict(oft_block_size=8, use_cayley_neumann=False), LLAMA_OFT),
    "oft_block_share": (dict(oft_block_size=8, block_share=True), LLAMA_OFT),
    "oft_coft": (dict(oft_block_size=8, coft=True, eps=1e-2), LLAMA_OFT),
    "oft_neumann3": (dict(oft_block_size=16, num_cayley_neumann_terms=3), LLAMA_OFT),
    "oft_adjusted_block": (dict(oft_block_size=6), LLAMA_OFT),  # 6 divides neither 32 nor 64
    "boft": (dict(boft_block_size=4), LLAMA_BOFT),
    "boft_2_factors": (dict(boft_block_size=4, boft_n_butterfly_factor=2), LLAMA_BOFT),
    "boft_3_factors_by_num": (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3), LLAMA_BOFT),
    "boft_4_factors": (dict(boft_block_size=2, boft_n_butterfly_factor=4), LLAMA_BOFT),
}


def configs(name: str, **extra):
    """(peftkit config, PEFT config) for case ``name``."""
    kw, targets = CASES[name]
    kw = {**kw, "target_modules": targets, **extra}
    if name.startswith("boft"):
        return BOFTConfig(**kw), peft.BOFTConfig(**kw)
    return OFTConfig(**kw), peft.OFTConfig(**kw)


pytestmark = pytest.mark.usefixtures("peft_boft_everywhere")  # conftest.py: PEFT's BOFT kernel on a CPU
S = 0.2  # perturb's scale here


class ConvNet(nn.Module):
    """Conv2d 1x1 and 3x3 (padded, biased) and a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.conv3(torch.relu(self.conv1(x))).mean((2, 3)))


CONV_X = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(4))


# ----- Hugging Face PEFT's files, both ways --------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_saved_loads_here_and_merges(name, tmp_path):
    ours_cfg, theirs_cfg = configs(name)
    base = tiny_llama()
    batch = inputs_for(base)
    plain = output_of(base, batch)
    pm = peft.get_peft_model(base, theirs_cfg)
    perturb(pm, 5, S)
    pm.eval()
    ref = output_of(pm, batch)
    assert (ref - plain).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert type(ours.peft_config["default"]) is type(ours_cfg)
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_here_loads_in_peft(name, tmp_path):
    ours_cfg, _ = configs(name)
    model = get_peft_model(tiny_llama(), ours_cfg)
    perturb(model, 6, S)
    model.eval()
    batch = inputs_for(model)
    ref = output_of(model, batch)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ours_cfg.peft_type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert not [w for w in caught if "cayley-neumann" in str(w.message).lower()]  # read as today's format
    torch.testing.assert_close(output_of(theirs, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_biases_train_and_travel_with_the_adapter(method, tmp_path):
    """bias="<method>_only": the targets' own biases train, are saved, and PEFT reads them (and back)."""
    cls, theirs_cls = (OFTConfig, peft.OFTConfig) if method == "oft" else (BOFTConfig, peft.BOFTConfig)
    kw = dict(target_modules=["query", "value"], bias=f"{method}_only",
              **({"oft_block_size": 8} if method == "oft" else {"boft_block_size": 4, "boft_n_butterfly_factor": 2}))
    model = get_peft_model(tiny_bert_cls(), cls(**kw))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    biases = [n for n in trainable if ".deltas." not in n]
    assert biases and all(n.endswith((".query.base_layer.bias", ".value.base_layer.bias")) for n in biases)
    assert len(biases) == 4  # query and value of two layers
    perturb(model, 7, S)
    model.eval()
    batch = inputs_for(model)
    ref = output_of(model, batch)
    model.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(theirs, batch), ref, atol=1e-5, rtol=0)
    pm = peft.get_peft_model(tiny_bert_cls(), theirs_cls(**kw))
    perturb(pm, 8, S)
    pm.eval()
    expected = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path / "theirs"))
    back = PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(output_of(back, batch), expected, atol=1e-5, rtol=0)


CONV_CASES = {
    "oft": (lambda: OFTConfig(oft_block_size=8, target_modules=["conv1", "conv3", "head"]),
            lambda: peft.OFTConfig(oft_block_size=8, target_modules=["conv1", "conv3", "head"])),
    "boft": (lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv1", "conv3", "head"]),
             lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv1", "conv3", "head"])),
}


@pytest.mark.parametrize("method", sorted(CONV_CASES))
def test_conv2d_matches_peft_both_ways(method, tmp_path):
    ours_cfg, theirs_cfg = CONV_CASES[method]
    pm = peft.get_peft_model(ConvNet(), theirs_cfg())
    perturb(pm, 11, S)
    pm.eval()
    unmerged_peft = pm(CONV_X)
    pm.save_pretrained(str(tmp_path / "theirs"))
    pm.merge_adapter()
    ref = pm(CONV_X)  # PEFT's merged result: W' = W R^T (diag(s) W R^T for BOFT)
    if method == "oft":
        # PEFT 0.21's unmerged OFT forward on a 3x3 conv rotates overlapping patches of the input
        # and sums them back, which is not its own merged layer (nor the base at initialisation)
        assert (unmerged_peft - ref).abs().max() > 1e-2
    else:
        torch.testing.assert_close(unmerged_peft, ref, atol=1e-5, rtol=0)
    ours = PeftModel.from_pretrained(ConvNet(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(ours(CONV_X), ref, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(ours(CONV_X), ref, atol=1e-5, rtol=0)
    mine = get_peft_model(ConvNet(), ours_cfg())
    perturb(mine, 12, S)
    mine.eval()
    expected = mine(CONV_X)
    mine.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(ConvNet(), str(tmp_path / "ours")).eval()
    back.merge_adapter()
    torch.testing.assert_close(back(CONV_X), expected, atol=1e-5, rtol=0)


def test_oft_on_1x1_conv_matches_peft_unmerged(tmp_path):
    """Where PEFT's unmerged OFT conv forward is exact (1x1 kernels) it agrees with ours unmerged."""
    cfg = dict(oft_block_size=4, target_modules=["conv1"])
    pm = peft.get_peft_model(ConvNet(), peft.OFTConfig(**cfg))
    perturb(pm, 13, S)
    pm.eval()
    ref = pm(CONV_X)
    pm.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(ConvNet(), str(tmp_path)).eval()
    torch.testing.assert_close(ours(CONV_X), ref, atol=1e-5, rtol=0)


# ----- merging, training, mixed batches, save/load ---------------------------------------------
# OFT and BOFT as such over the model families (identity, merging, training, two adapters, mixed
# batches, save/load, PEFT parity) are rows of the table in tests/matrix.py; here: their variants.
MODELS = {
    "oft_exact": (tiny_llama, lambda: OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=LLAMA_OFT)),
    "oft_conv": (ConvNet, lambda: OFTConfig(oft_block_size=8, target_modules=["conv1", "conv3", "head"])),
    "boft_conv": (ConvNet, lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                              target_modules=["conv1", "conv3", "head"])),
}


def _batch(model):
    return CONV_X if isinstance(model, ConvNet) else inputs_for(model, batch=3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_at_init_merge_exact_unmerge_restores(name):
    factory, make = MODELS[name]
    base = factory()
    batch = _batch(base)
    plain = output_of(base, batch)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, make()).eval()
    torch.testing.assert_close(output_of(model, batch), plain, atol=1e-6, rtol=0)
    perturb(model, 1, S)
    unmerged = output_of(model, batch)
    assert (unmerged - plain).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, batch), unmerged, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, batch), plain, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, batch), unmerged, atol=1e-5, rtol=0)
    restored = model.unload().state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_reach_only_the_adapter_and_training_lowers_loss(name):
    factory, make = MODELS[name]
    base = factory()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, make()).eval()
    batch = _batch(base)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".deltas.default." in n for n in params)
    target = torch.randn(output_of(model, batch).shape, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(params.values(), lr=2e-2)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(output_of(model, batch), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
        assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = model.unload().state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_batch_and_save_load_two_adapters(name, tmp_path):
    factory, make = MODELS[name]
    base = factory()
    batch = _batch(base)
    plain = output_of(base, batch)
    model = get_peft_model(base, make()).eval()
    perturb(model, 2, S)
    model.add_adapter("second", make())
    model.set_adapter("second")
    perturb(model, 3, S)
    outs = {}
    for adapter in ("default", "second"):
        model.set_adapter(adapter)
        outs[adapter] = output_of(model, batch)
    assert (outs["default"] - outs["second"]).abs().max() > 1e-3
    rows = ["second", "__base__", "default"]
    kwargs = dict(batch) if isinstance(batch, dict) else {"x": batch}
    mixed = output_of(model, {**kwargs, "adapter_names": rows})
    for i, adapter in enumerate(rows):
        want = plain if adapter == "__base__" else outs[adapter]
        torch.testing.assert_close(mixed[i], want[i], atol=1e-5, rtol=0)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), outs["default"], atol=1e-6, rtol=0)
    loaded.load_adapter(str(tmp_path / "second"), "second")
    loaded.set_adapter("second")
    torch.testing.assert_close(output_of(loaded, batch), outs["second"], atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"])).eval()
    site = model.base_model.model.model.layers[0].self_attn.q_proj
    assert site.deltas["default"].oft_R.dtype == torch.float32
    perturb(model, 4, scale=0.05)
    batch = inputs_for(base)
    unmerged = output_of(model, batch).float()
    model.merge_adapter()
    merged = output_of(model, batch).float()
    assert site.base_layer.weight.dtype == torch.bfloat16
    assert (merged - unmerged).abs().max() < 0.1 * unmerged.abs().max()  # bf16 rounding of the weights


# ----- the math, against PEFT's own functions ------------------------------------------------
@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5, 6, 8])
def test_cayley_blocks_match_peft(terms):
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    mod = OFTRotationModule(3, b * (b - 1) // 2, b, 18, use_cayley_neumann=terms > 0,
                            num_cayley_neumann_terms=terms)
    vec = 0.1 * torch.randn(3, b * (b - 1) // 2, generator=torch.Generator().manual_seed(terms))
    theirs = mod._cayley_batch(vec, b, terms > 0, terms)
    skew = mod._pytorch_skew_symmetric(vec, b)
    torch.testing.assert_close(cayley(skew, terms), theirs, atol=1e-6, rtol=0)
    if terms == 0:  # the exact transform is orthogonal
        eye = torch.eye(b).expand(3, b, b)
        torch.testing.assert_close(theirs @ theirs.transpose(1, 2), eye, atol=1e-6, rtol=0)


def test_block_size_adjustment_follows_peft():
    from peft.tuners.oft.layer import OFTLayer

    layer = OFTLayer.__new__(OFTLayer)
    for n in (32, 64, 72, 100, 576):
        for v in (1, 3, 5, 6, 7, 12, 33, 50, 700):
            assert closest_divisor(n, v) == layer.adjust_oft_parameters(n, v), (n, v)
    with pytest.warns(UserWarning, match="does not divide"):
        get_peft_model(tiny_llama(), OFTConfig(oft_block_size=6, target_modules=["q_proj"]))


def test_module_dropout_replaces_blocks_in_training_only():
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["q_proj"]))
    perturb(model, 9, S)
    delta = model.base_model.model.model.layers[0].self_attn.q_proj.deltas["default"]
    delta.train()
    eye = torch.eye(4)
    dropped = delta.blocks(dropout=True)
    is_eye = [torch.equal(blk, eye) for blk in dropped]
    assert sum(is_eye) == 4  # int(0.5 * 8 blocks)
    assert not any(torch.equal(blk, eye) for blk in delta.blocks())  # merges never drop blocks
    delta.eval()
    assert not any(torch.equal(blk, eye) for blk in delta.blocks(dropout=True))


def test_coft_keeps_blocks_within_the_radius():
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, coft=True, eps=1e-3, target_modules=["q_proj"]))
    perturb(model, 10, S)
    delta = model.base_model.model.model.layers[0].self_attn.q_proj.deltas["default"]
    model(**inputs_for(model))
    radius = 1e-3 / 4 ** 0.5  # eps / sqrt(number of blocks)
    norms = delta.oft_R.norm(dim=1) * 2 ** 0.5
    assert torch.all(norms <= radius * (1 + 1e-5))


# ----- errors --------------------------------------------------------------------------------
BAD_CONFIGS = [
    (lambda: OFTConfig(r=8), "exactly one of r"),
    (lambda: OFTConfig(r=0, oft_block_size=0), "exactly one of r"),
    (lambda: OFTConfig(oft_block_size=-4), "non-negative integer"),
    (lambda: OFTConfig(bias="lora_only"), "'none', 'all' or 'oft_only'"),
    (lambda: OFTConfig(eps=0), "positive number"),
    (lambda: OFTConfig(num_cayley_neumann_terms=0), "positive integer"),
    (lambda: OFTConfig(module_dropout=1.0), "probability"),
    (lambda: BOFTConfig(boft_block_size=4, boft_block_num=8), "exactly one of boft_block_size"),
    (lambda: BOFTConfig(boft_n_butterfly_factor=0), "positive integer"),
    (lambda: BOFTConfig(boft_dropout=-0.1), "probability"),
    (lambda: BOFTConfig(bias="oft_only"), "'none', 'all' or 'boft_only'"),
]


@pytest.mark.parametrize("make,match", BAD_CONFIGS)
def test_bad_configs_error_clearly(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_bad_placements_error_clearly():
    with pytest.raises(ConfigError, match=r"q_proj.*boft_block_size 5 must divide 32"):
        get_peft_model(tiny_llama(), BOFTConfig(boft_block_size=5, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"must divide 32"):
        get_peft_model(tiny_llama(), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="both be even"):
        get_peft_model(tiny_llama(), BOFTConfig(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2,
                                                target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="Conv1D is not supported by OFT.*supports"):
        get_peft_model(tiny_gpt2(), OFTConfig(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="not supported by BOFT.*supports"):
        get_peft_model(tiny_llama(), BOFTConfig(target_modules=["embed_tokens"]))
    net = nn.Sequential(nn.Conv2d(4, 4, (1, 3)))
    with pytest.raises(TypeError, match="non-square kernel"):
        get_peft_model(net, OFTConfig(oft_block_size=4, target_modules=["0"]))
    with pytest.raises(TypeError, match="dilation"):
        get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    model = get_peft_model(tiny_llama(), BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.deltas["default"].boft_s.zero_()
    model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be undone"):
        model.unmerge_adapter()


# ----- the training command ------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("oft", ["--set", "oft_block_size=8"]),
                                          ("boft", ["--set", "boft_n_butterfly_factor=2"])])
def test_peftkit_train_runs_the_method(method, extra, tmp_path):
    from peftkit.cli import main
    from peftkit.train import task as T
    from test_train_data import tiny_chat_model, write_jsonl

    model_dir = tiny_chat_model(str(tmp_path / "model"))
    train, _ = T.generate(8, 0, seed=5)
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": r["messages"][1:]} for r in train])
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "-o", str(out), "--threads", "1", "--batch-size", "4",
            "--lr", "5e-3", "--data", data, "--max-steps", "2", "--method", method, *extra]
    assert main(argv) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()
    assert os.path.getsize(out / "adapter" / "adapter_model.safetensors") > 0
    theirs = peft.PeftModel.from_pretrained(_load_causal(model_dir), str(out / "adapter"))
    assert type(theirs.peft_config["default"]).__name__ == f"{method.upper()}Config"


def _load_causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_peft_cpu_boft_file_with_lost_factors_is_refused_clearly(monkeypatch, tmp_path):
    """Without its CUDA extension PEFT trains BOFT with one factor whatever the config says; the
    file's boft_R then has 1 factor where the config asks for 2, and loading says which tensor."""
    import peft.tuners.boft.layer as boft_layer
    from peftkit import CheckpointError

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"boft_R.*shape \(1, 8, 4, 4\).*\(2, 8, 4, 4\)"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
