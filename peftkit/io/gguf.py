"""Export a LoRA adapter to llama.cpp's GGUF adapter format.

llama.cpp applies a LoRA adapter at load time (``llama-cli -m base.gguf --lora adapter.gguf``)
as ``W x + scale * (alpha / r) * B (A x)``, with ``r`` read from each tensor's shape. The file:

* metadata ``general.architecture`` (the base's, e.g. ``llama``), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
* for every adapted base tensor ``<name>`` (llama.cpp's own names, ``blk.3.attn_q.weight``):
  ``<name>.lora_a`` = A (r x in) and ``<name>.lora_b`` = B (out x r), in numpy order (GGUF stores
  the reversed ``ne`` order, so ``lora_a`` reads as ``[in, r]`` in llama.cpp);
* ``token_embd.weight.lora_a`` is A transposed (num_embeddings x r), as llama.cpp looks rows up
  in it directly. Only for bases with their own ``output.weight``: where the output layer is tied
  to the embeddings (SmolLM2), llama.cpp also runs the embedding LoRA as a matmul on the output
  and aborts, so export refuses it.

Llama-family models: llama.cpp's converter permutes the rows of ``W_q`` and ``W_k`` so that its
rotary embedding can rotate adjacent pairs instead of halves. Per head (``n_head`` for q,
``n_head_kv`` for k) of size ``d``, new row ``2j + k`` is old row ``k * d/2 + j`` (k in {0, 1},
j < d/2). Since ``P (B A) = (P B) A``, only ``lora_b`` is permuted.

One ``adapter.lora.alpha`` cannot express rsLoRA's ``alpha / sqrt(r)`` or per-module
``alpha_pattern``; where a tensor's real scale differs from ``alpha / r``, that factor is folded
into its ``lora_b`` so llama.cpp computes the same update.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any, Optional, Union

import numpy as np
import torch

from .checkpoint import load_tensors
from ..core.tied import EMBEDDING_LAYER_NAMES
from .peft_format import PREFIX

_PERMUTED_ARCHS = ("llama",)  # llama.cpp's converter permutes Q/K for these


class GGUFExportError(ValueError):
    """The adapter cannot be written as a llama.cpp LoRA; the message says why and what to do."""


def permute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: per head, interleave the two rotary halves (see module doc)."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise GGUFExportError(f"cannot permute {out} rows into {n_head} heads of even size")
    d = out // n_head
    return rows.reshape(n_head, 2, d // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _hparams(base_gguf: Optional[str], base_config: Any, adapter_cfg: dict) -> dict:
    """arch, n_layer, n_head, n_head_kv (and the base tensors' shapes when a GGUF is given)."""
    if base_gguf is not None:
        import gguf

        reader = gguf.GGUFReader(base_gguf)

        def field(key):
            f = reader.fields.get(key)
            return None if f is None else f.contents()

        arch = field("general.architecture")
        if arch is None:
            raise GGUFExportError(f"{base_gguf} has no general.architecture; is it a llama.cpp model file?")
        shapes = {t.name: tuple(int(s) for s in t.shape) for t in reader.tensors}  # ne order: (in, out)
        return {"arch": arch, "n_layer": field(f"{arch}.block_count"), "n_head": field(f"{arch}.attention.head_count"),
                "n_head_kv": field(f"{arch}.attention.head_count_kv") or field(f"{arch}.attention.head_count"),
                "shapes": shapes, "tied": "output.weight" not in shapes}
    cfg = base_config
    if cfg is None:
        folder = adapter_cfg.get("base_model_name_or_path") or ""
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise GGUFExportError(
                "Need the base model's shape to name and permute tensors: pass base_gguf= (the llama.cpp "
                f"base file) or base_config= (a transformers config or its folder); the adapter's "
                f"base_model_name_or_path={folder!r} is not a local folder with config.json.")
        cfg = folder
    if isinstance(cfg, str):
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    arch = {"llama": "llama", "mistral": "llama"}.get(cfg.get("model_type"), cfg.get("model_type"))
    n_head = cfg.get("num_attention_heads")
    return {"arch": arch, "n_layer": cfg.get("num_hidden_layers"), "n_head": n_head,
            "n_head_kv": cfg.get("num_key_value_heads") or n_head, "shapes": None,
            "tied": bool(cfg.get("tie_word_embeddings", False))}


def _name_map(arch: str, n_layer: int):
    import gguf

    match = [a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch]
    if not match:
        raise GGUFExportError(f"llama.cpp has no architecture {arch!r}; cannot name the tensors.")
    return gguf.get_tensor_name_map(match[0], int(n_layer))


_EMBEDDINGS = "|".join(EMBEDDING_LAYER_NAMES)  # the base's token embeddings (save_embedding_layers)


def _lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if re.fullmatch(rf".+\.({_EMBEDDINGS})\.base_layer\.weight", key):
            continue  # the base's own weight of an adapted embedding (save_embedding_layers): in the base GGUF
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", key)
        if m is None and re.fullmatch(rf".+\.({_EMBEDDINGS})\.weight", key):
            raise GGUFExportError(
                f"{key!r}: the adapter carries the base's token embeddings (saved with save_embedding_layers after "
                "resizing the vocabulary); a llama.cpp adapter cannot change the base's vocabulary. Merge the "
                "adapter into the resized base (merge_and_unload) and convert that model instead.")
        if m is None:
            raise GGUFExportError(
                f"{key!r} is not a LoRA A/B tensor; llama.cpp adapters hold only LoRA pairs (no DoRA "
                "magnitudes, trained biases or modules_to_save). Merge those into the base instead.")
        path = m.group(1)[len(PREFIX):] if m.group(1).startswith(PREFIX) else m.group(1)
        pairs.setdefault(path, {})["A" if "A" in m.group(2) else "B"] = t
        pairs[path]["embedding"] = m.group(2).startswith("lora_embedding")
    return pairs


def export_gguf(adapter_dir: str, out_path: str, base_gguf: Optional[str] = None,
                base_config: Union[None, str, dict, Any] = None, dtype: str = "f32") -> dict[str, Any]:
    """Write the LoRA adapter saved in ``adapter_dir`` as a llama.cpp GGUF adapter at ``out_path``.

    ``base_gguf``: the llama.cpp base model file (gives architecture and head counts, and every
    tensor is checked against its shape); else ``base_config`` (a transformers config, a dict or a
    folder/``config.json``), else the adapter's ``base_model_name_or_path`` if it is a local folder.
    ``dtype``: ``"f32"`` or ``"f16"``. The file is written beside ``out_path`` and renamed into
    place. Returns a summary: ``{"arch", "alpha", "tensors": {gguf name: shape}}``.
    """
    import gguf

    from ..config import PeftConfig

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        raw = json.load(fh)
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise GGUFExportError(f"llama.cpp adapters are LoRA only; {adapter_dir} holds {raw.get('peft_type')!r}.")
    cfg = PeftConfig.from_pretrained(adapter_dir)
    if cfg.use_dora:
        raise GGUFExportError("DoRA adapters have no llama.cpp form; merge them into the base "
                              "(merge_and_unload) and convert the merged model instead.")
    if dtype not in ("f32", "f16"):
        raise GGUFExportError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    hp = _hparams(base_gguf, base_config, raw)
    names = _name_map(hp["arch"], hp["n_layer"])
    np_dtype = np.float32 if dtype == "f32" else np.float16
    alpha = float(cfg.lora_alpha)
    out: dict[str, np.ndarray] = {}
    for path, pair in sorted(_lora_pairs(load_tensors(adapter_dir)).items()):
        a, b = pair["A"].float(), pair["B"].float()
        gname = names.get_name(path + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise GGUFExportError(f"{path} has no llama.cpp tensor in architecture {hp['arch']!r}; "
                                  "exclude it from target_modules to export this adapter.")
        r, alpha_t = cfg.rank_and_alpha(path)
        r = a.shape[0]
        scale = alpha_t / math.sqrt(r) if cfg.use_rslora else alpha_t / r
        b = b * (scale / (alpha / r))  # llama.cpp applies alpha / r; fold in any difference
        if pair["embedding"]:
            if gname == "token_embd.weight" and hp["tied"]:
                raise GGUFExportError(
                    f"{path} is adapted, but the base ties its output layer to the token embeddings (no "
                    "output.weight in the GGUF, or tie_word_embeddings in the config). llama.cpp then applies "
                    "the embedding LoRA to the output projection as well and aborts (ggml_can_mul_mat). Leave "
                    "embed_tokens out of target_modules, or merge the adapter into the base and convert that.")
            a = a.T  # llama.cpp looks embedding rows up in lora_a: (num_embeddings, r)
        elif cfg.fan_in_fan_out:
            raise GGUFExportError("fan_in_fan_out (GPT-2 Conv1D) adapters are not supported for GGUF export.")
        if hp["arch"] in _PERMUTED_ARCHS and gname.endswith(("attn_q.weight", "attn_k.weight")):
            b = permute_qk(b, hp["n_head"] if gname.endswith("attn_q.weight") else hp["n_head_kv"])
        if hp["shapes"] is not None:
            if gname not in hp["shapes"]:
                raise GGUFExportError(f"{gname} (from {path}) is not in {base_gguf}; the adapter was trained "
                                      "on another model (or that layer is tied/absent in the GGUF).")
            in_f, out_f = hp["shapes"][gname]
            got = (b.shape[0], a.shape[0] if pair["embedding"] else a.shape[1])
            want = (in_f, out_f) if pair["embedding"] else (out_f, in_f)
            if got != want:
                raise GGUFExportError(f"{path}: adapter is {got[0]}x{got[1]} but {gname} in {base_gguf} needs "
                                      f"{want[0]}x{want[1]}; wrong base model.")
        out[gname + ".lora_a"] = a.contiguous().numpy().astype(np_dtype)
        out[gname + ".lora_b"] = b.contiguous().numpy().astype(np_dtype)
    if not out:
        raise GGUFExportError(f"{adapter_dir} holds no LoRA tensors.")
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out_path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, hp["arch"])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, arr in out.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"arch": hp["arch"], "alpha": alpha, "tensors": {k: tuple(v.shape) for k, v in out.items()}}


