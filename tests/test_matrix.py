"""The table of tests/matrix.py, run: every method x every model family x each mode that applies.

A cell that does not apply is a refusal in the table and is asserted as one (test_refusal). The
method files keep what is specific to one method (its math, its errors, its options).
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, inputs_for, output_of, perturb
from matrix import CELLS, ROWS, TASKS, V, cells, peft_twin, refused_cells
from peftkit import PeftModel, get_peft_model
from peftkit.core.registry import registered_methods
from peftkit.core.site import Site

ADAPTERS = ("default", "second")


# ----- helpers ---------------------------------------------------------------------------------
def factory(cell):
    return FAMILIES[cell.family][0]


def batch_of(cell, model, rows: int = 2, padded: bool = True) -> dict:
    """The cell's inputs. Prompt methods get shorter rows, the first one left-padded by two."""
    if cell.row.kind != "prompt":
        b = inputs_for(model, batch=rows)
    else:
        b = inputs_for(model, batch=rows, seq=6)
        if padded:
            b["attention_mask"][0, :2] = 0
    if cell.row.in_batch:  # the tokens the adapter changes do occur
        b["input_ids"][:, :len(cell.row.in_batch)] = torch.tensor(cell.row.in_batch)
    return b


def with_labels(cell, batch: dict, constant: bool = False) -> dict:
    """``batch`` with the family's labels (T5: the decoder ids become the labels)."""
    b = dict(batch)
    task, n = TASKS[cell.family], b["input_ids"].shape[0]
    if task == "CAUSAL_LM":
        b["labels"] = b["input_ids"].clone()
    elif task == "SEQ_CLS":
        b["labels"] = torch.arange(n) % 2
    else:
        b["labels"] = b.pop("decoder_input_ids")
    if constant:  # a toy task: always token 1 (or class 1)
        b["labels"] = torch.full_like(b["labels"], 1)
    return b


