"""``peftkit`` CLI on a tiny local model: every data format, config files, resume after a kill,
bad data, DDP with two processes, and generate/eval/merge/inspect. Seconds each, no downloads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from peftkit.cli import main
from peftkit.train import task as T
from test_train_data import tiny_chat_model, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--threads", "1", "--batch-size", "4", "--log-every", "1", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One small JSON Lines file per format, drawn from the demo task's examples."""
    d = tmp_path_factory.mktemp("data")
    train, _ = T.generate(24, 0, seed=5)
    rows = {
        "completion": [{"prompt": r["messages"][1]["content"] + "\n", "completion": r["messages"][2]["content"]} for r in train],
        "chat": [{"messages": r["messages"][1:]} for r in train],
        "text": [{"text": r["messages"][1]["content"]} for r in train],
        "classification": [{"text": r["messages"][1]["content"], "label": r["target"]["day"] in ("Saturday", "Sunday") and "weekend" or "weekday"} for r in train],
    }
    return {k: write_jsonl(d / f"{k}.jsonl", v) for k, v in rows.items()}


def train(model_dir, out, *extra) -> int:
    return main(["train", "--model", model_dir, "-o", str(out), *FAST, *extra])


def adapter_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("fmt", ["completion", "chat", "text", "classification"])
def test_train_each_format(model_dir, datasets, tmp_path, fmt):
    assert train(model_dir, tmp_path, "--data", datasets[fmt], "--eval-fraction", "0.25", "--max-steps", "3") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 1
    assert (tmp_path / "loss.png").stat().st_size > 1000
    key = "eval_accuracy" if fmt == "classification" else "eval_perplexity"
    assert key in metrics["before"] and key in metrics["after"]
    assert metrics["after"]["eval_loss"] != metrics["before"]["eval_loss"]  # the adapter changed something
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == ("SEQ_CLS" if fmt == "classification" else "CAUSAL_LM")
    tensors = adapter_tensors(tmp_path / "adapter")
    if fmt == "classification":  # the new head is trained in full and saved with the adapter
        assert any(".score." in k for k in tensors)


def test_config_file_and_method_fields(model_dir, datasets, tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"data: {datasets['completion']}\nmax_steps: 2\nr: 4\nalpha: 8\ntarget: q_proj,v_proj\n"
                    "lora_dropout: 0.1\nset: [use_rslora=true]\n")
    assert train(model_dir, tmp_path / "out", "--config", str(conf), "--r", "2") == 0
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2  # the command line wins over the file
    assert (cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (8, 0.1, True)
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2


def test_option_errors_are_clear(model_dir, datasets, tmp_path, capsys):
    assert train(model_dir, tmp_path, "--data", datasets["text"], "--set", "no_such_field=1") == 2
    assert "'no_such_field' is neither a peftkit train option nor a field of LoraConfig" in capsys.readouterr().err
    assert train(model_dir, tmp_path, "--data", datasets["text"], "--method", "nope") == 2
    assert "LORA" in capsys.readouterr().err
    assert train(model_dir, tmp_path, "--data", datasets["text"], "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_data_file_names_the_line(model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", '{"prompt": "a", "completion": "b"',])
    assert train(model_dir, tmp_path / "out", "--data", bad) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 3: not valid JSON" in err and '{"prompt","completion"}' in err
    assert not (tmp_path / "out" / "adapter").exists()


def test_resume_after_kill_loses_nothing(model_dir, datasets, tmp_path):
    """A run killed mid-way and resumed ends with exactly the adapter of an uninterrupted run."""
    args = ["--data", datasets["chat"], "--max-steps", "30", "--save-every", "2", "--keep-checkpoints", "3",
            "--scheduler", "cosine", "--warmup", "3", "--grad-accum", "2", "--batch-size", "2"]
    assert train(model_dir, tmp_path / "whole", *args) == 0

    cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", model_dir, "-o", str(tmp_path / "killed"), *FAST, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()

    assert train(model_dir, tmp_path / "killed", *args, "--resume") == 0
    whole, resumed = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "killed" / "adapter")
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["steps"] == 30


