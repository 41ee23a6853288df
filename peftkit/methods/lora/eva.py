"""EVA: LoRA's ``A`` from the principal directions of each layer's inputs (``init_lora_weights="eva"``).

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv:2410.07170. For a layer with inputs ``X`` (tokens x in), the right singular
vectors ``V`` of the centred ``X`` are the directions of most input variance. EVA sets::

    A = V_k^T               (k x in: the top-k right singular vectors, / sqrt(sigma) with whiten)
    B = 0                   (out x k: the model starts unchanged)

    batches ──hook on each LoRA layer──► X_b (n x in) ──incremental SVD──► V^T (max_k x in)
    all layers' explained-variance ratios ──top sum(r) of them──► k per layer (<= rho * r)

The SVD runs incrementally over batches (incremental PCA, Ross et al. 2008: each step factorises
``[S V^T ; X_b - mean_b ; mean correction]``, with a randomised SVD seeded at 42 as PEFT does) until
the top-k directions of every layer stop moving (cosine similarity between steps >= ``tau``).
Layers that see the same input (q/k/v, gate/up) share one SVD. The rank budget ``sum(r)`` is then
redistributed by explained variance: each layer gets as many of the globally largest ratios as it
owns, at most ``round(rho * r)``; with ``adjust_scaling_factors`` its alpha scales with ``k / r``.
A layer left with k = 0 loses its adapter. ``rank_pattern``, ``alpha_pattern`` and
``target_modules`` of the config are rewritten to describe the result, so the saved adapter
loads in Hugging Face PEFT (and back) unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections import Counter, defaultdict
from contextlib import nullcontext
from copy import deepcopy
from itertools import cycle
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ...config import ConfigError

__all__ = ["EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights",
           "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling",
           "forward_fn_dict"]


@dataclasses.dataclass
class EvaConfig:
    """EVA's settings (``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))``).

    Args:
        rho: a layer may receive up to ``round(rho * r)`` ranks (>= 1; 1 = no redistribution).
        tau: stop a layer's SVD when its components' cosine similarity to the previous step is >= tau.
        use_label_mask: leave out tokens whose label is ``label_mask_value`` (and padding).
        label_mask_value: the ignored label (-100).
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale alpha by ``k / r`` where the rank changed (same update scale).
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or self.rho < 1.0:
            raise ConfigError(f"EvaConfig.rho must be a number >= 1.0, got {self.rho!r}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"EvaConfig.tau must lie in [0, 1], got {self.tau!r}.")


# ----- input selection (PEFT's defaults for language modelling) ------------------------------
def prepare_model_inputs_fn_language_modeling(model_input, peft_config) -> torch.Tensor:
    """(n, 2) indices of the (batch, position) pairs that count: attention mask, and labels unless
    they equal ``label_mask_value`` when ``use_label_mask``."""
    if not isinstance(model_input, dict):
        raise TypeError("EVA's default input preparation expects each batch to be a dict with input_ids "
                        "(and attention_mask / labels); pass prepare_model_inputs_fn=None for other inputs.")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer input's rows at the positions chosen by :func:`prepare_model_inputs_fn_language_modeling`."""
    x = _first_tensor(layer_input, layer_name)
    return x[model_input.T.unbind()]


def forward_fn_dict(model, inputs):
    """``model(**inputs)``."""
    return model(**inputs)


def _first_tensor(layer_input, layer_name) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"EVA: the input of {layer_name} is a {type(layer_input).__name__}; pass a "
                        "prepare_layer_inputs_fn that returns a 2-D tensor for it.")
    return layer_input


def _default_layer_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


