"""The CLI checks its optional packages before any work and names the extra; the plot never loses
a run; the converted default model is cached by content. Missing packages are simulated by
``sys.modules[name] = None`` (what ``import name`` and ``find_spec`` then treat as absent)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from peftkit import models
from peftkit.cli import MissingExtraError, check_extras, main
from test_train_data import tiny_chat_model, write_jsonl

FAST = ["--threads", "1", "--batch-size", "4", "--log-every", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(8)])


@pytest.mark.parametrize("missing", ["matplotlib", "accelerate"])
def test_train_refuses_before_any_work_and_names_the_extra(missing, model_dir, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", data, "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}" in err and "pip install 'peftkit[train]'" in err
    assert not out.exists()  # nothing loaded, nothing trained


def test_export_needs_gguf(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r"gguf \(writing GGUF files\).*peftkit\[train\]"):
        check_extras("export", ["--adapter", "a", "--gguf", "b.gguf"])


def test_yaml_config_needs_pyyaml(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingExtraError, match="yaml"):
        check_extras("train", ["--config", "run.yaml", "--model", "some-folder"])
    check_extras("train", ["--config", "run.json", "--model", "some-folder"])  # JSON needs nothing


def test_default_model_needs_gguf_only_until_it_is_converted(tmp_path, monkeypatch):
    gguf_file = tmp_path / "pkg" / "Tiny.Q4.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(models, "default_gguf", lambda: str(gguf_file))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)
    for cmd in ("train", "generate", "eval", "merge"):
        with pytest.raises(MissingExtraError, match="gguf"):
            check_extras(cmd, [] if cmd == "train" else ["--adapter", "x", "--model", "smollm2"])
    check_extras("generate", ["--adapter", "x"])  # the adapter's recorded base: a converted folder
    with pytest.raises(MissingExtraError, match="gguf"):
        check_extras("train", ["--model", "other.gguf"])
    cached = models._cached_folder(str(gguf_file))
    os.makedirs(cached)
    open(os.path.join(cached, "config.json"), "w").close()
    check_extras("train", [])  # converted once: gguf no longer needed
    check_extras("generate", ["--adapter", "x", "--model", "smollm2"])


def test_conversion_cache_is_keyed_on_content_not_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "one" / "M.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + b"x" * 5000)
    b = tmp_path / "two" / "M.gguf"  # a fresh install of the same package: same bytes, new mtime
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, (1_000_000_000, 1_000_000_000))
    assert models._cached_folder(str(a)) == models._cached_folder(str(b))
    b.write_bytes(b"GGUF" + b"y" * 5000)  # another file at the same path
    assert models._cached_folder(str(a)) != models._cached_folder(str(b))


def test_plot_failure_is_a_warning_after_adapter_and_metrics(model_dir, data, tmp_path, monkeypatch, capsys):
    from peftkit.train import loop

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(loop, "plot_losses", broken)
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", data, "-o", str(out), *FAST]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not (out / "loss.png").exists()
    assert "warning: loss.png not written (OSError: No space left on device)" in capsys.readouterr().out
