"""FSDP2 and DDP with 2 CPU processes (gloo): same losses and adapter as one process on the whole
batch, and the adapter saved once from rank 0 is complete."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH, SEQ = 3, 4, 8
MODES = ("fsdp", "ddp")


def _model():
    from conftest import tiny_llama

    from peftkit import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return pm


def _batch():
    g = torch.Generator().manual_seed(9)
    return torch.randint(2, 128, (BATCH, SEQ), generator=g)


def _train(model, ids, params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _worker(rank, world, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from peftkit.dist import init_distributed

    init_distributed("gloo")
    try:
        for mode in MODES:
            _run(rank, world, mode, out_dir)
    finally:
        dist.destroy_process_group()


def _run(rank, world, mode, out_dir):
    from peftkit.dist import gather_adapter_state, save_adapter, shard_model, unwrap, wrap_ddp

    pm = _model()
    ids = _batch().chunk(world)[rank]
    if mode == "fsdp":
        model = shard_model(pm)
    else:
        model = wrap_ddp(pm)
    losses = _train(model, ids, [p for p in model.parameters() if p.requires_grad])
    loss = torch.stack(losses)
    dist.all_reduce(loss)  # mean over ranks = the full-batch mean (equal tokens per rank)
    if mode == "fsdp":
        save_adapter(model, os.path.join(out_dir, mode))
        state = gather_adapter_state(model)
    else:
        state = unwrap(model).get_adapter_state_dict("default")
        if rank == 0:
            unwrap(model).save_pretrained(os.path.join(out_dir, mode))
    if rank == 0:
        torch.save({"loss": loss / world, "state": {k: v.detach().clone() for k, v in state.items()}},
                   os.path.join(out_dir, f"{mode}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One 2-process run (both modes in turn) shared by the tests: process start-up dominates."""
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(mode, two_process_run):
    from peftkit.io.checkpoint import load_tensors

    tmp_path = two_process_run
    got = torch.load(os.path.join(tmp_path, f"{mode}.pt"), weights_only=True)
    pm = _model()
    ref_loss = torch.stack(_train(pm, _batch(), [p for p in pm.parameters() if p.requires_grad]))
    ref = pm.get_adapter_state_dict("default")
    assert torch.allclose(got["loss"], ref_loss, atol=1e-5), (got["loss"], ref_loss)
    saved = load_tensors(os.path.join(tmp_path, mode))
    assert set(saved) == set(ref) and len(ref) == 12
    for k, v in ref.items():
        assert saved[k].shape == v.shape
        assert torch.allclose(got["state"][k], v, atol=1e-5), k
        assert torch.equal(saved[k], got["state"][k]), k
