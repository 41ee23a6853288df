"""Tiny models built locally from configs, in milliseconds: the families of the test matrix."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
torch.set_num_threads(1)

VOCAB = 128


def tiny_llama(**kw):
    """Llama with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def tiny_gpt2(**kw):
    """GPT-2: Conv1D layers (weights stored in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                     bos_token_id=0, eos_token_id=1, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(num_labels: int = 2):
    """BERT-style encoder with a sequence-classification head."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5():
    """T5 encoder-decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_neox():
    """GPT-NeoX: the fused ``query_key_value`` projection of the README's example."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=128)
    return GPTNeoXForCausalLM(cfg).eval()


class TinyConvNet(torch.nn.Module):
    """A plain nn.Module (no transformers) with Conv1d, Conv2d, Embedding and Linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.conv1 = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(8 * 4, 5)

    def forward(self, input_ids):
        h = self.emb(input_ids).transpose(1, 2)          # B, 8, T
        h = torch.relu(self.conv1(h))                     # B, 8, T
        h = self.conv2(h.unsqueeze(1))                    # B, 4, 8, T
        return self.head(h.mean(-1).flatten(1))           # B, 5


FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
    "bert": (tiny_bert_cls, ["query", "value"]),
    "t5": (tiny_t5, ["q", "v", "wo"]),
    "neox": (tiny_neox, ["query_key_value"]),
}


@torch.no_grad()
def perturb(model, seed: int = 7, scale: float = 0.1) -> None:
    """Give trainable tensors non-trivial values, as after training: add ``scale`` x N(0, 1) noise,
    drawn from ``seed``. ``model``: a module (its parameters that require grad, in name order,
    so only the active adapter's) or a list of parameters (those, in that order)."""
    if isinstance(model, torch.nn.Module):
        params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
    else:
        params = list(model)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def peft_twins(make_base, config_of, seed: int = 1, scale: float = 0.1):
    """The same adapter in Hugging Face PEFT and in peftkit, in eval mode: PEFT's on
    ``make_base()`` with ``config_of(peft)``, perturbed, its weights copied into peftkit's on a
    fresh ``make_base()`` with ``config_of(peftkit)`` (the wraps' warnings silenced)."""
    import peft
    import peftkit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_base(), config_of(peft))
        ours = peftkit.get_peft_model(make_base(), config_of(peftkit))
    perturb(theirs, seed, scale)
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs.eval(), ours.eval()


def inputs_for(model, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """A batch of model inputs (decoder inputs too for encoder-decoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, seq // 2), generator=g)
    return out


def output_of(model, batch) -> torch.Tensor:
    """The model's main output tensor (logits)."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


class _BlockDiagonal:
    """Stand-in for PEFT's CUDA ``FastBlockDiag``: (N, D, b, b) -> (N, D b, D b)."""

    @staticmethod
    def apply(blocks):
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


@pytest.fixture
def peft_boft_everywhere(monkeypatch):
    """PEFT computes BOFT with more than one butterfly factor only through its CUDA extension (on
    a CPU it silently falls back to one factor). This gives PEFT a stand-in for that extension's
    block-diagonal kernel (``torch.block_diag``), so PEFT's own permutations and products run on
    this machine and comparisons cover every factor count."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", _BlockDiagonal)
    warnings.filterwarnings("ignore", message=".*(oft_block_size|does not divide).*")


@pytest.fixture
def tmp_adapter_dir(tmp_path):
    return str(tmp_path / "adapter")
