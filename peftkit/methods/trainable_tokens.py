"""Trainable tokens: train only some rows of the embedding (new or retrained tokens).

Hugging Face PEFT's ``TrainableTokensConfig`` (and ``LoraConfig(trainable_token_indices=...)``):
after adding tokens (a chat template's special tokens) only their embedding rows need training,
not the whole ``V x d`` matrix. For token ids ``I = [i_1 .. i_k]`` the adapter holds ``D`` (k x d),
initialised to ``E[I]``, and the embedding becomes::

    E'[t] = D[j]  if t = i_j,   E[t] otherwise                (E: V x d, D: k x d)

    ids (B, T) ──► E[ids] (B, T, d) ──rows whose id is in I──► D[j] (one select, no V x d copy)

With tied weights (``tie_word_embeddings``: the output head's weight *is* ``E``), the head
follows: logits for the ids in ``I`` use ``D``, ``z[..., i_j] = h . D[j]`` (+ bias), from the same
tensor ``D``. Merging writes ``D`` into ``E[I]``; unmerging restores the rows it replaced.

File format (PEFT 0.21): ``<embedding path>.trainable_tokens_delta`` for the method of its own,
plus the tied head's ``lm_head.trainable_tokens_delta`` (a copy of the same ``D``); alongside LoRA,
``<embedding path>.token_adapter.trainable_tokens_delta`` (tied heads are not saved).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.inject import attach, detach, iter_candidates
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ..core.site import Site
from ..core.tied import input_embedding_path, tied_paths, unwrap
from ._shared import adapter_dtype, embed_scale


def check_token_indices(value, where: str):
    """A list of distinct non-negative token ids, or a dict module name -> such a list."""
    def one(ids, label):
        if isinstance(ids, (tuple, set)):
            ids = sorted(ids) if isinstance(ids, set) else list(ids)
        if not isinstance(ids, list) or not ids:
            raise ConfigError(f"{label} must be a non-empty list of token ids, got {ids!r}.")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ConfigError(f"{label}: token ids are non-negative integers (from tokenizer(...).input_ids), "
                                  f"got {i!r}.")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ConfigError(f"{label} lists token ids {dup} more than once; list each id once.")
        return list(ids)

    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where} is an empty dict; map embedding module names to token id lists.")
        return {str(k): one(v, f"{where}[{k!r}]") for k, v in value.items()}
    return one(value, where)


@dataclasses.dataclass
class TrainableTokensConfig(PeftConfig):
    """Train the embedding rows of ``token_indices`` only (PEFT's ``TrainableTokensConfig``).

    Args:
        token_indices: the token ids whose rows train (e.g. the ids of newly added tokens).
        target_modules: the embedding layer(s); None picks ``model.get_input_embeddings()``.
        init_weights: True starts from the current rows (the model is unchanged); False random.
    """

    token_indices: list = dataclasses.field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.TRAINABLE_TOKENS.value
        super().__post_init__()
        self.token_indices = check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


class TokenRows(Delta):
    """Replacement rows ``D`` (k x d) for the token ids ``index`` of an embedding (or tied head)."""

    mergeable = True
    accumulates = True  # forward_into writes a tied head's k columns in place
    peft_names = {"rows": "trainable_tokens_delta"}

    def __init__(self, base: nn.Module, ids: list[int], init_weights: bool = True,
                 owner: Optional["TokenRows"] = None):
        super().__init__()
        weight = base.weight
        vocab = weight.shape[0]
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this layer's {vocab} rows; resize the embeddings "
                             "(model.resize_token_embeddings(len(tokenizer))) before adding the adapter.")
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise UnsupportedSite(f"trainable tokens adapt nn.Embedding (or a tied nn.Linear head), not {type(base).__name__}.")
        #: the Delta whose rows this one uses (a tied head), kept out of the module tree
        self._owner = [owner] if owner is not None else []
        self.register_buffer("index", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        #: the rows the weight had before a merge wrote ``D`` into them (None: not merged)
        self._saved: Optional[torch.Tensor] = None
        if owner is None:
            with torch.no_grad():
                original = weight.detach()[self.index]
            dtype = adapter_dtype(base)
            start = original if init_weights else torch.randn(original.shape, dtype=original.dtype, device=original.device)
            self.rows = nn.Parameter(start.to(dtype).clone())
        if isinstance(base, nn.Embedding):
            lookup = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
            lookup[self.index] = torch.arange(len(ids), device=weight.device)
            self.register_buffer("lookup", lookup, persistent=False)

    def weight_rows(self) -> torch.Tensor:
        """``D``: this Delta's rows, or its owner's when it is a tied head."""
        return self._owner[0].rows if self._owner else self.rows

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        d = self.weight_rows()
        if isinstance(base, nn.Embedding):
            pos = self.lookup[x]
            hit = (pos >= 0).unsqueeze(-1)
            rows = F.embedding(pos.clamp_min(0), d)
            scale = embed_scale(base)  # Gemma/BART-style scaled embeddings
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            return torch.where(hit, rows.to(y.dtype), y)
        return y.index_copy(y.dim() - 1, self.index, self._head_columns(x, d, base).to(y.dtype))

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """As :meth:`forward`; at a tied head the k logit columns are written into ``y`` (which the
        Site owns: no hook saw it, autograd does not keep it), with no copy of the V-wide logits."""
        if isinstance(base, nn.Embedding):
            return self.forward(x, y, base)
        return y.index_copy_(y.dim() - 1, self.index, self._head_columns(x, self.weight_rows(), base).to(y.dtype))

    def _head_columns(self, x: torch.Tensor, d: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The tied head's logits of the k ids, ``h D^T (+ b[I])``."""
        cols = F.linear(x.to(d.dtype), d)
        if base.bias is not None:
            cols = cols + base.bias[self.index].to(cols.dtype)
        return cols

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``E' - E``: the new rows minus the current ones, zero elsewhere."""
        w = base.weight
        out = torch.zeros_like(w)
        out[self.index] = self.weight_rows().detach().to(w.dtype) - w.detach()[self.index]
        return out

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Write ``D`` into the rows, keeping the rows it replaces. A tied embedding and head share
        one weight and one record (the owner's), so the second of them to merge changes nothing."""
        keeper = self._owner[0] if self._owner else self
        w = base.weight
        if keeper._saved is None:
            keeper._saved = w.detach()[self.index].clone()
        w.data.index_copy_(0, self.index, self.weight_rows().detach().to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Put back the rows the weight had before :meth:`merge` (once for tied layers)."""
        keeper = self._owner[0] if self._owner else self
        if keeper._saved is not None:
            base.weight.data.index_copy_(0, self.index, keeper._saved.to(base.weight.device, base.weight.dtype))
            keeper._saved = None


class WrappedTokenRows(TokenRows):
    """:class:`TokenRows` added by ``LoraConfig.trainable_token_indices`` (PEFT's ``token_adapter`` keys)."""

    peft_names = {"rows": "token_adapter.trainable_tokens_delta"}


# ----- where the rows go ---------------------------------------------------------------------
def _find_all(model: nn.Module, name: str) -> list[str]:
    """Every module path equal to ``name`` or ending in ``.name``, as PEFT's ``trainable_token_indices``
    dict keys match (T5's ``embed_tokens`` names both the encoder's and the decoder's)."""
    hits = [p for p, _ in iter_candidates(model) if p == name or p.endswith("." + name)]
    if not hits:
        raise ValueError(f"trainable_token_indices names {name!r}, but the model has no such module; "
                         f"its input embedding is {input_embedding_path(model)!r}.")
    return hits


def _tie(host, adapter_name: str, owner_path: str, cls) -> list[str]:
    """Put tied Deltas (sharing the owner's rows) on every module tied to the input embedding
    (:func:`tied_paths`); the paths that got one. Nothing is tied unless the owner, at
    ``owner_path``, is the input embedding and holds rows of this adapter."""
    model = host.model
    if owner_path != input_embedding_path(model):
        return []
    owner_site = model.get_submodule(owner_path)
    owner = owner_site.deltas._modules.get(adapter_name) if isinstance(owner_site, Site) else None
    if not isinstance(owner, TokenRows) or owner._owner:
        return []
    done = []
    for path in tied_paths(model):
        current = model.get_submodule(path)
        if isinstance(current, Site) and adapter_name in current.deltas:
            current.remove(adapter_name)  # explicitly targeted too: it becomes the tied version
        attach(model, path, adapter_name, cls(unwrap(current), owner.index.tolist(), owner=owner))
        done.append(path)
    return done


def attach_token_rows(host, config, adapter_name: str) -> None:
    """``LoraConfig.trainable_token_indices``: add the rows at their embeddings (and tied layers).

    As PEFT: a dict key names every module ending in it; the tied layers (:func:`tied_paths`)
    follow the input embedding's rows unless the config lists one of them with other ids. Their
    parameters train with the adapter (listed in the host's ``trainable_base``). Called by the
    LoRA method after its own sites exist; on error nothing of this is left behind.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return
    model = host.model
    emb = input_embedding_path(model)
    targets = dict(spec) if isinstance(spec, dict) else {emb: spec}
    paths = {name: _find_all(model, name) for name in targets}
    tied = set(tied_paths(model))
    in_group = [n for n, ps in paths.items() if any(p in tied or p == emb for p in ps)]
    tie = any(emb in paths[n] for n in in_group)
    ensure = getattr(config, "ensure_weight_tying", False)
    if len(in_group) > 1 and len({tuple(targets[n]) for n in in_group}) > 1:
        if ensure:
            listed = ", ".join(f"{n}: {targets[n]}" for n in in_group)
            raise ValueError(f"Cannot ensure weight tying when different token indices are specified for tied "
                             f"layers. Conflicting layers: {listed}. Please use the same indices for all tied "
                             "layers or set ensure_weight_tying=False.")
        tie = False  # tied layers listed with other ids: each keeps its own rows, as in PEFT
    if ensure and not tied:
        import warnings

        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.", UserWarning, stacklevel=5)
    if tie:  # listed tied layers become tied versions of the embedding's rows
        paths = {n: [p for p in ps if p not in tied] for n, ps in paths.items()}
    for name, ps in paths.items():
        for path in ps:
            site = model.get_submodule(path)
            if isinstance(site, Site) and site.deltas._modules.get(adapter_name) is not None:
                raise ConfigError(
                    f"The embedding layer is already marked to be trained fully, either specify `modules_to_save=[..., "
                    f"\"{name}\", ...]` or `trainable_tokens={{'{name}': x}}` but not both. ({path!r} is in "
                    "modules_to_save, so its rows train in full already; peftkit refuses the pair, where PEFT 0.21 "
                    "nests the rows on top of the copy.)")
    done = []
    try:
        for name, ps in paths.items():
            for path in ps:
                base = unwrap(model.get_submodule(path))
                attach(model, path, adapter_name, WrappedTokenRows(base, targets[name]))
                done.append(path)
        if tie:
            done += _tie(host, adapter_name, emb, WrappedTokenRows)
    except BaseException:
        for path in done:
            detach(model, path, adapter_name)
        raise
    host.trainable_base.setdefault(adapter_name, set()).update(
        f"{p}.deltas.{adapter_name}.rows" for p in done if hasattr(model.get_submodule(p).deltas[adapter_name], "rows"))


@register_method
class TrainableTokensMethod(Method):
    """PEFT's TRAINABLE_TOKENS: only the listed embedding rows train."""

    name = "TRAINABLE_TOKENS"
    config_cls = TrainableTokensConfig

    def prepare(self, config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
        if config.target_modules is None:
            return dataclasses.replace(config, target_modules=input_embedding_path(model))
        return config

    def supported_sites(self):
        return ["nn.Embedding", "nn.Linear (an output head tied to the embedding)"]

    def make_delta(self, config: TrainableTokensConfig, path: str, module: nn.Module, adapter_name: str):
        return TokenRows(module, config.token_indices, init_weights=config.init_weights)

    def after_inject(self, host, config, adapter_name: str) -> None:
        _tie(host, adapter_name, input_embedding_path(host.model), TokenRows)

    def tied_copies(self, host, config, adapter_name):
        """The tied layers' copies of ``D``, which PEFT writes for this method."""
        out = {}
        for path in tied_paths(host.model):
            site = host.model.get_submodule(path)
            delta = site.deltas._modules.get(adapter_name) if isinstance(site, Site) else None
            if isinstance(delta, TokenRows) and delta._owner:
                out[f"{path}.trainable_tokens_delta"] = delta.weight_rows()
        return out