# ----- incremental SVD -----------------------------------------------------------------------
class IncrementalSVD:
    """Incremental PCA over row batches (Ross et al. 2008, as scikit-learn's IncrementalPCA),
    with a seeded randomised SVD per step (``q = 2k``, 4 power iterations)."""

    def __init__(self, n_components: int, seed: int = 42):
        self.k = n_components
        self.seed = seed
        self.components_: Optional[torch.Tensor] = None
        self.singular_values_: Optional[torch.Tensor] = None
        self.explained_variance_ratio_: Optional[torch.Tensor] = None
        self.mean_: Optional[torch.Tensor] = None
        self.var_: Optional[torch.Tensor] = None
        self.n_seen = 0

    def partial_fit(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (n x features) into the factorisation."""
        x = x.to(torch.float32).clone()
        n, f = x.shape
        if self.k > f:
            raise ValueError(f"EVA wants {self.k} components of a layer with {f} input features: lower r or rho.")
        if self.k > n:
            raise ValueError(f"EVA wants {self.k} components from a batch of {n} rows")
        total = self.n_seen + n
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        batch_mean = batch_sum / n
        centred = x - batch_mean
        batch_ss = centred.square().sum(dim=0, dtype=torch.float64) - centred.sum(dim=0, dtype=torch.float64).square() / n
        if self.mean_ is None:
            mean, var = batch_sum / total, batch_ss / total
            x -= mean
            stacked = x
        else:
            old_sum = self.mean_ * self.n_seen
            mean = (old_sum + batch_sum) / total
            ratio = self.n_seen / n
            var = (self.var_ * self.n_seen + batch_ss + ratio / total * (old_sum / ratio - batch_sum).square()) / total
            this_mean = x.mean(dim=0)
            x -= this_mean
            correction = math.sqrt(self.n_seen / total * n) * (self.mean_ - this_mean)  # float64 row
            stacked = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(stacked, q=2 * self.k, niter=4)
        vt = v.mH
        # deterministic signs: the largest entry of each right singular vector is positive
        pick = vt.abs().argmax(dim=1)
        signs = torch.sign(vt[torch.arange(vt.shape[0]), pick])
        vt = vt * signs.view(-1, 1)
        self.n_seen = total
        self.components_ = vt[: self.k]
        self.singular_values_ = s[: self.k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (s.square() / torch.sum(var * total))[: self.k]


# ----- hooks ---------------------------------------------------------------------------------
def _gather(x: torch.Tensor, gather: bool) -> torch.Tensor:
    """Rows of every rank (ragged sizes padded for all_gather) when torch.distributed is running."""
    import torch.distributed as dist

    if not (gather and dist.is_available() and dist.is_initialized()):
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _Capture:
    """Forward hook: the layer's selected input rows, hashed (first batch) or fed to the SVD."""

    def __init__(self, name: str, prepare: Callable, gather: bool, svd: Optional[IncrementalSVD] = None,
                 tau: float = 0.99):
        self.name, self.prepare, self.gather, self.svd, self.tau = name, prepare, gather, svd, tau
        self.model_input = None
        self.digest: Optional[str] = None
        self.converged = torch.zeros(svd.k if svd else 0, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        x = _gather(self.prepare(args, self.model_input, self.name), self.gather)
        if self.svd is None:
            self.digest = hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes()
                                       + str(tuple(x.shape)).encode()).hexdigest()
            return
        if x.shape[0] < self.svd.k:
            warnings.warn(f"EVA: skipping a batch for {self.name}: {x.shape[0]} rows < {self.svd.k} components")
            return
        prev = self.svd.components_
        self.svd.partial_fit(x)
        if prev is not None:
            self.converged = nn.functional.cosine_similarity(self.svd.components_, prev) >= self.tau


def _redistribute(hooks, source_of, equal, budget, max_k) -> dict[str, int]:
    """Give the ``budget`` largest explained-variance ratios of all layers to their layers."""
    keys, values = [], []
    for layer, src in source_of.items():
        for v in hooks[src].svd.explained_variance_ratio_[: max_k[layer]]:
            keys.append(layer)
            values.append(v)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    counts = {layer: counts.get(layer, 0) for layer in source_of}
    for layer, src in equal.items():  # the SVD owner needs the most components of its group
        if counts[src] < counts[layer]:
            counts[src], counts[layer] = counts[layer], counts[src]
    return counts


def _lora_sites(model, adapter_name: str) -> dict[str, Any]:
    """Full module name -> Site of every linear LoRA site of ``adapter_name`` in a PeftModel."""
    from ...core.site import Site
    from .delta import LoraLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Site) and isinstance(mod.deltas._modules.get(adapter_name), LoraLinear):
            out[name] = mod
    return out


def _plain_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """Linear / Conv1D layers of a plain model selected by ``config.target_modules``."""
    from ...core.inject import linear_types, matches_targets

    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, linear_types()) and (config.target_modules is None or matches_targets(config, name, mod, model))}


