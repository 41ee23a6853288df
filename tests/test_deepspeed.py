"""``peftkit train --deepspeed`` with ZeRO-2 and ZeRO-3: 2 CPU processes (gloo) under torchrun.

Each run must end with a complete adapter (every tensor present and non-empty, which a plain save
under ZeRO-3 is not), equal to a single-process run on the same global batches, loadable, with
a finite, falling loss; the checkpoint folder shows which stage really ran, and a ZeRO-3 run
resumed from a checkpoint ends where the uninterrupted one did. Skipped when deepspeed is not
installed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
pytest.importorskip("deepspeed")

from peftkit.cli import main  # noqa: E402
from peftkit.config import ConfigError  # noqa: E402
from peftkit.train import task as T  # noqa: E402
from test_train_data import tiny_chat_model, write_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 examples, 2 epochs: 2 per rank per step (global batch 4) -> 12 optimizer steps
RUN = ["--epochs", "2", "--threads", "1", "--log-every", "1", "--lr", "2e-2", "--save-every", "5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny chat model, a completion data set, and the single-process reference run."""
    d = tmp_path_factory.mktemp("ds")
    model = tiny_chat_model(str(d / "model"))
    train, _ = T.generate(24, 0, seed=5)
    data = write_jsonl(d / "data.jsonl", [{"prompt": r["messages"][1]["content"] + "\n",
                                           "completion": r["messages"][2]["content"]} for r in train])
    ref = d / "single"
    assert main(["train", "--model", model, "--data", str(data), "-o", str(ref), "--batch-size", "4", *RUN]) == 0
    return {"dir": d, "model": model, "data": str(data), "ref": ref}


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["log_history"] if "loss" in h]


def _launch(setup, out, cfg, *extra) -> None:
    """``peftkit train --deepspeed cfg`` in 2 processes under torchrun (2 examples per rank per step)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "peftkit.cli",
           "train", "--model", setup["model"], "--data", setup["data"], "-o", str(out), "--batch-size", "2",
           "--deepspeed", str(cfg), *RUN, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_save_the_full_adapter(setup, stage):
    d = setup["dir"]
    cfg = d / f"zero{stage}.json"
    zero = {"stage": stage}
    if stage == 3:  # ZeRO-3 keeps parameters under 1e5 elements whole by default: partition every one
        zero["stage3_param_persistence_threshold"] = 0
    cfg.write_text(json.dumps({"zero_optimization": zero}))
    out = d / f"zero{stage}"
    _launch(setup, out, cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_agree"] and metrics["steps"] == 12

    # DeepSpeed really ran, at this stage: ZeRO-3 checkpoints hold one model-state shard per rank
    step_dir = out / "checkpoints" / "checkpoint-12" / "global_step12"
    shards = sorted(p.name for p in step_dir.iterdir() if "model_states" in p.name)
    assert shards == (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
                      if stage == 3 else ["mp_rank_00_model_states.pt"])

    saved, ref = _tensors(out / "adapter"), _tensors(setup["ref"] / "adapter")
    assert set(saved) == set(ref) and len(ref) > 0
    for k, v in ref.items():
        assert saved[k].shape == v.shape and saved[k].numel() > 0, k
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-6, msg=k)
    mid = _tensors(out / "checkpoints" / "checkpoint-10")  # a save during training, gathered too
    assert set(mid) == set(ref) and all(t.numel() > 0 for t in mid.values())
    assert not all(torch.equal(mid[k], saved[k]) for k in saved)  # two more steps changed it

    losses, ref_losses = _losses(metrics), _losses(json.loads((setup["ref"] / "metrics.json").read_text()))
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses
    assert losses == pytest.approx(ref_losses, rel=1e-5)

    from peftkit.train.command import adapter_digest
    from peftkit.train.tools import load_with_adapter

    loaded = load_with_adapter(str(out / "adapter"))[0]
    assert adapter_digest(loaded) == metrics["rank_digests"][0]  # = the parameters the engine ended with

    if stage == 3:  # resuming from DeepSpeed's partitioned checkpoint continues the same run
        _launch(setup, d / "resumed", cfg, "--resume", str(out / "checkpoints" / "checkpoint-10"))
        resumed = _tensors(d / "resumed" / "adapter")
        for k, v in saved.items():
            torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_config_is_completed_and_cpu_traps_are_refused(tmp_path):
    from peftkit.dist.deepspeed import load_config

    cfg = load_config({"zero_optimization": {"stage": 3}})
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_clipping"] == "auto"
    if not torch.cuda.is_available():
        assert cfg["zero_force_ds_cpu_optimizer"] is False
        import deepspeed.ops

        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # no JIT build at comm init
        with pytest.raises(ConfigError, match="offload"):
            load_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
        with pytest.raises(ConfigError, match="torch_adam"):
            load_config({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
        load_config({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    with pytest.raises(ConfigError, match="stage must be"):
        load_config({"zero_optimization": {"stage": 4}})
    with pytest.raises(ConfigError, match="must be an object"):
        load_config({"zero_optimization": 3})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{zero: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))
