"""The test matrix: every method peftkit has x every model family of conftest.FAMILIES x mode.

One table, read by tests/test_matrix.py (and by the method files that reuse a row's config).
A *row* is a method or a variant worth its own row; a *cell* is a row on one family. Each cell
either applies, with the modes it runs, or is a refusal: peftkit refuses that family's layers
and the cell records the error type, message and why (the test asserts that refusal).

Modes (the checks each one makes are in test_matrix.py's docstrings):

- ``single``: identity at init (where the method has it), the perturbed adapter changes the
  output, merge / unmerge / disable equal (or the merge refusal), merge_and_unload, unload
  restores the base, save/load round trip equal.
- ``multi``: two adapters, set_adapter switches to each one's outputs, both saved and loaded,
  delete.
- ``mixed``: a batch with ``adapter_names=[...]`` gives each row what its adapter alone gives,
  or the refusal the method raises (``Row.mixed``).
- ``train``: training lowers the loss and touches only the adapter.
- ``peft``: Hugging Face PEFT on the same weights gives the same outputs, and the files load
  both ways (where peft has the method; ``Row.peft_cannot`` says where it cannot and why).
- ``generate``: prompt methods: generation with the cache equals greedy decoding without it
  (and, on decoders, left padding changes nothing).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from conftest import FAMILIES
from peftkit import (AdaLoraConfig, AdaptionPromptConfig, BitFitConfig, BOFTConfig, BottleneckConfig,
                     ConfigError, IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig,
                     PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TrainableTokensConfig, VeraConfig)
from peftkit.core.site import Site

ALL_MODES = ("single", "multi", "mixed", "train", "peft", "generate")
TARGETS = {fam: targets for fam, (_, targets) in FAMILIES.items()}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "neox": "CAUSAL_LM"}
V = 3  # virtual tokens / adapter length of the prompt methods
TOKENS = [3, 17, 64, 100]  # trainable token rows (inputs_for's ids are drawn from 2..127)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What peftkit raises: ``pytest.raises(exc, match=match)``; ``reason`` says why."""

    exc: type
    match: str
    reason: str


PROMPT_MERGE = Refusal(TypeError, "cannot be merged", "prompts add tokens or attention, not a weight update")
PROMPT_MIXED = Refusal(ValueError, r"adapter_names \(mixed-adapter batches\) is not supported with prompt methods",
                       "a batch shares one prompt: one prompt adapter runs at a time")
NOT_MERGEABLE = Refusal(TypeError, "cannot be merged", "the non-linearity makes the update depend on the input")