def tail(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The positions of ``out`` that match the base model's (virtual tokens come first)."""
    return out if out.shape == like.shape else out[:, -like.shape[1]:]


def owned_by(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in f".{param_name}."


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def change_of(out, ref) -> float:
    """How much the adapter moved the output; it must be clearly more than rounding."""
    change = (tail(out, ref) - ref).abs().max().item()
    assert change > 1e-3 * ref.abs().max().item(), change
    return change


def two_adapters(cell, rows: int):
    """A model with two perturbed adapters of the cell, their outputs on one batch, and the base's."""
    base = factory(cell)()
    batch = batch_of(cell, base, rows)
    ref = output_of(base, batch)
    model = get_peft_model(base, cell.config()).eval()
    perturb(model, 1, cell.row.scale)
    model.add_adapter("second", cell.config())
    model.set_adapter("second")
    perturb(model, 2, cell.row.scale)
    outs = {"__base__": ref}
    for name in ADAPTERS:
        model.set_adapter(name)
        outs[name] = output_of(model, batch)
        assert trainable(model) and all(owned_by(n, name) for n in trainable(model))
    return model, batch, outs


# ----- the table itself ------------------------------------------------------------------------
def test_the_table_covers_every_method_and_family():
    """Every registered method has a row; every cell runs a mode or is a refusal with a reason."""
    assert {r.peft_type for r in ROWS} == set(registered_methods())
    assert len(CELLS) == len(ROWS) * len(FAMILIES)
    for c in CELLS:
        assert bool(c.modes) != bool(c.refused), c
        if c.refused:
            assert c.refused.reason and c.refused.match, c
    for r in ROWS:
        assert r.modes == tuple(m for m in ("single", "multi", "mixed", "train", "peft", "generate")
                                if m in r.modes)
        if len(r.modes) < 6:
            assert r.why_fewer_modes, r.name
        assert all(r.peft_cannot.values()), r.name
        assert (r.mixed is None) == (r.kind != "prompt"), r.name  # only prompt methods refuse mixed batches


@pytest.mark.parametrize("cell", refused_cells(), ids=lambda c: c.id)
def test_refusal(cell):
    """The method refuses the family's layers with the table's error and message."""
    with pytest.raises(cell.refused.exc, match=cell.refused.match):
        get_peft_model(factory(cell)(), cell.config())


# ----- single ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [c for c in cells("single") if c.values[0].row.kind == "layer"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_hooks_keep_what_they_saw(cell, grad):
    """A forward hook on an adapted layer's base layer (and on the Site) keeps the input and the
    output it was given: no Delta writes into a tensor someone else holds, with or without autograd."""
    model = get_peft_model(factory(cell)(), cell.config())
    perturb(model, 1, cell.row.scale)
    model.eval()
    seen = []

    def keep(mod, inputs, out):
        seen.extend((t, t.clone()) for t in (*inputs, out) if torch.is_tensor(t))

    hooks = [m.register_forward_hook(keep) for site in model.modules() if isinstance(site, Site)
             for m in (site, site.base_layer)]
    with torch.set_grad_enabled(grad):
        output_of(model, batch_of(cell, model))
    for h in hooks:
        h.remove()
    assert seen
    changed = [k for k, (o, before) in enumerate(seen) if not torch.equal(o, before)]
    assert not changed, f"{len(changed)} of {len(seen)} hooked tensors were written to after the hook"


@pytest.mark.parametrize("cell", cells("single"))
def test_single(cell, tmp_path):
    """Identity at init; only the adapter trains; shapes and loss with labels; the perturbed
    adapter changes the output; disable is the base; merge / unmerge / merged-disable /
    merge_and_unload equal (or the merge refusal, leaving the model as it was); a save/load round
    trip gives equal outputs and an inference-only model; unload gives back the base model."""
    row, make = cell.row, factory(cell)
    base = make()
    batch = batch_of(cell, base)
    ref = output_of(base, batch)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    model = get_peft_model(base, cell.config()).eval()
    same = dict(atol=0, rtol=0) if row.exact else dict(atol=1e-5, rtol=0)
    if row.identity:
        torch.testing.assert_close(output_of(model, batch), ref, **(dict(atol=0, rtol=0) if row.exact else
                                                                   dict(atol=1e-6, rtol=1e-5)))
    names = trainable(model)
    assert names and all(owned_by(n, "default") for n in names), names

    out = model(**with_labels(cell, batch))
    shape = list(ref.shape)
    if TASKS[cell.family] == "CAUSAL_LM" and row.adds_tokens:
        shape[1] += V  # virtual input tokens show in the logits
    assert list(out.logits.shape) == shape and torch.isfinite(out.loss)

    perturb(model, 1, row.scale)
    adapted = output_of(model, batch)
    change = change_of(adapted, ref)
    tol = dict(atol=min(1e-5, 1e-3 * change), rtol=0)  # BERT's logits are tiny: against the effect size
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, batch), ref, **same)
    torch.testing.assert_close(output_of(model, batch), adapted, atol=0, rtol=0)

    if row.merge is None:
        model.merge_adapter()
        torch.testing.assert_close(output_of(model, batch), adapted, **tol)
        with model.disable_adapter():  # merged adapters are taken out for the block
            torch.testing.assert_close(output_of(model, batch), ref, **tol)
        torch.testing.assert_close(output_of(model, batch), adapted, **tol)
        model.unmerge_adapter()
        torch.testing.assert_close(output_of(model, batch), adapted, **tol)
        plain = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, Site) for m in plain.modules())
        assert [type(m) for m in plain.modules()] == types
        torch.testing.assert_close(output_of(plain, batch), adapted, **tol)
    else:
        with pytest.raises(row.merge.exc, match=row.merge.match):
            model.merge_adapter()
        with pytest.raises(row.merge.exc, match=row.merge.match):
            model.merge_and_unload()
        torch.testing.assert_close(output_of(model, batch), adapted, atol=0, rtol=0)

    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), adapted, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference

    restored = model.unload()
    assert [type(m) for m in restored.modules()] == types
    after = restored.state_dict()
    assert after.keys() == weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(after[k], v, atol=1e-5 if row.merge is None else 0, rtol=0)
    torch.testing.assert_close(output_of(restored, batch), ref, **same)


# ----- multi -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", cells("multi"))
def test_multi(cell, tmp_path):
    """Two adapters: set_adapter switches to each one's outputs (and trains only it); both are
    saved and loaded (load_adapter does not switch); deleting the active one falls back to the
    other and leaves no trace."""
    model, batch, outs = two_adapters(cell, rows=2)
    change_of(outs["second"], outs["default"])
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(factory(cell)(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), outs["default"], atol=1e-6, rtol=0)
    loaded.load_adapter(str(tmp_path / "second"), "second")
    torch.testing.assert_close(output_of(loaded, batch), outs["default"], atol=1e-6, rtol=0)
    loaded.set_adapter("second")
    torch.testing.assert_close(output_of(loaded, batch), outs["second"], atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())

    model.set_adapter("second")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(owned_by(n, "second") for n, _ in model.named_parameters())
    assert not any(owned_by(k, "second") for k in model.state_dict())
    torch.testing.assert_close(output_of(model, batch), outs["default"], atol=0, rtol=0)


