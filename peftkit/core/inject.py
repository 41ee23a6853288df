"""Target matching and reversible injection.

Matching follows Hugging Face PEFT's rules so that the same config selects the same modules:
a list of names matches a module path exactly or as a dotted suffix; a string is a regular
expression matched with ``re.fullmatch``; ``"all-linear"`` picks every linear layer except the
output head. ``exclude_modules`` uses the same rules. ``layers_to_transform`` keeps only modules
inside the listed layer indices (found via ``layers_pattern`` or the first ``.<name>.<int>.``).

Injection replaces a child with ``setattr`` on its parent and puts the original back on undo;
nothing is monkeypatched. Paths are always the original module names: inside a wrapped block
they skip the Site (``mlp.up_proj``), as Hugging Face PEFT's files name them.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from .site import Site


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear for ``"all-linear"`` (nn.Linear and GPT-2's Conv1D)."""
    types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        types += (Conv1D,)
    except Exception:  # transformers absent: plain torch models still work
        pass
    return types


def _name_matches(spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def _layer_index(path: str, layers_pattern) -> Optional[int]:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        m = re.match(r".*\.[^.]*\.(\d+)\.", path)
    else:
        m = None
        for p in patterns:
            m = re.match(rf".*\.{p}\.(\d+)\.", path)
            if m:
                break
    return int(m.group(1)) if m else None


def _output_module(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        out = get()
    except Exception:
        return None
    return out.base_layer if isinstance(out, Site) else out


def _target_spec_matches(config, path: str, module: nn.Module, model: nn.Module) -> bool:
    """Whether ``target_modules`` alone (before ``exclude_modules``) selects ``module``."""
    tm = getattr(config, "target_modules", None)
    if tm == "all-linear":
        return isinstance(module, linear_types()) and module is not _output_module(model)
    return _name_matches(tm, path)


def matches_targets(config, path: str, module: nn.Module, model: nn.Module) -> bool:
    """Whether ``module`` (at dotted ``path`` in ``model``) is selected by ``config``."""
    if isinstance(module, Site):
        module = module.base_layer
    if not _target_spec_matches(config, path, module, model) or _name_matches(getattr(config, "exclude_modules", None), path):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        idx = _layer_index(path, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        return idx in layers if isinstance(layers, (list, tuple, set)) else idx == layers
    return True


def iter_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` under the names modules had before any wrapping, parents first.

    A Site is yielded at its own path; then the inside of its base layer follows under the
    original names (``mlp.up_proj``, not ``mlp.base_layer.up_proj``), so a method added after a
    block-level adapter still reaches the layers inside the block. A Site's Deltas are never
    candidates, nor is the inside of a ``modules_to_save`` copy (a Site whose Delta replaces the
    base): the original there does not run while the copy is active.
    """
    stack = [("", model)]
    while stack:
        prefix, mod = stack.pop()
        for name, child in reversed(list(mod._modules.items())):  # named_children, without its memo
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if isinstance(child, Site):
                if child.copies:  # a modules_to_save copy: the original inside does not run
                    continue
                child = child.base_layer
            stack.append((path, child))


def excluded_paths(config, model: nn.Module) -> list[str]:
    """Paths that ``target_modules`` selects and ``exclude_modules`` then drops."""
    ex = getattr(config, "exclude_modules", None)
    if not ex:
        return []
    return [p for p, m in iter_candidates(model)
            if _target_spec_matches(config, p, m.base_layer if isinstance(m, Site) else m, model)
            and _name_matches(ex, p)]


def spec_text(tm) -> str:
    """A target spec as PEFT prints it: a list as its set, a regex as the string."""
    if isinstance(tm, (list, tuple, set, frozenset)):
        return "{" + ", ".join(repr(t) for t in sorted(tm)) + "}"  # PEFT prints its set
    return repr(tm) if not isinstance(tm, str) else tm


def no_match_error(config, model: nn.Module) -> ValueError:
    """PEFT's error when a config selects nothing (its first sentence, so code that matches on it
    keeps working), followed by the layer names the model does have and what to pass instead."""
    from ..errors import NoMatchingPeftModuleError

    names, seen = [], set()
    for path, mod in iter_candidates(model):
        base = mod.base_layer if isinstance(mod, Site) else mod
        if isinstance(base, linear_types() + (nn.Embedding, nn.Conv1d, nn.Conv2d)):
            last = path.rsplit(".", 1)[-1]
            if last not in seen:
                seen.add(last)
                names.append(last)
    tm = getattr(config, "target_modules", None)
    if not tm and not getattr(config, "target_parameters", None):
        lead = ("No `target_modules` passed but also no `target_parameters` found. "
                "Please check the values for these arguments.")
    elif excluded_paths(config, model):
        lead = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                "configuration. You may also have only targeted modules that are marked to be saved "
                "(`modules_to_save`).")
    else:
        lead = f"Target modules {spec_text(tm)} not found in the base model. Please check the target modules and try again."
    if getattr(config, "layers_to_transform", None) is not None:
        lead += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
        if getattr(config, "layers_pattern", None) is not None:
            lead += f" You also specified 'layers_pattern': {config.layers_pattern}."
    return NoMatchingPeftModuleError(
        f"{lead} (peftkit: target_modules={tm!r}, exclude_modules={getattr(config, 'exclude_modules', None)!r} "
        f"matched no module of {type(model).__name__}. Layer names it has: {', '.join(names[:25]) or '(none)'}. "
        "Pass names from this list, a regex matched against full dotted paths, or 'all-linear'.)"
    )


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The parent module of ``path`` and the child's attribute name.

    When the parent is itself wrapped in a Site (a layer inside an adapted block), the parent is
    the Site's base layer, where the child really lives.
    """
    if "." not in path:
        return model, path
    parent_path, child = path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)  # reads through Sites (BaseLayerPassthrough)
    return (parent.base_layer if isinstance(parent, Site) else parent), child


def attach(model: nn.Module, path: str, adapter_name: str, delta) -> Site:
    """Put ``delta`` at ``path``: wrap the module in a Site (once) and add the delta to it."""
    parent, child = get_parent(model, path)
    current = getattr(parent, child)
    if isinstance(current, Site):
        site = current
    else:
        site = Site(current)
        setattr(parent, child, site)
    site.add(adapter_name, delta)
    return site


def detach(model: nn.Module, path: str, adapter_name: str) -> None:
    """Remove one adapter from the Site at ``path``; restore the original module when empty."""
    parent, child = get_parent(model, path)
    site = getattr(parent, child)
    site.remove(adapter_name)
    if len(site.deltas) == 0:
        setattr(parent, child, site.base_layer)


def sites(model: nn.Module) -> Iterator[tuple[str, Site]]:
    """All Sites in ``model`` with their paths."""
    for path, mod in iter_candidates(model):
        if isinstance(mod, Site):
            yield path, mod