def test_ddp_two_processes_agree(model_dir, datasets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "peftkit.cli",
           "train", "--model", model_dir, "--data", datasets["completion"], "-o", str(out), "--epochs", "1",
           "--batch-size", "2", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_agree"] and len(set(metrics["rank_digests"])) == 1
    # 24 examples, 2 per rank per step: each rank saw its own half (one process would take 12 steps),
    # so equal adapters mean the gradients were averaged across ranks
    assert metrics["steps"] == 6
    assert json.loads((out / "adapter" / "peftkit.json").read_text())["saved_by_rank"] == 0
    assert res.stdout.count("=== summary ===") == 1  # rank 0 alone reports and saves
    from peftkit.train.command import adapter_digest
    from peftkit.train.tools import load_with_adapter

    assert adapter_digest(load_with_adapter(str(out / "adapter"))[0]) == metrics["rank_digests"][0]


@pytest.fixture(scope="module")
def trained(model_dir, datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert train(model_dir, out, "--data", datasets["completion"], "--max-steps", "4", "--target", "all-linear") == 0
    return out / "adapter"


def test_inspect(trained, capsys):
    assert main(["inspect", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors = adapter_tensors(trained)
    assert info["method"] == "LORA" and info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["adapted_sites"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert info["base_model"] and info["size_mb"] > 0 and info["trained_with"]["format"] == "completion"


def test_generate_and_eval(trained, datasets, capsys):
    from peftkit.train.evaluate import generate_batch
    from peftkit.train.tools import load_with_adapter

    assert main(["generate", "--adapter", str(trained), "--raw", "--max-new-tokens", "5", "Order from Kim"]) == 0
    printed = capsys.readouterr().out.strip()
    peft_model, tok, _ = load_with_adapter(str(trained))
    assert printed == generate_batch(peft_model, tok, ["Order from Kim"], 5, chat_rendered=False)[0].strip()
    assert main(["eval", "--adapter", str(trained), "--data", datasets["completion"], "--exact-match"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 24 and 0 <= result["exact_match"] <= 1 and result["perplexity"] > 1
    assert main(["eval", "--adapter", str(trained), "--data", datasets["completion"], "--base"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != result["loss"]


def test_merge_writes_a_model_transformers_loads(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit.train.tools import load_with_adapter

    assert main(["merge", "--adapter", str(trained), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    peft_model, _, _ = load_with_adapter(str(trained))
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        with peft_model.disable_adapter():
            assert not torch.allclose(merged(ids).logits, peft_model(input_ids=ids).logits)


def test_subcommand_hook_is_open():
    """Other modules register commands by name: the tuple drives the parser."""
    from peftkit import cli

    parser, sub = cli.build_parser()
    assert {"train", "generate", "eval", "merge", "inspect"} <= set(sub.choices)
    assert all(m.startswith("peftkit.") for m in cli.COMMAND_MODULES)


def test_generate_chat_keeps_history(trained, monkeypatch, capsys):
    lines = iter(["Order from Kim", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["generate", "--adapter", str(trained), "--chat", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_resume_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    from peftkit.train.command import latest_checkpoint

    for step, complete in ((2, True), (4, True), (10, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_gradient_checkpointing_still_trains_the_adapter(model_dir, datasets, tmp_path):
    assert train(model_dir, tmp_path, "--data", datasets["text"], "--max-steps", "2", "--gradient-checkpointing") == 0
    b = [t for k, t in adapter_tensors(tmp_path / "adapter").items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # B starts at zero: gradients reached every layer


def test_enable_checkpointing_recomputes_and_keeps_gradients():
    from conftest import tiny_llama

    from peftkit import LoraConfig, get_peft_model
    from peftkit.train.loop import enable_checkpointing

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    enable_checkpointing(model)
    inner = model.get_base_model()
    assert inner.is_gradient_checkpointing and inner.config.use_cache is False
    model.train()
    probe = torch.randint(2, 100, (1, 4))
    assert not inner.get_input_embeddings()(probe).requires_grad  # backward stops at the lowest adapter
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trained_adapter_loads_in_hugging_face_peft(trained, model_dir):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.train.tools import load_with_adapter

    ours, _, _ = load_with_adapter(str(trained))
    theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(trained)).eval()
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        with ours.disable_adapter():  # the adapter is not a no-op, so the match above means something
            assert not torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("mode", ["4bit", "bf16"])
def test_quantize_trains_an_adapter_on_a_packed_base(mode, model_dir, datasets, tmp_path):
    if mode == "4bit":
        pytest.importorskip("bitsandbytes")
    assert train(model_dir, tmp_path, "--data", datasets["text"], "--max-steps", "2", "--quantize", mode) == 0
    b = [t for k, t in adapter_tensors(tmp_path / "adapter").items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "ln_tuning", "ia3", "loha", "lokr", "vera"])
def test_inspect_names_the_adapted_modules_for_every_method(method, tmp_path):
    """inspect asks each method which names begin its on-disk keys, instead of guessing from
    prefixes: bottleneck adapters and LN tuning name their modules, not adapter_down/ln_tuning_layers."""
    from conftest import tiny_llama
    from matrix import cell

    from peftkit import get_peft_model
    from peftkit.core.site import Site
    from peftkit.train.tools import describe

    base, cfg = tiny_llama(), cell(method, "llama").config()
    model = get_peft_model(base, cfg)
    model.save_pretrained(str(tmp_path))
    adapted = {p.rsplit(".", 1)[-1] for p, m in model.base_model.model.named_modules() if isinstance(m, Site)}
    info = describe(str(tmp_path))
    assert set(info["adapted_module_names"]) == adapted
    assert info["adapted_sites"] == sum(isinstance(m, Site) for m in model.modules())
