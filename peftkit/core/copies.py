"""Full trainable copies of whole modules (``modules_to_save``), as a Delta.

A classification head that is new for the task (``score``, ``classifier``) must be trained in
full; Hugging Face PEFT calls these ``modules_to_save``. Here a copy is a Delta whose output
replaces the base module's, so the Site's active/merge/mixed-batch logic covers it unchanged.
Merging copies the trained weights into the base module (and unmerging restores them).
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
        self._saved: dict[str, torch.Tensor] = {}

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
        self._saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.module.state_dict())

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.load_state_dict(self._saved)
        self._saved = {}
