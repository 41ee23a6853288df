"""TRL's SFTTrainer with peftkit (tiny Llama, tiny tokenizer) after ``peftkit.integrations.enable()``.

The user code is the SFTTrainer tutorial's: a text dataset, ``SFTConfig``, ``SFTTrainer(model=...,
peft_config=...)``, ``train()``, ``save_model()``, ``resume_from_checkpoint``.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_llama
from test_integrations_transformers import adapter_tensors, texts, tiny_tokenizer

trl = pytest.importorskip("trl")


@pytest.fixture(autouse=True)
def integration():
    import peftkit.integrations

    peftkit.integrations.enable()
    yield
    peftkit.integrations.disable()


def sft(model, out, peft_config=None, max_steps=4, **kw):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, save_steps=2, report_to="none", use_cpu=True, seed=0, max_length=32,
                     dataloader_num_workers=0, disable_tqdm=True, **kw)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts(24)}),
                      processing_class=tiny_tokenizer(), peft_config=peft_config)


def config():
    from peftkit import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def test_sft_trainer_trains_and_saves_a_peftkit_model(tmp_path):
    from peftkit import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(tie_word_embeddings=True).train(), config())
    before = adapter_tensors(model)
    trainer = sft(model, tmp_path / "run")
    trainer.train()  # the fused LM head sits on the base model: the first step used to fail here
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(model).items())
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


def test_sft_trainer_takes_a_peftkit_config_and_resumes_exactly(tmp_path):
    from peftkit import PeftModel

    torch.manual_seed(0)
    full = sft(tiny_llama(tie_word_embeddings=True).train(), tmp_path / "full", peft_config=config())
    assert isinstance(full.model, PeftModel)
    trainable = [n for n, p in full.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    full.train()
    torch.manual_seed(7)  # another init: the checkpoint must bring everything back
    resumed = sft(tiny_llama(tie_word_embeddings=True).train(), tmp_path / "resumed", peft_config=config())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for k, v in adapter_tensors(full.model).items():
        torch.testing.assert_close(adapter_tensors(resumed.model)[k], v, atol=0, rtol=0)


def test_sft_trainer_with_a_model_name_and_peftkit_config_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="Load it first and pass the model object"):
        sft("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "run", peft_config=config())


def test_sft_trainer_refuses_a_peftkit_model_plus_a_config(tmp_path):
    from peftkit import get_peft_model

    with pytest.raises(ValueError, match="pass one of them"):
        sft(get_peft_model(tiny_llama(), config()), tmp_path / "run", peft_config=config())