def register(subparsers) -> None:
    """Add ``peftkit export`` (peftkit/cli.py's registration hook)."""
    p = subparsers.add_parser("export", help="write a LoRA adapter as a llama.cpp GGUF adapter",
                              description="Export a LoRA adapter folder to llama.cpp's GGUF adapter format "
                                          "(use it with `llama-cli -m base.gguf --lora out.gguf`).")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights)")
    p.add_argument("--gguf", required=True, help="output .gguf file")
    p.add_argument("--base-gguf", default=None,
                   help="the llama.cpp base model file (default: the SmolLM2 GGUF when the adapter was "
                        "trained on peftkit's default model, else the adapter's base folder config)")
    p.add_argument("--base-config", default=None, help="base model folder or config.json (instead of --base-gguf)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    p.set_defaults(func=_run)


def _run(args) -> int:
    base_gguf, base_config = args.base_gguf, args.base_config
    if base_gguf is None and base_config is None:
        from ..models import cache_dir, default_gguf

        with open(os.path.join(args.adapter, "adapter_config.json"), encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path") or ""
        if base == "smollm2" or (base and os.path.abspath(base).startswith(os.path.abspath(cache_dir()))
                                 and os.path.basename(base.rstrip("/")).startswith(
                                     os.path.splitext(os.path.basename(default_gguf()))[0])):
            base_gguf = default_gguf()  # trained on the default model: its GGUF is the llama.cpp base
    summary = export_gguf(args.adapter, args.gguf, base_gguf=base_gguf, base_config=base_config, dtype=args.dtype)
    print(f"wrote {args.gguf}: {len(summary['tensors'])} tensors, arch {summary['arch']}, alpha {summary['alpha']:g}")
    return 0
