"""Errors and warnings a PEFT script catches or matches: the same classes, and PEFT's own first
sentence before peftkit's help, checked against the real ``peft`` on a tiny custom model."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit
import peftkit.utils

peft = pytest.importorskip("peft")


class Blocks(nn.Module):
    """Two numbered blocks (``layers.0.q``...) and a head, as layer-indexed configs expect."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(2)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.layers:
            x = block["v"](block["q"](x))
        return self.head(x)


def failure(lib, **cfg):
    """The exception ``get_peft_model`` raises for a LoraConfig(**cfg) on Blocks."""
    with pytest.raises(Exception) as info:
        lib.get_peft_model(Blocks(), lib.LoraConfig(**cfg))
    return info.value


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["nope"]),
    dict(target_modules=["q"], layers_to_transform=[5]),
    dict(target_modules=["q"], layers_to_transform=[5], layers_pattern="layers"),
    dict(target_modules=["q"], exclude_modules=["q"]),
], ids=["unknown", "layer-index", "layer-pattern", "all-excluded"])
def test_targets_that_match_nothing_raise_peft_error_class_and_sentence(cfg):
    theirs, ours = failure(peft, **cfg), failure(peftkit, **cfg)
    assert type(theirs).__name__ == type(ours).__name__ == "NoMatchingPeftModuleError"
    assert isinstance(ours, ValueError) and isinstance(ours, peftkit.PeftError)
    assert isinstance(ours, peftkit.NoMatchingPeftModuleError)
    assert str(ours).startswith(str(theirs))  # PEFT's words first, then peftkit's help
    assert "Layer names it has: " in str(ours)


def test_exclude_modules_that_exclude_nothing_warn_as_peft():
    got = {}
    for lib in (peft, peftkit):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lib.get_peft_model(Blocks(), lib.LoraConfig(target_modules=["q"], exclude_modules=["absent"]))
        got[lib] = [str(x.message) for x in w if "exclude_modules" in str(x.message)]
    assert got[peftkit] == got[peft] and len(got[peft]) == 1


def test_exclude_modules_that_exclude_something_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.get_peft_model(Blocks(), peftkit.LoraConfig(target_modules=["q", "v"], exclude_modules=["v"]))


@pytest.mark.parametrize("cfg", [
    dict(target_modules="layers.*q", layers_to_transform=[0]),
    dict(target_modules="layers.*q", layers_pattern="layers"),
    dict(target_modules=["q"], layers_pattern="layers"),
    dict(target_modules=["q"], lora_bias=True, use_dora=True),
    dict(target_modules=["q"], lora_bias=True, init_lora_weights="pissa"),
], ids=["regex-layers", "regex-pattern", "pattern-alone", "bias-dora", "bias-pissa"])
def test_config_errors_begin_with_peft_words(cfg):
    errors = {}
    for lib in (peft, peftkit):
        with pytest.raises(ValueError) as info:
            lib.LoraConfig(**cfg)
        errors[lib] = info.value
    assert isinstance(errors[peftkit], peftkit.ConfigError)
    assert str(errors[peftkit]).startswith(str(errors[peft]).rstrip(" ."))


def test_target_parameters_of_the_wrong_type_is_a_type_error_in_both():
    for lib in (peft, peftkit):
        with pytest.raises(TypeError, match="`target_parameters` must be a list of strings or None"):
            lib.LoraConfig(target_modules=[], target_parameters="experts.down_proj")


def test_error_classes_are_exported_where_peft_exports_them():
    for name in ("PeftError", "NoMatchingPeftModuleError"):
        assert getattr(peftkit, name) is getattr(peftkit.utils, name)
        assert hasattr(peft, name) and hasattr(peft.utils, name)
    assert issubclass(peftkit.ConfigError, peftkit.PeftError) and issubclass(peftkit.CheckpointError, peftkit.PeftError)
