"""Atomic writes and safe reads of adapter files.

Every file is written beside its destination and moved into place with ``os.replace`` (atomic
on POSIX and Windows), so an interrupted save leaves either the old file or the new one, never a
truncated mix. Reads never execute code from a file: safetensors first, and the legacy
``adapter_model.bin`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """An adapter file that cannot be used; the message names the file and the problem."""


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; saved adapters are shareable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    _atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` as safetensors to ``path`` atomically."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = save(data, metadata=metadata or {"format": "pt"})
    _atomic(path, lambda fh: fh.write(blob))


def load_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Read the adapter weights in ``folder`` (safetensors, else a weights-only .bin)."""
    st = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st):
        from safetensors import safe_open

        try:  # one owned, writable tensor per key (a loader may adopt it as a parameter's storage)
            with safe_open(st, framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:
            raise CheckpointError(
                f"{st} is not a readable safetensors file ({type(e).__name__}: {e}). It may be "
                "truncated or corrupt; save the adapter again. The model was not changed."
            ) from None
    legacy = os.path.join(folder, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{legacy} could not be read as a weights-only PyTorch file ({e}). peftkit never "
                "unpickles arbitrary objects; convert it to safetensors with the tool that wrote it."
            ) from None
    raise FileNotFoundError(f"No {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {folder!r}.")
