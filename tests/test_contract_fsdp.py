"""get/set_peft_model_state_dict on a model sharded by FSDP2 (``fully_shard``), as PEFT behaves:
one gloo process on the CPU, peft and peftkit side by side on the same model."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("peft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import peft
    import peftkit
    from peftkit.dist.fsdp import gather_adapter_state

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.v(self.q(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (1,))
        report = {}
        for lib in (peft, peftkit):
            torch.manual_seed(0)
            model = lib.get_peft_model(Net(), lib.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
            plain = {k: v.clone() for k, v in lib.get_peft_model_state_dict(model).items()}
            for block in model.base_model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            got = lib.get_peft_model_state_dict(model)
            kinds = sorted({type(v).__name__ for v in got.values()})
            same = all(torch.equal(got[k].full_tensor(), plain[k]) for k in plain)
            new = {k: torch.full_like(v, 0.5) for k, v in plain.items()}  # plain tensors into sharded params
            result = lib.set_peft_model_state_dict(model, new)
            after = lib.get_peft_model_state_dict(model)
            loaded = all(torch.equal(after[k].full_tensor(), new[k]) for k in new)
            from_sd = lib.get_peft_model_state_dict(model, state_dict=model.state_dict())
            full_sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
            folder = os.path.join(os.path.dirname(out), lib.__name__)
            model.save_pretrained(folder, state_dict=full_sd)  # accelerate's way: a gathered state dict
            from safetensors.torch import load_file

            written = load_file(os.path.join(folder, "adapter_model.safetensors"))
            report[lib.__name__] = dict(keys=sorted(got), kinds=kinds, same=same, loaded=loaded,
                                        unexpected=list(result.unexpected_keys), from_sd=sorted(from_sd),
                                        written=sorted(written),
                                        written_ok=all(torch.equal(written[k], new[k]) for k in new))
            if lib is peftkit:
                full = gather_adapter_state(model)
                report["gathered"] = all(torch.equal(full[k], new[k]) and type(full[k]) is torch.Tensor for k in new)
        torch.save(report, out)
    finally:
        dist.destroy_process_group()


def test_state_dicts_of_an_fsdp2_model_behave_as_in_peft(tmp_path):
    out = str(tmp_path / "report.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=1, join=True)
    report = torch.load(out)
    ours, theirs = report["peftkit"], report["peft"]
    assert ours == theirs
    assert ours["kinds"] == ["DTensor"] and ours["same"] and ours["loaded"] and ours["unexpected"] == []
    assert ours["written_ok"] and ours["written"] == ours["keys"]
    assert report["gathered"]
