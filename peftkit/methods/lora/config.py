"""LoraConfig: Hugging Face PEFT's field names, defaults and meanings."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType

_INITS = (True, False, "gaussian", "pissa", "olora")


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

    _inert_fields: ClassVar[dict[str, Any]] = {
        **PeftConfig._inert_fields,
        "loftq_config": {}, "megatron_config": None, "megatron_core": Any, "layer_replication": None,
        "lora_bias": False, "eva_config": None, "corda_config": None, "runtime_config": Any,
        "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
        "arrow_config": None, "use_qalora": False, "qalora_group_size": Any, "ensure_weight_tying": False,
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
                "'pissa', 'pissa_niter_<K>', 'olora'."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern needs layers_to_transform to be set too.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; "
                              "put the layer indices in the regex instead.")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The (r, alpha) for the module at ``path`` after applying rank/alpha patterns."""
        from ...core.patterns import pattern_value

        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return r, alpha
