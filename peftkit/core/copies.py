"""Full trainable copies of whole modules (``modules_to_save``), as a Delta.

A classification head that is new for the task (``score``, ``classifier``) must be trained in
full; Hugging Face PEFT calls these ``modules_to_save``. Here a copy is a Delta whose output
replaces the base module's, so the Site's active/merge/mixed-batch logic covers it unchanged.
Merging gives the base module the trained tensors as tensors of its own, and unmerging gives it
back its originals. Its original tensors are never written: a module that shares one with it
(an output head tied to a copied ``embed_tokens``) keeps the weights it had, as it does while the
copy runs unmerged, so merging changes no output (and ``merge_and_unload`` unties them, as PEFT's).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .method import Delta


class ModuleCopy(Delta):
    """A trainable deep copy of the base module that stands in for it when active."""

    mergeable = True
    replaces_base = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base)
        self._saved: list = []  # (module, "_parameters" or "_buffers", name, original tensor) while merged

    def replace(self, *args, **kwargs):
        """The copy's output for the site's input (called as the base module was)."""
        return self.module(*args, **kwargs)

    def forward(self, x, y, base):  # not used by Site (replaces_base), kept for direct calls
        return self.module(x)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Saved under the module's own parameter names, as Hugging Face PEFT does."""
        return dict(self.module.state_dict())

    def local_name(self, peft_suffix: str) -> str:
        return "module." + peft_suffix

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Swap the copy's values in as new tensors of ``base`` (see the module docstring)."""
        trained = dict(self.module.named_modules())
        saved = []
        for name, sub in base.named_modules():
            twin = trained[name]
            for store in ("_parameters", "_buffers"):
                for key, old in list(getattr(sub, store).items()):
                    value = getattr(twin, store).get(key)
                    if old is None or value is None:
                        continue
                    saved.append((sub, store, key, old))
                    new = value.detach().clone().to(device=old.device, dtype=old.dtype)
                    getattr(sub, store)[key] = nn.Parameter(new, requires_grad=old.requires_grad) if store == "_parameters" else new
        self._saved = saved

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Give ``base`` back the tensors it had before :meth:`merge`."""
        for sub, store, key, old in self._saved:
            getattr(sub, store)[key] = old
        self._saved = []