# ----- mixed -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", cells("mixed"))
def test_mixed(cell):
    """One batch, one adapter per row (``__base__``: none): each row equals what its adapter alone
    gives, or the method's refusal; unknown names are refused."""
    model, batch, outs = two_adapters(cell, rows=4)
    rows = ["second", "__base__", "default", "second"]
    if cell.row.mixed is not None:
        with pytest.raises(cell.row.mixed.exc, match=cell.row.mixed.match):
            model(**batch, adapter_names=rows)
        return
    mixed = output_of(model, {**batch, "adapter_names": rows})
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-5, rtol=0)
    torch.testing.assert_close(output_of(model, batch), outs["second"], atol=0, rtol=0)  # nothing stays routed
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**batch, adapter_names=["nope"] * 4)


# ----- train -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", cells("train"))
def test_train(cell):
    """Training lowers the loss; gradients reach exactly the adapter's tensors (each of them by
    the end); the base model's weights stay as they were."""
    base = factory(cell)()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, cell.config())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(owned_by(n, "default") for n in params)
    if cell.row.kind == "prompt":
        model.train()
        batch = with_labels(cell, batch_of(cell, model, padded=False), constant=True)
        opt = torch.optim.Adam(params.values(), lr=0.1)
        loss_of, steps, margin = (lambda: model(**batch).loss), 15, 0.05
    else:
        model.eval()  # the base models' own dropout (T5's is functional) would make the loss noisy
        for m in model.modules():
            if isinstance(m, Site):
                m.deltas.train()
        batch = batch_of(cell, base, rows=4)
        target = torch.randn(output_of(model, batch).shape, generator=torch.Generator().manual_seed(3))
        opt = torch.optim.Adam(params.values(), lr=2e-2)
        loss_of, steps, margin = (lambda: torch.nn.functional.mse_loss(output_of(model, batch), target)), 6, 0
    losses = []
    for _ in range(steps):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        if cell.row.grads_from_start:
            assert all(p.grad.abs().sum() > 0 for p in params.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - margin, losses
    assert all(p.grad.abs().sum() > 0 for p in params.values())
    after = model.unload().state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k


# ----- peft ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", cells("peft"))
def test_peft(cell, tmp_path, request):
    """Against Hugging Face PEFT on the same weights: peft's file loads here with equal outputs
    (merged too), ours loads in peft with equal outputs, and the parameter counts agree."""
    peft = pytest.importorskip("peft")
    if cell.row.peft_type == "BOFT":
        request.getfixturevalue("peft_boft_everywhere")
    row, make = cell.row, factory(cell)
    ours_cfg = (row.peft_config or row.config)(cell.family)
    scale = max(row.scale, 0.2)

    base = make()
    batch = batch_of(cell, base)
    plain = output_of(base, batch)
    pm = peft.get_peft_model(base, peft_twin(ours_cfg))
    perturb(pm, 5, scale)
    pm.eval()
    ref = output_of(pm, batch)
    change_of(ref, plain)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(make(), str(tmp_path / "theirs")).eval()
    assert type(ours.peft_config["default"]) is type(ours_cfg)
    torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=0)
    if row.merge is None:
        ours.merge_adapter()
        torch.testing.assert_close(output_of(ours, batch), ref, atol=1e-5, rtol=0)

    mine = get_peft_model(make(), ours_cfg)
    extra = row.peft_extra_total[1](mine) if row.peft_extra_total else 0  # a known difference, pinned
    trained, total = mine.get_nb_trainable_parameters()
    assert (trained, total + extra) == pm.get_nb_trainable_parameters()
    perturb(mine, 6, scale)
    mine.eval()
    expected = output_of(mine, batch)
    mine.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(theirs, batch), expected, atol=1e-5, rtol=0)
    # inference-mode counts agree as well (p-tuning keeps only the encoder's output then)
    assert ours.get_nb_trainable_parameters()[1] + extra == theirs.get_nb_trainable_parameters()[1]


# ----- generate --------------------------------------------------------------------------------
def greedy_uncached(model, ids, steps):
    seq = ids
    for _ in range(steps):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("cell", cells("generate"))
def test_generate(cell):
    """Decoders: a left-padded batch generates what each row alone generates, which is greedy
    decoding without the cache; the output starts with the inputs. T5: generate equals greedy
    decoding by hand."""
    model = get_peft_model(factory(cell)(), cell.config())
    perturb(model, 3, cell.row.scale)
    model.eval()
    if TASKS[cell.family] == "SEQ_2_SEQ_LM":
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        dec = torch.tensor([[0]])
        for _ in range(5):
            nxt = model(input_ids=ids, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
        assert out.tolist() == dec.tolist()
        return
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for row, start in ((0, 0), (1, 2)):
        alone = model.generate(input_ids=ids[row:row + 1, start:], **kw)
        assert batched[row, 5:].tolist() == alone[0, 5 - start:].tolist()
        assert alone.tolist() == greedy_uncached(model, ids[row:row + 1, start:], 6).tolist()
    assert batched[:, :5].tolist() == ids.tolist()  # output = inputs + new tokens, as without adapters
