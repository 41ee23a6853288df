"""transformers' Trainer with a peftkit model after ``peftkit.integrations.enable()`` (tiny Llama).

The user code is the Trainer tutorial's: default ``TrainingArguments`` (columns removed by the
forward signature), a tokenizer as ``processing_class``, ``save_model``, ``evaluate``,
``resume_from_checkpoint``. The base model ties its embeddings like SmolLM2, which is what made a
whole-model save fail.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import VOCAB, tiny_llama

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_tokenizer():
    """A word-level fast tokenizer over this file's made-up words (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def texts(n: int = 24, seed: int = 0) -> list[str]:
    """``n`` short made-up sentences with a pattern worth learning (each word follows its index)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, length = int(torch.randint(0, len(WORDS) - 12, (1,), generator=g)), int(torch.randint(5, 11, (1,), generator=g))
        out.append(" ".join(WORDS[start:start + length]))
    return out


def lm_dataset(tokenizer, n: int = 24, seed: int = 0):
    """A ``datasets.Dataset`` as the tutorials build it: tokenised text plus an unused text column."""
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts(n, seed)})
    return ds.map(lambda b: tokenizer(b["text"]), batched=True)  # keeps "text": the model must not see it


@pytest.fixture(autouse=True)
def integration():
    import peftkit.integrations

    peftkit.integrations.enable()
    yield
    peftkit.integrations.disable()


def lora_model(seed: int = 0, **kw):
    from peftkit import LoraConfig, get_peft_model

    base = tiny_llama(tie_word_embeddings=True)
    base.train()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM", **kw))


def trainer_for(model, out, tokenizer, max_steps=6, **kw):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             save_strategy="steps", save_steps=3, dataloader_num_workers=0,
                             disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), eval_dataset=lm_dataset(tokenizer, 8, 1),
                   processing_class=tokenizer,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def adapter_tensors(model) -> dict:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}


def test_default_arguments_train_evaluate_and_save_the_adapter_only(tmp_path):
    from safetensors.torch import load_file

    tok = tiny_tokenizer()
    model = lora_model()
    before = adapter_tensors(model)
    trainer = trainer_for(model, tmp_path / "run", tok)  # remove_unused_columns=True, label_names=None
    assert trainer.label_names == ["labels"]  # from the base class: eval computes the loss
    result = trainer.train()
    assert result.training_loss > 0
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(model).items())  # it trained
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0

    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_args.bin"} <= files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files  # not the base model
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved.keys() == model.get_adapter_state_dict().keys()
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = lora_model()
    trainer = trainer_for(model, tmp_path / "run", tok, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    x = tok(texts(2, 5), return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        ours = model(**x).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path / "final"))(**x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_checkpoint_holds_adapter_and_optimizer_and_resume_is_exact(tmp_path):
    tok = tiny_tokenizer()
    full_model = lora_model()
    full = trainer_for(full_model, tmp_path / "full", tok)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert any(f.startswith("rng_state") for f in files)
    assert "model.safetensors" not in files

    # a new process after an interruption at step 3: fresh model (other random init), same script
    resumed_model = lora_model(seed=123)
    resumed = trainer_for(resumed_model, tmp_path / "resumed", tok)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    for k, v in adapter_tensors(full_model).items():
        torch.testing.assert_close(adapter_tensors(resumed_model)[k], v, atol=0, rtol=0)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 3]  # noqa: E731
    assert losses(resumed) == losses(full) and len(losses(full)) == 3


def test_resume_from_a_folder_without_an_adapter_says_so(tmp_path):
    tok = tiny_tokenizer()
    trainer = trainer_for(lora_model(), tmp_path / "run", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    tok = tiny_tokenizer()
    plain_model, ckpt_model = lora_model(), lora_model()
    trainer_for(plain_model, tmp_path / "plain", tok, max_steps=3).train()
    gc = trainer_for(ckpt_model, tmp_path / "gc", tok, max_steps=3, gradient_checkpointing=True)
    gc.train()
    assert ckpt_model.get_base_model().is_gradient_checkpointing
    for k, v in adapter_tensors(plain_model).items():
        torch.testing.assert_close(adapter_tensors(ckpt_model)[k], v, atol=1e-6, rtol=1e-5)


def test_load_best_model_at_end_reads_the_best_adapter(tmp_path):
    tok = tiny_tokenizer()
    model = lora_model()
    trainer = trainer_for(model, tmp_path / "run", tok, eval_strategy="steps", eval_steps=3,
                          load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    from peftkit import load_peft_weights

    for k, v in load_peft_weights(best, device="cpu").items():
        torch.testing.assert_close(model.get_adapter_state_dict()[k], v, atol=0, rtol=0)


def test_several_adapters_are_saved_and_resumed(tmp_path):
    from peftkit import LoraConfig

    tok = tiny_tokenizer()
    model = lora_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    trainer = trainer_for(model, tmp_path / "run", tok, max_steps=3)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "other" / "adapter_model.safetensors").is_file()
    again = lora_model(seed=5)
    again.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    from peftkit.integrations.transformers import load_adapters

    load_adapters(again, str(ckpt))
    for name in ("default", "other"):
        for k, v in model.get_adapter_state_dict(name).items():
            torch.testing.assert_close(again.get_adapter_state_dict(name)[k], v, atol=0, rtol=0)


def test_other_models_and_disable_are_untouched(tmp_path):
    import peftkit.integrations
    from transformers import Trainer

    from peftkit.integrations import transformers as integ

    tok = tiny_tokenizer()
    base = tiny_llama()
    trainer = trainer_for(base, tmp_path / "plain", tok, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "plain-final"))
    assert os.path.isfile(tmp_path / "plain-final" / "model.safetensors")  # a plain model: Trainer's own save
    patched = Trainer._save
    peftkit.integrations.enable()  # twice: still one layer of patching
    assert Trainer._save is patched
    peftkit.integrations.disable()
    assert not integ.enabled() and Trainer._save is not patched and "peftkit" not in Trainer._save.__module__


DDP_SCRIPT = r'''
import hashlib, json, os, sys
import torch
import peftkit.integrations
from test_integrations_transformers import adapter_tensors, lora_model, tiny_tokenizer, trainer_for

peftkit.integrations.enable()
out = sys.argv[1]
model = lora_model()
trainer = trainer_for(model, out, tiny_tokenizer())  # 6 steps, a checkpoint every 3
trainer.train(resume_from_checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
trainer.save_model(os.path.join(out, "final"))
h = hashlib.sha256()
for k, v in sorted(adapter_tensors(model).items()):
    h.update(k.encode() + v.numpy().tobytes())
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"digest": h.hexdigest(), "world": int(os.environ.get("WORLD_SIZE", 1)),
               "steps": trainer.state.global_step}, f)
if torch.distributed.is_initialized():  # close gloo before exit: its threads can abort at teardown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def _launch(launcher, tmp_path, out, *extra):
    """Run DDP_SCRIPT in 2 processes (gloo on CPU) and return each rank's record."""
    import subprocess
    import sys

    script = tmp_path / "train_script.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # accelerate's multi-process launcher; with no GPU visible it runs on the CPU (gloo)
        port = str(29500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run(cmd + [str(script), str(out), *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_save_and_resume(tmp_path, launcher):
    out = tmp_path / "run"
    ranks = _launch(launcher, tmp_path, out)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept them equal
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out / "final"))
    assert "model.safetensors" not in os.listdir(out / "final")
    assert {"optimizer.pt", "adapter_model.safetensors"} <= set(os.listdir(out / "checkpoint-3"))
    again = _launch(launcher, tmp_path, tmp_path / "resumed", str(out / "checkpoint-3"))
    assert [r["steps"] for r in again] == [6, 6]
    assert again[0]["digest"] == ranks[0]["digest"]  # resumed under DDP: the same adapter as uninterrupted
