"""``LoraConfig(ensure_weight_tying=True)``: one adapter for an embedding and the head tied to it.

With ``tie_word_embeddings`` the output head's weight *is* the input embedding ``E`` (V x d).
Adapting one of them alone gives the two different weights while unmerged and one (changed) weight
once merged. Hugging Face PEFT's ``ensure_weight_tying`` makes the tied layers share one adapter:

- LoRA targets: the embedding holds ``A_e`` (r x V) and ``B_e`` (d x r), ``E' = E + s (B_e A_e)^T``;
  the head computes its logits from the same tensors::

      z = h E'^T = h E^T + s (h B_e) A_e          (h: ... x d, z: ... x V)

  so one merge of ``E`` is the merge of both (PEFT 0.21 adds the update once per layer, i.e. twice).
  PEFT's file also holds the head's copies ``lm_head.lora_A.weight = B_e^T`` and
  ``lm_head.lora_B.weight = A_e^T``; they are written, and accepted but not required on load.
- ``modules_to_save``: the head's output is ``h W_c^T (+ b)`` with ``W_c`` the embedding copy's
  trained weight; PEFT's file holds ``lm_head.weight`` (a copy of ``W_c``).

The config is rewritten as PEFT does (:func:`rewrite_for_tying`): the input embedding joins
``target_modules`` (or ``modules_to_save``) and the tied layers leave it, so the saved
``adapter_config.json`` is PEFT's.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError
from ...core.copies import ModuleCopy
from ...core.inject import attach
from ...core.method import Delta, UnsupportedSite
from ...core.site import Site
from ...core.tied import input_embedding_path, names_embedding, tied_paths, unwrap
from .delta import LoraEmbedding


def _without_tied(names: list, tied: list[str]) -> list:
    """``names`` minus, for each tied layer, the first entry that names it (PEFT's rule)."""
    names = list(names)
    for key in tied:
        for m in names:
            if re.match(rf"(^|.*\.){m}($|\..*)", key):
                names.remove(m)
                break
    return names


def tying(config, model: nn.Module) -> Optional[str]:
    """What ``ensure_weight_tying`` ties, by PEFT's rule: ``"copies"`` when ``modules_to_save``
    names ``embed_tokens``/``lm_head``, else ``"lora"`` when ``target_modules`` does (a regex must
    match the bare name), else None (also when the model ties nothing). The input embedding's own
    path counts as naming it (GPT-2's ``transformer.wte``; the path the rewrite adds, so a saved
    config ties again when loaded). Encoder-decoders whose tied layers include embeddings are refused."""
    tied = tied_paths(model) if getattr(config, "ensure_weight_tying", False) else []
    if not tied:
        return None
    kind = "copies" if names_embedding(config.modules_to_save, model) else \
        "lora" if names_embedding(config.target_modules, model) else None
    shared = [p for p in tied if isinstance(unwrap(model.get_submodule(p)), nn.Embedding)]
    if kind is not None and shared:
        raise ConfigError(
            f"ensure_weight_tying ties an output head to the input embedding, but in this model {shared} are "
            f"embeddings of their own that share {input_embedding_path(model)!r}'s weight (an encoder-decoder "
            "such as T5 or BART); their adapters cannot be tied (PEFT 0.21 fails there too). Leave "
            "ensure_weight_tying off; to train token rows, trainable_token_indices ties all of them.")
    return kind


def rewrite_for_tying(config, model: nn.Module):
    """The config PEFT uses with ``ensure_weight_tying``: the input embedding is targeted (or
    kept in full) in place of the layers tied to it. Unchanged when nothing is tied."""
    kind = tying(config, model)
    if kind is None:
        return config
    tied, emb = tied_paths(model), input_embedding_path(model)
    if kind == "copies":
        mts = list(config.modules_to_save)
        keep = mts + ([emb] if emb not in mts else [])
        return dataclasses.replace(config, modules_to_save=_without_tied(keep, tied))
    tm = config.target_modules
    if isinstance(tm, str):
        if tm.startswith("(?:") and tm.endswith(f"|^{re.escape(emb)}$)"):
            return config  # already PEFT's rewritten pattern (a loaded adapter): PEFT would nest it again
        return dataclasses.replace(config, target_modules=rf"(?:{tm}|^{re.escape(emb)}$)")
    return dataclasses.replace(config, target_modules=sorted(set(_without_tied(sorted(set(tm) | {emb}), tied))))


class TiedLoraHead(Delta):
    """The head's share of the embedding's LoRA: ``z = y + s (dropout(h) B_e) A_e`` (no tensors of its own)."""

    mergeable = True  # not ``lora_scaled``: its scale is the embedding adapter's, rescaled there

    def __init__(self, owner: LoraEmbedding, head: nn.Module):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise UnsupportedSite(f"ensure_weight_tying ties an nn.Linear output head, not {type(head).__name__}.")
        self.__dict__["_owner"] = owner  # a plain reference: the embedding's Site owns it

    @property
    def scaling(self) -> float:
        """The embedding adapter's scale (one adapter, one scale)."""
        return self._owner.scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self._owner.scaling = value

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        owner = self._owner
        a, b = owner.lora_embedding_A, owner.lora_embedding_B
        h = owner.dropout(x).to(b.dtype)
        return y + (h @ b @ a * owner.scaling).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``s (B_e A_e)^T``: the embedding's update (the head's weight is the embedding's)."""
        return self._owner.delta_weight(base)

    def merge(self, base: nn.Module) -> None:
        """Nothing to do: the head's weight is the embedding's, which the embedding's merge updates."""

    def unmerge(self, base: nn.Module) -> None:
        """Nothing to undo (see :meth:`merge`)."""


class TiedCopy(Delta):
    """A tied head's output from the embedding's ``modules_to_save`` copy: ``h W_c^T (+ b)``."""

    mergeable = True
    replaces_base = True

    def __init__(self, owner: ModuleCopy, head: nn.Module):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise UnsupportedSite(f"ensure_weight_tying ties an nn.Linear output head, not {type(head).__name__}.")
        self.__dict__["_owner"] = owner
        self.__dict__["_head"] = head
        self._saved: Optional[nn.Parameter] = None

    def replace(self, x, *args, **kwargs):
        """The head's logits with the trained copy's weight."""
        return F.linear(x, self._owner.module.weight, self._head.bias)

    def forward(self, x, y, base):  # not used by the Site (replaces_base), kept for direct calls
        return self.replace(x)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {}  # the copy is the embedding's; its file key is a tied copy (see the method)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """The head takes the trained weight as a tensor of its own (the original stays the
        embedding's while it is merged; see core/copies.py)."""
        self._saved = base.weight
        w = self._owner.module.weight.detach().clone().to(device=base.weight.device, dtype=base.weight.dtype)
        base._parameters["weight"] = nn.Parameter(w, requires_grad=self._saved.requires_grad)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Give the head back its original weight."""
        if self._saved is not None:
            base._parameters["weight"] = self._saved
            self._saved = None


def tie_adapters(host, config, adapter_name: str) -> None:
    """After the adapter's sites exist: give every layer tied to the input embedding the
    embedding's LoRA (or its ``modules_to_save`` copy)."""
    if tying(config, host.model) is None:
        return
    model = host.model
    site = model.get_submodule(input_embedding_path(model))
    owner = site.deltas._modules.get(adapter_name) if isinstance(site, Site) else None
    if isinstance(owner, LoraEmbedding):
        if owner.magnitude is not None or owner.lora_B_bias is not None:
            raise UnsupportedSite("ensure_weight_tying ties plain LoRA on the embedding (not DoRA or lora_bias).")
        make = TiedLoraHead
    elif isinstance(owner, ModuleCopy):
        make = TiedCopy
    else:
        return
    for path in tied_paths(model):
        attach(model, path, adapter_name, make(owner, unwrap(model.get_submodule(path))))


def tied_file_copies(host, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tied heads' tensors PEFT writes (copies of the embedding adapter's), by key under the model."""
    out = {}
    for path, site in ((p, host.model.get_submodule(p)) for p in tied_paths(host.model)):
        delta = site.deltas._modules.get(adapter_name) if isinstance(site, Site) else None
        if isinstance(delta, TiedLoraHead):
            out[f"{path}.lora_A.weight"] = delta._owner.lora_embedding_B.t()
            out[f"{path}.lora_B.weight"] = delta._owner.lora_embedding_A.t()
        elif isinstance(delta, TiedCopy):
            out[f"{path}.weight"] = delta._owner.module.weight
    return out