@dataclasses.dataclass(frozen=True)
class Row:
    """One method (or variant): its config per family and where it does not apply."""

    name: str
    peft_type: str                                   # the registry's name (core/registry.py)
    config: Callable[[str], Any]                     # family -> a fresh peftkit config
    kind: str = "layer"                              # "layer" (Sites) or "prompt" (core/prompt.py)
    refuses: dict = dataclasses.field(default_factory=dict)      # family -> Refusal
    modes: tuple = ALL_MODES                         # what the row runs where it applies
    why_fewer_modes: str = ""                        # the reason when ``modes`` is not everything
    identity: bool = True                            # the output equals the base's at init
    merge: Optional[Refusal] = None                  # None: mergeable
    mixed: Optional[Refusal] = None                  # None: mixed batches supported
    peft_config: Optional[Callable[[str], Any]] = None  # family -> the peft mode's config (default: config)
    peft_cannot: dict = dataclasses.field(default_factory=dict)  # family -> why peft cannot run the cell
    generate_on: tuple = ()                          # families of the ``generate`` mode
    exact: bool = False                              # identity / disable / unload compared with atol=0
    grads_from_start: bool = False                   # every adapter tensor has a gradient from the first step
    in_batch: tuple = ()                             # token ids every row of the cell's batch starts with
    adds_tokens: bool = False                        # virtual input tokens show in a decoder's logits
    peft_extra_total: Optional[tuple] = None         # (why, model -> n): peft counts n more parameters in all
    known_bugs: dict = dataclasses.field(default_factory=dict)   # (family, mode) -> (exception, description)
    scale: float = 0.1                               # perturb's noise scale

    def __post_init__(self):
        assert set(self.refuses) <= set(FAMILIES) and set(self.peft_cannot) <= set(FAMILIES), self.name
        assert set(self.modes) <= set(ALL_MODES) and set(self.generate_on) <= set(FAMILIES), self.name
        assert all(f in FAMILIES and m in ALL_MODES for f, m in self.known_bugs), self.name


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row on one family: the modes that run there, or the refusal."""

    row: Row
    family: str

    @property
    def id(self) -> str:
        return f"{self.row.name}-{self.family}"

    @property
    def refused(self) -> Optional[Refusal]:
        return self.row.refuses.get(self.family)

    def config(self):
        return self.row.config(self.family)

    @property
    def modes(self) -> tuple:
        if self.refused:
            return ()
        out = [m for m in self.row.modes if m != "generate" or self.family in self.row.generate_on]
        if self.family in self.row.peft_cannot:
            out = [m for m in out if m != "peft"]
        return tuple(out)

    def __repr__(self) -> str:
        return self.id


CONV1D_OFT = Refusal(TypeError, "Conv1D is not supported by OFT.*supports",
                     "GPT-2's Conv1D is not a layer OFT rotates (nn.Linear, Conv2d, Embedding only)")
CONV1D_BOFT = Refusal(TypeError, "Conv1D is not supported by BOFT.*supports",
                      "GPT-2's Conv1D is not a layer BOFT rotates (nn.Linear, Conv2d only)")
NO_BIAS = Refusal(ConfigError, "no biased", "the model has no biases to tune")
NO_ADAPTION = Refusal(ConfigError, "Adaption prompts support model types",
                      "LLaMA-Adapter's prompt attention is written for Llama and GPT-2")


def _lora(**kw):
    return lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[fam], **kw)


def _prompt(name, peft_type, make, **kw):
    """A prompt method's row: ``make`` takes the family's task type."""
    kw = {"identity": False, **kw}
    return Row(name, peft_type, lambda fam: make(TASKS[fam]), kind="prompt", merge=PROMPT_MERGE, mixed=PROMPT_MIXED,
               scale=0.5, **kw)


GENERATES = ("llama", "gpt2", "neox", "t5")  # the families with generate(): the decoders and T5
PEFT_LYCORIS_CONV1D = "peft 0.21's LoHa and LoKr refuse transformers' Conv1D (GPT-2's layers)"
LN_NEOX = ["input_layernorm", "post_attention_layernorm", "final_layer_norm"]  # LN tuning has no NeoX default
PEFT_BERT_PREFIX = "peft 0.21 cannot run prefix tuning on BERT under transformers 5 ('Model does not support " \
                   "past key values'); checked on the peftkit side from first principles (test_prompts.py)"

ROWS = [
    # ----- LoRA and its variants ---------------------------------------------------------------
    Row("lora", "LORA", _lora()),
    Row("rslora", "LORA", _lora(use_rslora=True)),
    Row("dora", "LORA", _lora(use_dora=True)),
    Row("lora_tokens", "LORA", _lora(trainable_token_indices=TOKENS), in_batch=tuple(TOKENS)),
    Row("lora_dropout", "LORA", _lora(lora_dropout=0.1), modes=("single", "train"),
        why_fewer_modes="plain LoRA with dropout on its input: only the dropout's own path (identity in eval, "
                        "training through it) is new; the rest is the lora row's"),
    # ----- the other reparametrisations ------------------------------------------------------
    Row("ia3", "IA3", lambda fam: IA3Config()),  # each family's default targets and feed-forward layers
    Row("loha", "LOHA", lambda fam: LoHaConfig(r=2, alpha=4, target_modules=TARGETS[fam]),
        peft_cannot={"gpt2": PEFT_LYCORIS_CONV1D}),
    Row("lokr", "LOKR", lambda fam: LoKrConfig(r=2, alpha=4, target_modules=TARGETS[fam]),
        peft_cannot={"gpt2": PEFT_LYCORIS_CONV1D}),
    Row("lokr_both", "LOKR", lambda fam: LoKrConfig(r=1, decompose_both=True, target_modules=TARGETS[fam]),
        modes=("single", "train", "peft"),
        why_fewer_modes="LoKr with both factors decomposed: only the factorisation differs from lokr",
        peft_cannot={"gpt2": PEFT_LYCORIS_CONV1D},
        peft_config=lambda fam: LoKrConfig(r=1, decompose_both=True, decompose_factor=4,
                                           target_modules=TARGETS[fam])),
    Row("vera", "VERA", lambda fam: VeraConfig(r=8, target_modules=TARGETS[fam], projection_prng_key=7)),
    Row("vera_regenerated", "VERA", lambda fam: VeraConfig(r=8, target_modules=TARGETS[fam], save_projection=False),
        modes=("single", "peft"),
        why_fewer_modes="VeRA whose file leaves the projections out: what differs is saving and loading"),
    Row("adalora", "ADALORA", lambda fam: AdaLoraConfig(init_r=4, target_r=2, total_step=20, lora_alpha=6,
                                                        target_modules=TARGETS[fam]),
        scale=0.3,  # the update is A diag(E) B with E from zero: a product of three perturbations
        peft_extra_total=("peft keeps a frozen scalar `ranknum` Parameter per adapted layer; peftkit keeps none",
                          lambda model: sum(1 for m in model.modules() if isinstance(m, Site)))),
    Row("oft", "OFT", lambda fam: OFTConfig(oft_block_size=8,  # on Llama its embedding too
                                            target_modules=TARGETS[fam] + (["embed_tokens"] * (fam == "llama"))),
        refuses={"gpt2": CONV1D_OFT}, grads_from_start=True),
    Row("boft", "BOFT", lambda fam: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3,
                                               target_modules=TARGETS[fam]),
        refuses={"gpt2": CONV1D_BOFT}, grads_from_start=True),
    # ----- selective -----------------------------------------------------------------------------
    Row("ln_tuning", "LN_TUNING", lambda fam: LNTuningConfig(target_modules=LN_NEOX if fam == "neox" else None),
        peft_config=lambda fam: LNTuningConfig(target_modules=["LayerNorm"] if fam == "bert" else
                                               LN_NEOX if fam == "neox" else None)),
    Row("bitfit", "BITFIT", lambda fam: BitFitConfig(), refuses={"llama": NO_BIAS, "t5": NO_BIAS},
        peft_cannot={f: "peft has no BitFit" for f in FAMILIES}),
    Row("trainable_tokens", "TRAINABLE_TOKENS", lambda fam: TrainableTokensConfig(token_indices=TOKENS),
        in_batch=tuple(TOKENS)),
    # ----- bottleneck adapters (peftkit's own file format) ---------------------------------------
    Row("houlsby", "BOTTLENECK", lambda fam: BottleneckConfig(adapter_type="houlsby", reduction_factor=4),
        merge=NOT_MERGEABLE, peft_cannot={f: "peft has no bottleneck adapters" for f in FAMILIES}),
    Row("pfeiffer", "BOTTLENECK", lambda fam: BottleneckConfig(adapter_type="pfeiffer", bottleneck_size=4,
                                                               use_layernorm=True),
        merge=NOT_MERGEABLE, peft_cannot={f: "peft has no bottleneck adapters" for f in FAMILIES}),
    Row("parallel", "BOTTLENECK", lambda fam: BottleneckConfig(adapter_type="parallel", bottleneck_size=4,
                                                               scaling=4.0),
        merge=NOT_MERGEABLE, peft_cannot={f: "peft has no bottleneck adapters" for f in FAMILIES},
        refuses={"bert": Refusal(ConfigError, "no default placement",
                                 "BERT's feed-forward is not one module a parallel adapter can wrap")}),
    # ----- prompt methods ------------------------------------------------------------------------
    _prompt("prompt", "PROMPT_TUNING", lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=V),
            adds_tokens=True, generate_on=GENERATES),
    _prompt("p_mlp", "P_TUNING", lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=V,
                                                                  encoder_hidden_size=16),
            adds_tokens=True, generate_on=GENERATES),
    _prompt("p_lstm", "P_TUNING", lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=V,
                                                                   encoder_hidden_size=8,
                                                                   encoder_reparameterization_type="LSTM"),
            adds_tokens=True, generate_on=GENERATES),
    _prompt("prefix", "PREFIX_TUNING", lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=V),
            generate_on=GENERATES, peft_cannot={"bert": PEFT_BERT_PREFIX}),
    _prompt("prefix_proj", "PREFIX_TUNING", lambda task: PrefixTuningConfig(
        task_type=task, num_virtual_tokens=V, prefix_projection=True, encoder_hidden_size=16),
            generate_on=GENERATES, peft_cannot={"bert": PEFT_BERT_PREFIX}),
    _prompt("adaption", "ADAPTION_PROMPT", lambda task: AdaptionPromptConfig(task_type=task, adapter_len=V,
                                                                             adapter_layers=2),
            identity=True, exact=True, generate_on=("llama", "gpt2"),
            refuses={"bert": NO_ADAPTION, "t5": NO_ADAPTION, "neox": NO_ADAPTION}),
]
ROWS_BY_NAME = {r.name: r for r in ROWS}
assert len(ROWS_BY_NAME) == len(ROWS)


CELLS = [Cell(row, fam) for row in ROWS for fam in FAMILIES]


def cells(mode: str) -> list:
    """The cells that run ``mode``, as pytest parameters; a known bug of peftkit in that cell is a
    strict xfail that names the bug and the exception it raises (it fails the run once fixed)."""
    import pytest

    out = []
    for c in CELLS:
        if mode not in c.modes:
            continue
        bug = c.row.known_bugs.get((c.family, mode))
        marks = [pytest.mark.xfail(raises=bug[0], strict=True, reason=bug[1])] if bug else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def refused_cells() -> list[Cell]:
    return [c for c in CELLS if c.refused]


def cell(row: str, family: str) -> Cell:
    return Cell(ROWS_BY_NAME[row], family)


def peft_twin(config):
    """Hugging Face PEFT's config with the same fields (what the saved adapter_config.json holds)."""
    import peft

    data = {k: v for k, v in config.to_dict().items() if v is not None}
    data.pop("inference_mode", None)
    return peft.get_peft_config(data)