def _device(model: nn.Module) -> Optional[torch.device]:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _to(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Union[Callable, dict, None] = prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """Module name -> EVA's ``A`` (k x in) for each target layer, k after redistribution.

    ``model`` is a PeftModel (its LoRA sites, adapters disabled while the data runs) or a plain
    model with ``peft_config`` (its targeted linear layers). ``dataloader`` must have a length;
    it is cycled until every layer's SVD has converged. Hugging Face PEFT's signature.
    """
    is_peft = hasattr(model, "peft_config") and isinstance(getattr(model, "peft_config"), dict)
    if is_peft and peft_config is None:
        peft_config = model.peft_config[adapter_name]
    if peft_config is None:
        raise ValueError("get_eva_state_dict needs peft_config when the model is not a PeftModel")
    if getattr(peft_config, "eva_config", None) is None:
        peft_config = dataclasses.replace(peft_config, eva_config=EvaConfig(), init_lora_weights="eva")
    if len(dataloader) == 0:
        raise ValueError("EVA: the dataloader is empty; it needs at least one batch")
    targets = _lora_sites(model, adapter_name) if is_peft else _plain_targets(model, peft_config)
    if not targets:
        raise ValueError("EVA found no linear LoRA layer to initialise (embeddings and convolutions are not supported)")
    ctx = model.disable_adapter() if is_peft else nullcontext()
    with ctx:
        return _eva_state(model, dataloader, peft_config, targets, forward_fn, prepare_model_inputs_fn,
                          prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


def _eva_state(model, dataloader, cfg, targets, forward_fn, prep_model, prep_layer, gather, progress):
    from ...core.patterns import pattern_value

    eva = cfg.eva_config
    rho = eva.rho
    if rho > 1000:  # "unbounded": cap at what the largest matrix allows
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // cfg.r)
    training = model.training
    device = _device(model)
    model.eval()
    per_layer = dict(prep_layer) if isinstance(prep_layer, Mapping) else None
    fns = {}
    for name in targets:
        fn = per_layer.pop(name, None) if per_layer is not None else prep_layer
        fns[name] = fn or _default_layer_inputs
    if per_layer:
        raise ValueError(f"prepare_layer_inputs_fn names modules that are not EVA targets: {sorted(per_layer)}")
    max_k = {n: round(pattern_value(cfg.rank_pattern, n, cfg.r) * rho) for n in targets}
    budget = sum(pattern_value(cfg.rank_pattern, n, cfg.r) for n in targets)

    def model_input(batch):
        return prep_model(batch, cfg) if prep_model is not None else deepcopy(batch)

    handles = {}
    try:
        # 1. one batch to find layers that see the same input (they share one SVD)
        first = _to(next(iter(dataloader)), device)
        probes = {}
        for name, mod in targets.items():
            probes[name] = _Capture(name, fns[name], gather)
            probes[name].model_input = model_input(first)
            handles[name] = mod.register_forward_hook(probes[name])
        forward_fn(model, first)
        for h in handles.values():
            h.remove()
        handles = {}
        groups = defaultdict(list)
        for name, p in probes.items():
            groups[p.digest].append(name)
        equal = {n: names[0] for names in groups.values() if len(names) > 1 for n in names[1:]}
        for names in groups.values():
            top = max(max_k[n] for n in names)
            for n in names:
                max_k[n] = top
        hooks = {n: _Capture(n, fns[n], gather, IncrementalSVD(max_k[n]), eva.tau) for n in targets if n not in equal}
        handles = {n: targets[n].register_forward_hook(h) for n, h in hooks.items()}
        source_of = {**{n: n for n in hooks}, **equal}
        # 2. cycle through the data until every layer's top-k directions are stable
        done = {n: False for n in hooks}
        ranks = dict(max_k)
        batches = iter(cycle(dataloader))
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(desc="EVA", leave=False)
            except ImportError:
                bar = None
        for batch in batches:
            batch = _to(batch, device)
            mi = model_input(batch)
            for n, h in hooks.items():
                ok = bool(torch.all(h.converged[: ranks[n]]))
                if not done[n] and ok and n in handles:
                    handles.pop(n).remove()
                    done[n] = True
                    continue
                if done[n] and not ok:
                    handles[n] = targets[n].register_forward_hook(h)
                    done[n] = False
                h.model_input = mi
            if bar is not None:
                bar.set_postfix_str(f"{sum(done.values())}/{len(done)} SVDs converged")
                bar.update()
            if all(done.values()):
                break
            forward_fn(model, batch)
            if all(h.svd.components_ is not None for h in hooks.values()):
                ranks = _redistribute(hooks, source_of, equal, budget, max_k)
        if bar is not None:
            bar.close()
    finally:
        for h in handles.values():
            h.remove()
        model.train(training)
    out = {}
    for name, k in ranks.items():
        svd = hooks[source_of[name]].svd
        u = svd.components_[:k]
        if eva.whiten:
            u = u / svd.singular_values_[:k].sqrt().reshape(-1, 1)
        out[name] = u.to(device) if device is not None else u
    return out


def _short(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


@torch.no_grad()
def initialize_lora_eva_weights(model, dataloader: Optional[Iterable] = None, eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Union[Callable, dict, None] = prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True):
    """Give the PeftModel's EVA adapter its data-driven ``A`` (and new ranks); returns the model.

    Either ``dataloader`` (the SVD runs here) or a precomputed ``eva_state_dict`` (from
    :func:`get_eva_state_dict`, keys with or without the ``base_model.model.`` prefix). Layers
    missing from it get the default initialisation (a warning lists them).
    """
    from ...core.inject import detach

    if not (hasattr(model, "peft_config") and hasattr(model, "base_model")):
        raise ValueError("initialize_lora_eva_weights takes a PeftModel (get_peft_model(model, LoraConfig(init_lora_weights='eva')))")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with one active adapter; set_adapter() one first")
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; loaded: {sorted(model.peft_config)}")
    cfg = model.peft_config[adapter_name]
    if cfg.init_lora_weights != "eva":
        raise ValueError("initialize_lora_eva_weights needs LoraConfig(init_lora_weights='eva')")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("pass a dataloader (or an eva_state_dict computed by get_eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    from ...core.patterns import pattern_value
    from .init import initialise

    state = {_short(k): v for k, v in eva_state_dict.items()}
    host = model.base_model
    rank_pattern, alpha_pattern, kept, missing, dropped = {}, {}, [], [], []
    for full, site in _lora_sites(model, adapter_name).items():
        name = _short(full)
        delta = site.deltas[adapter_name]
        r = pattern_value(cfg.rank_pattern, name, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
        w = state.pop(name, None)
        _materialise(delta, site.base_layer)
        if w is None:
            initialise(delta, True, site.base_layer)
            missing.append(name)
            new_r = r
        else:
            new_r = int(w.shape[0])
            if new_r == 0:
                dropped.append((name, delta))
                continue
            if new_r != r and cfg.eva_config.adjust_scaling_factors:
                alpha = alpha * new_r / r
            _resize(delta, new_r, alpha, cfg.use_rslora, w, site.base_layer)
            kept.append(name)
        if new_r != cfg.r:
            rank_pattern[name] = new_r
        if alpha != cfg.lora_alpha:
            alpha_pattern[name] = alpha
    for name, delta in dropped:  # k = 0: this layer keeps no adapter
        detach(host.model, name, adapter_name)
        gone = {id(p) for p in delta.parameters()}
        if adapter_name in getattr(host, "_params", {}):
            host._params[adapter_name] = [p for p in host._params[adapter_name] if id(p) not in gone]
    cfg.target_modules = kept + missing
    cfg.rank_pattern = rank_pattern
    cfg.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(f"EVA had no components for {missing}; they keep the default LoRA initialisation "
                      "(EVA covers linear layers only).")
    return model


def _materialise(delta, base: nn.Module) -> None:
    """Real storage on the layer's device for factors made on the meta device (low_cpu_mem_usage)."""
    device = base.weight.device
    for p in delta.parameters(recurse=False):
        if p.is_meta:  # .data cannot cross devices; swapping keeps the same Parameter object
            torch.utils.swap_tensors(p, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=p.requires_grad))


def _resize(delta, r: int, alpha: float, use_rslora: bool, a: torch.Tensor, base: nn.Module) -> None:
    """Give ``delta`` rank ``r``: ``A`` = EVA's components, ``B`` = 0, the scale recomputed. The
    Parameter objects stay the same (the host's trainability bookkeeping holds them)."""
    delta.lora_A.data = a.to(device=delta.lora_A.device, dtype=delta.lora_A.dtype).contiguous().clone()
    delta.lora_B.data = torch.zeros(delta.lora_B.shape[0], r, dtype=delta.lora_B.dtype, device=delta.lora_B.device)
    delta.r, delta.alpha = r, alpha
    delta.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    if getattr(delta, "magnitude", None) is not None:
        delta.magnitude.data = delta._weight_norm(base).to(delta.magnitude.dtype)
