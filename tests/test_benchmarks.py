"""The scripts in benchmarks/ run (tiny sizes), so they never rot."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_memory_runs(capsys):
    assert load("saved_memory").main(["--tokens", "64", "--features", "32", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "torch path" in out and "Triton path" in out


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_memory_counts(dropout):
    """Ours keep x (64 x 32 bf16) and the 64 x 4 intermediate, with or without dropout."""
    rows = dict(load("saved_memory").measure(64, 32, 4, dropout))
    x_bytes = 64 * 32 * 2
    assert rows["lora_kernels, torch path (CPU, measured)"]["activations"] == x_bytes + 64 * 4 * 2
    assert rows["lora_kernels, Triton path (shapes, meta)"]["activations"] == x_bytes + 64 * 4 * 4
    peft = [r for name, r in rows.items() if name.startswith("peft") and r is not None]
    for r in peft:  # when peft is installed: its dropped copy of x
        assert r["activations"] == (2 * x_bytes if dropout else x_bytes) + 64 * 4 * 2
