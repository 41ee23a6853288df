"""The training loop: transformers' Trainer, taught to save and resume peftkit adapters.

Trainer already does what a fine-tuning loop needs and does it under ``torchrun`` too (DDP with
gloo on CPU): gradient accumulation with token-weighted losses, warmup and decay schedules,
gradient clipping, periodic evaluation, seeded shuffling, and checkpoints holding the optimizer,
scheduler, RNG states and step so that ``--resume`` continues the same run. Two things it does
not know are taught here:

- A checkpoint stores the adapter (``PeftModel.save_pretrained``: a few MB, written atomically,
  by rank 0 only) instead of the whole model, and resuming loads it back into the adapter in
  place, checked tensor by tensor.
- The progress bar shows the running loss next to the step speed, instead of printing a dict
  per log line.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from ..io.checkpoint import load_tensors
from ..io.peft_format import apply_plan, load_plan


def load_adapter_weights(peft_model, folder: str, adapter_name: str = "default") -> None:
    """Copy the adapter saved in ``folder`` into ``peft_model``'s existing adapter (same config)."""
    tensors = load_tensors(folder)
    apply_plan(load_plan(peft_model.base_model, adapter_name, tensors, folder))


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints are peftkit adapters plus Trainer's own optimizer/RNG state.

    With ``loss_head`` set (a frozen ``nn.Linear``, see :mod:`peftkit.train.loss`) training steps
    compute the causal-LM loss in chunks from the last hidden states instead of the full logits.
    """

    loss_head = None  # set by make_trainer
    loss_rows = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss; with ``loss_head`` the chunked loss (same value and gradient, less memory)."""
        if self.loss_head is None or return_outputs or "labels" not in inputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .loss import causal_lm_loss_sum, head_bypassed

        labels = inputs["labels"]
        rest = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
        with head_bypassed(self.accelerator.unwrap_model(model), self.loss_head):
            hidden = model(**rest).logits
        total, count = causal_lm_loss_sum(hidden, labels, self.loss_head, self.loss_rows)
        loss = total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the ranks
        return loss

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed every rank gathers the adapter (ZeRO-3 partitions it) and rank 0 writes it."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        from ..dist.deepspeed import save_adapter

        save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def train(self, *args, **kwargs):
        """Trainer.train; afterwards a ZeRO-3 model is made whole again on every rank (see ``unshard``)."""
        result = super().train(*args, **kwargs)
        if self.is_deepspeed_enabled:
            from ..dist.deepspeed import unshard

            unshard(self.model_wrapped)
        return result


class LossBar(ProgressCallback):
    """Trainer's tqdm bar with the latest loss and learning rate as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Show training losses in the bar; print evaluation results on their own line."""
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")


def make_trainer(peft_model, args, train_set, eval_set, collator, seq_loss: bool,
                 loss_head=None, loss_rows=None) -> AdapterTrainer:
    """Build the Trainer for ``peft_model`` with peftkit's progress bar.

    ``seq_loss`` says the model's loss is a per-token cross-entropy that accepts the batch's
    token count, which keeps gradient accumulation exact with uneven padding. ``loss_head``
    (with ``loss_rows`` per chunk) turns on the chunked training loss.
    """
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=train_set,
                             eval_dataset=eval_set, data_collator=collator)
    trainer.model_accepts_loss_kwargs = seq_loss
    trainer.loss_head, trainer.loss_rows = loss_head, loss_rows
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    return trainer


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs from ``trainer.state.log_history``."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, evals


def plot_losses(log_history: list[dict], path: str, title: str = "peftkit train") -> Optional[str]:
    """Write the loss curve PNG (train and eval loss against step); None when nothing was logged."""
    train, evals = loss_history(log_history)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def enable_checkpointing(peft_model) -> None:
    """Recompute activations in backward (less memory, ~30% more time), frozen base included.

    Non-reentrant checkpointing passes gradients to the adapters inside each block without the
    inputs requiring grad, so backward stops at the lowest adapter instead of running down to
    the embeddings (the hook transformers adds for that is removed again).
    """
    inner = peft_model.get_base_model()
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(inner).__name__} does not support gradient checkpointing; drop --gradient-checkpointing.")
    from ..quant.prepare import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(inner, use_gradient_checkpointing=True)
    inner.config.use_cache = False


def set_threads(n: Optional[int]) -> int:
    """Use ``n`` intra-op threads; by default every core, shared among the local ranks.

    The count is not guessed from the machine's current load: a short-lived background job seen
    at start-up would otherwise halve the whole run's speed (``--threads`` sets it by hand).
    """
    if n is None:
        cores = os.cpu_count() or 1
        n = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    return n
