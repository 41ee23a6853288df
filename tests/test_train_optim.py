"""``peftkit train --optim``: the option parses, 8-bit AdamW trains on CPU when bitsandbytes can,
paged optimizers are refused without CUDA, and the optimizer-state sizes the estimate uses match
what the optimizers really allocate."""
from __future__ import annotations

import os

import pytest
import torch

from peftkit.cli import build_parser, main
from peftkit.config import ConfigError
from peftkit.train import optim as O
from peftkit.train.options import parse_train_args
from test_train_data import tiny_chat_model, write_jsonl

FAST = ["--threads", "1", "--batch-size", "4", "--log-every", "1", "--lr", "5e-3"]


def _parse(argv):
    parser, sub = build_parser()
    return parse_train_args(parser, sub.choices["train"], ["train", *argv])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"text": f"order {i}: {i % 7} lamps to city {i % 5}, arriving day {i % 3}"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", rows)


def test_option_parses_with_adamw_default():
    assert _parse([]).optim == "adamw" and _parse([]).trainer_optim == "adamw_torch_fused"
    with pytest.raises(SystemExit):  # argparse's own "invalid choice"
        _parse(["--optim", "lion"])


def test_config_file_value_is_checked_too(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"optim": "lion"}')
    with pytest.raises(ConfigError, match="--optim 'lion' is not known; choose one of adamw, adamw_8bit"):
        _parse(["--config", str(cfg)])


@pytest.mark.parametrize("name,alt", [("paged_adamw_8bit", "adamw_8bit"), ("paged_adamw", "adamw")])
def test_paged_needs_cuda_and_names_the_alternative(name, alt):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match=f"needs a CUDA GPU.*Use --optim {alt} instead"):
        O.check_optim(name, cuda=False)
    assert O.check_optim(name, cuda=True) == O.OPTIMIZERS[name][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_paged_refused_by_the_command_before_loading(model_dir, data, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    code = main(["train", "--model", model_dir, "--data", data, "-o", str(tmp_path), "--optim", "paged_adamw_8bit"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--optim adamw_8bit" in err
    assert not os.path.exists(tmp_path / "checkpoints")  # refused before any training started


def test_8bit_on_a_cpu_build_without_the_kernel_is_refused(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(O, "_bnb_8bit_runs_on_cpu", lambda: "NotImplementedError: no CPU kernel")
    with pytest.raises(ConfigError, match="cannot run 8-bit Adam on CPU tensors .*no CPU kernel.*--optim adamw"):
        O.check_optim("adamw_8bit", cuda=False)


def test_adamw_8bit_trains_on_cpu(model_dir, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available() or O._bnb_8bit_runs_on_cpu() is not None:
        pytest.skip("bitsandbytes cannot run 8-bit Adam on CPU here (the refusal is tested above)")
    # r=128 on q_proj (hidden 32): A and B hold 4096 values each, the size bitsandbytes quantises from
    assert main(["train", "--model", model_dir, "--data", data, "-o", str(tmp_path), *FAST, "--max-steps", "3",
                 "--save-every", "3", "--optim", "adamw_8bit", "--r", "128", "--target", "q_proj"]) == 0
    opt = torch.load(tmp_path / "checkpoints" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    quant = [s["__bnb_optimizer_quant_state__"] for s in opt["state"].values()
             if "__bnb_optimizer_quant_state__" in s]
    assert quant and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quant)
    from safetensors.torch import load_file

    b = [t for k, t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # B starts at zero: it moved


def _allocated_state(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for k, t in st.items():
            if torch.is_tensor(t) and k != "step" and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_state_bytes_match_the_optimizer(name):
    sizes = [4608, 1536, 300, 4096 * 3 + 1]  # SmolLM2's q_proj A (576x8) and v_proj B (192x8), small, odd
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    if name == "adamw":
        opt = torch.optim.AdamW(params)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        if O._bnb_8bit_runs_on_cpu() is not None:
            pytest.skip("no 8-bit Adam on CPU here")
        opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert O.state_bytes(name, sizes) == _allocated_state(opt)


def test_state_bytes_8bit_is_about_a_quarter_and_embeddings_stay_fp32():
    big = [1 << 20]
    assert O.state_bytes("adamw", big) == 8 << 20
    eight = O.state_bytes("adamw_8bit", big)
    assert 2 << 20 < eight < 2.04 * (1 << 20) + 4096
    assert O.state_bytes("paged_adamw_8bit", big) == eight and O.state_bytes("paged_adamw", big) == 8 << 20
    assert O.state_bytes("adamw_8bit", [], fp32_sizes=big) == 8 << 20
    assert O.state_bytes("sgd", big) == 0
    with pytest.raises(ValueError, match="sgd or one of adamw"):
        O.state_bytes("lion", big)
