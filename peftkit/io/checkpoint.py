"""Atomic writes and safe reads of adapter files.

Every file is written beside its destination and moved into place with ``os.replace`` (atomic
on POSIX and Windows), so an interrupted save leaves either the old file or the new one, never a
truncated mix. Reads never execute code from a file: safetensors first, and the legacy
``adapter_model.bin`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from typing import Optional

import torch

from ..errors import PeftError

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class CheckpointError(PeftError, ValueError):
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


def atomic_torch_save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` with ``torch.save`` to ``path`` atomically (PEFT's ``adapter_model.bin``).

    Each tensor is a contiguous CPU copy: ``torch.save`` writes a view's whole storage, and a
    packed adapter's tensors are views of one buffer. The file holds only tensors, so
    ``torch.load(weights_only=True)`` reads it (here and in PEFT).
    """
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(path, lambda fh: torch.save(data, fh))


def save_weights(folder: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> str:
    """Write an adapter's tensors into ``folder``: ``adapter_model.safetensors``, or with
    ``safe_serialization=False`` ``adapter_model.bin``, as PEFT names them; returns the path.

    Once the new file is in place, the other format's file from an earlier save is removed:
    readers (peftkit's and PEFT's) take a safetensors file first, so a stale one would be read
    instead of a new ``.bin``, and a stale ``.bin`` would describe other weights.
    """
    name, other = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if safe_serialization else (LEGACY_WEIGHTS_NAME, WEIGHTS_NAME)
    path = os.path.join(folder, name)
    (atomic_save_tensors if safe_serialization else atomic_torch_save)(path, tensors)
    stale = os.path.join(folder, other)
    if os.path.isfile(stale):
        os.unlink(stale)
    return path


class AdapterTensors(dict):
    """Name -> tensor, as read from one adapter file.

    ``buffer`` is the one 1-D uint8 tensor that holds every tensor's bytes (each tensor is a
    slice of it), or None when the tensors were read another way.
    :func:`~peftkit.io.peft_format.apply_plan` adopts that buffer as the parameters' storage when
    every tensor in it becomes a parameter.
    """

    buffer: Optional[torch.Tensor] = None


#: safetensors' dtype names (https://huggingface.co/docs/safetensors, "Format")
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def tensors_in_buffer(buffer: torch.Tensor, layout: list, shared: bool = False) -> dict:
    """Tensors that live in ``buffer`` (a 1-D uint8 tensor), one per (key, dtype, shape, byte
    offset) in ``layout``; the buffer is one allocation, freed with the last of its tensors.

    ``shared=False``: each tensor gets a storage of its own, a slice of the buffer's, so no two
    share a storage (``safetensors.torch.save_file`` and similar tools refuse shared storages).
    ``shared=True``: plain views of the buffer's one storage, which saves a storage object per
    tensor (about 1.5% of a q,v LoRA r=8 adapter's bytes); for frozen adapters.
    """
    storage = buffer.untyped_storage()
    base = buffer.storage_offset()
    out = {}
    for key, dtype, shape, offset in layout:
        size = math.prod(shape) * dtype.itemsize
        start = base + offset
        if start % dtype.itemsize:  # a writer that did not align this tensor: give it its own copy
            out[key] = buffer[offset:offset + size].clone().view(dtype).reshape(shape)
        elif shared:
            out[key] = torch.empty(0, dtype=dtype, device=buffer.device).set_(storage, start // dtype.itemsize, shape)
        else:
            out[key] = torch.empty(0, dtype=dtype, device=buffer.device).set_(storage[start:start + size], 0, shape)
    return out


def _read_safetensors(path: str) -> Optional[AdapterTensors]:
    """Read a safetensors file into one buffer; None when it uses a dtype this reader lacks.

    The header (8-byte little-endian length, then JSON) is checked against the file before any
    tensor is made: known dtypes, sizes that match the shapes, and offsets that tile the payload
    with no gap or overlap, as the format requires.
    """
    with open(path, "rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, total - 8):
            raise ValueError(f"header length {n} does not fit in a file of {total} bytes")
        header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        payload = total - 8 - n
        layout, spans = [], []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"malformed entry for {name!r}")
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                return None  # the safetensors library reads it (see load_tensors)
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end <= payload:
                raise ValueError(f"bad shape or offsets for {name!r}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name!r}: {end - begin} bytes for shape {shape} of {info['dtype']}")
            layout.append((name, dtype, shape, begin))
            spans.append((begin, end))
        covered = 0
        for begin, end in sorted(spans):
            if begin != covered:
                raise ValueError("tensor data overlaps or leaves a gap")
            covered = end
        if covered != payload:
            raise ValueError(f"the tensors cover {covered} of the payload's {payload} bytes")
        buffer = torch.empty(payload, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < payload:
            got = fh.readinto(view[done:])
            if not got:
                raise ValueError("the file ended early")
            done += got
    out = AdapterTensors(tensors_in_buffer(buffer, layout))
    out.buffer = buffer
    return out


def load_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Read the adapter weights in ``folder`` (safetensors, else a weights-only .bin).

    A safetensors file is read with one allocation: its whole payload goes into one buffer and
    each tensor is a slice of it (:class:`AdapterTensors`), so a loaded adapter costs its own
    bytes and no per-tensor allocations, and does not keep the file mapped.
    """
    st = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            if sys.byteorder == "little":  # the format is little-endian; elsewhere the library converts
                tensors = _read_safetensors(st)
                if tensors is not None:
                    return tensors
            from safetensors import safe_open

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
