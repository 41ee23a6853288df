"""LoraConfig: Hugging Face PEFT's field names, defaults and meanings."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Union

from ...config import ConfigError, ConfigTypeError, PeftConfig, PeftType
from .._shared import check_layers

_INITS = (True, False, "gaussian", "pissa", "olora", "loftq", "eva")


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (Hu et al. 2021) and its variants.

    Args:
        r: rank of the update ``B @ A``.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input (0 adds no work at all).
        target_modules: module names or dotted suffixes, a regex (``re.fullmatch`` on the full
            path), or ``"all-linear"``; None picks the model family's default.
        exclude_modules: same forms; matching modules are skipped.
        fan_in_fan_out: the base weight is stored (in, out) as in GPT-2's Conv1D; set
            automatically for Conv1D.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of targets).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        modules_to_save: modules trained in full and saved with the adapter (task heads).
        init_lora_weights: True (A Kaiming-uniform, B zero: starts at the base), False (both
            random, for tests), "gaussian" (A ~ N(0, 1/r)), "pissa" / "pissa_niter_K"
            (principal singular vectors, Meng et al. 2024) or "olora" (QR, Büyükakyüz 2024).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha keyed by regex.
        use_dora: weight-decomposed LoRA (Liu et al. 2024): a trainable magnitude per output.
        lora_bias: give ``B`` a trainable bias (``y = W x + s (B A x + b)``), e.g. for adapters
            extracted from fully fine-tuned weights; merging needs a base bias.
        trainable_token_indices: also train these rows of the input embedding (a list of token
            ids), or of the named embedding layers (``{"embed_tokens": [...], ...}``); tied output
            heads follow (methods/trainable_tokens.py).
        loftq_config: ``LoftQConfig(loftq_bits, loftq_iter)`` (or its dict) with
            ``init_lora_weights="loftq"`` (methods/lora/loftq.py).
        eva_config: ``EvaConfig(...)`` with ``init_lora_weights="eva"``; the weights come from
            ``initialize_lora_eva_weights(model, dataloader)`` (methods/lora/eva.py).
        ensure_weight_tying: on a model whose output head is tied to the input embedding, give
            both one adapter: the embedding's LoRA (or ``modules_to_save`` copy) also computes the
            head's output, and merging it once merges both (methods/lora/tied.py).
        target_parameters: names (or dotted suffixes) of bare parameters to adapt, such as the
            fused 3-D expert weights of MoE layers (``["experts.gate_up_proj", "experts.down_proj"]``);
            one update per expert (methods/lora/params.py). Not with lora_dropout, fan_in_fan_out,
            lora_bias or DoRA (as in PEFT).
    """

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    loftq_config: Any = dataclasses.field(default_factory=dict)
    eva_config: Any = None
    target_parameters: Optional[list[str]] = None
    ensure_weight_tying: bool = False

    _inert_fields: ClassVar[dict[str, Any]] = {
        **PeftConfig._inert_fields,
        "megatron_config": None, "megatron_core": Any, "layer_replication": None,
        "corda_config": None, "runtime_config": Any,
        "alora_invocation_tokens": None,
        "arrow_config": None, "use_qalora": False, "qalora_group_size": Any,
        "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
        "velora_config": None,
    }

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LORA.value
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        init = self.init_lora_weights
        ok = init in _INITS or (isinstance(init, str) and init.startswith("pissa_niter_") and init[12:].isdigit())
        if not ok:
            raise ConfigError(
                f"LoraConfig.init_lora_weights={init!r} is not one of True, False, 'gaussian', "
                "'pissa', 'pissa_niter_<K>', 'olora', 'loftq', 'eva'."
            )
        if self.lora_bias and init not in (True, False):
            raise ConfigError(f"The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                              f"got init_lora_weights={init} instead.")
        if self.lora_bias and self.use_dora:
            raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        self._sub_configs()
        self._check_target_parameters()
        check_layers(self)

    def _check_target_parameters(self) -> None:
        """A list of names; the options PEFT's parameter wrapper refuses are refused here, early."""
        tp = self.target_parameters
        if isinstance(tp, str):
            raise ConfigTypeError("`target_parameters` must be a list of strings or None: "
                                  f"LoraConfig got the string {tp!r}; "
                              f"write [{tp!r}] (regexes are not supported, as in PEFT).")
        if isinstance(tp, (set, tuple)):
            self.target_parameters = tp = sorted(tp)
        if tp and (bad := [k for k in ("lora_dropout", "fan_in_fan_out", "lora_bias", "use_dora") if getattr(self, k)]):
            raise ConfigError(f"LoraConfig.target_parameters does not work with {bad[0]}={getattr(self, bad[0])!r} "
                              "(the update acts on the weights, as in Hugging Face PEFT); leave it at its default.")

    def _sub_configs(self) -> None:
        """LoftQ / EVA / trainable-token settings, checked and normalised as PEFT does: the LoftQ
        config is kept as a dict, the EVA config as an :class:`EvaConfig` (a dict when read back)."""
        import warnings

        from ..trainable_tokens import check_token_indices
        from .eva import EvaConfig
        from .loftq import LoftQConfig, check_loftq

        if self.trainable_token_indices is not None:
            self.trainable_token_indices = check_token_indices(self.trainable_token_indices, "LoraConfig.trainable_token_indices")
            if isinstance(self.trainable_token_indices, dict) and self.modules_to_save:
                both = [n for n in self.trainable_token_indices if n in self.modules_to_save]
                if both:
                    raise ConfigError(
                        "The embedding layer is already marked to be trained fully, either specify "
                        f'`modules_to_save=[..., "{both[0]}", ...]` or `trainable_tokens={{\'{both[0]}\': x}}` but not '
                        f"both. ({both[0]!r} is in modules_to_save and in trainable_token_indices.)")
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            raise ConfigError(f"LoraConfig.loftq_config must be a LoftQConfig or a dict, got {type(self.loftq_config).__name__}.")
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ConfigError("init_lora_weights='loftq' needs loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1).")
            check_loftq(self.loftq_config)
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'.", stacklevel=3)
            self.loftq_config = {}
        if isinstance(self.eva_config, dict):
            known = {f.name for f in dataclasses.fields(EvaConfig)}
            self.eva_config = EvaConfig(**{k: v for k, v in self.eva_config.items() if k in known})
        if self.eva_config is not None and not isinstance(self.eva_config, EvaConfig):
            raise ConfigError(f"LoraConfig.eva_config must be an EvaConfig, a dict or None, got {type(self.eva_config).__name__}.")
        if self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn("init_lora_weights='eva' without eva_config: using EvaConfig()'s defaults.", stacklevel=3)
            self.eva_config = EvaConfig()
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn("eva_config is ignored unless init_lora_weights='eva'.", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`PeftConfig.to_dict`, with the EVA sub-config as a plain dict (PEFT's JSON)."""
        out = super().to_dict()
        if self.eva_config is not None:
            out["eva_config"] = dataclasses.asdict(self.eva_config)
        out["loftq_config"] = dict(self.loftq_config)
        return out

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The (r, alpha) for the module at ``path`` after applying rank/alpha patterns."""
        from ...core.patterns import pattern_value

        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return r, alpha
