"""Bad input: a clear exception naming what is wrong, raised before anything is computed."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import LoRALayer, lora_linear


def _args(**over):
    args = {
        "x": torch.randn(3, 8),
        "weight": torch.randn(5, 8),
        "bias": torch.randn(5),
        "lora_A": torch.randn(8, 2),
        "lora_B": torch.randn(2, 5),
    }
    kwargs = {k: over.pop(k) for k in ("scaling", "dropout_p", "seed", "backend") if k in over}
    args.update(over)
    return args, kwargs


FUNCTION_CASES = [
    # (overrides, exception, words that must appear in the message)
    ({"x": torch.randn(3, 7)}, ValueError, ["last dimension 7", "in_features=8"]),
    ({"x": torch.tensor(1.0)}, ValueError, ["in_features=8", "scalar"]),
    ({"x": [[1.0] * 8]}, TypeError, ["x must be a torch.Tensor", "list"]),
    ({"weight": torch.randn(5, 8, 1)}, ValueError, ["weight must be 2-D", "(5, 8, 1)"]),
    ({"lora_A": torch.randn(9, 2)}, ValueError, ["lora_A", "(9, 2)", "in_features=8"]),
    ({"lora_B": torch.randn(2, 6)}, ValueError, ["lora_B", "(2, 6)", "out_features=5"]),
    ({"lora_B": torch.randn(3, 5)}, ValueError, ["rank mismatch", "rank 2", "rank 3"]),
    (
        {"lora_A": torch.randn(8, 0), "lora_B": torch.randn(0, 5)},
        ValueError,
        ["rank must be a positive int"],
    ),
    ({"bias": torch.randn(4)}, ValueError, ["bias has 4 elements", "out_features=5"]),
    ({"bias": torch.randn(5, 1)}, ValueError, ["bias must be 1-D"]),
    (
        {"weight": torch.randn(5, 8, dtype=torch.float64)},
        TypeError,
        ["dtype mismatch", "torch.float32", "weight is torch.float64"],
    ),
    (
        {"bias": torch.randn(5, dtype=torch.float64)},
        TypeError,
        ["dtype mismatch", "x is torch.float32", "bias is torch.float64"],
    ),
    (
        {"lora_B": torch.randn(2, 5).half()},
        TypeError,
        ["dtype mismatch", "lora_A is torch.float32", "lora_B is torch.float16", "one dtype"],
    ),
    (
        {"lora_A": torch.ones(8, 2, dtype=torch.int64), "lora_B": torch.ones(2, 5).long()},
        TypeError,
        ["lora_A and lora_B have dtype torch.int64", "supported"],
    ),
    ({"x": torch.ones(3, 8, dtype=torch.int64)}, TypeError, ["torch.int64", "supported"]),
    (
        {"lora_A": torch.randn(8, 2, device="meta")},
        ValueError,
        ["device mismatch", "cpu", "meta"],
    ),
    ({"backend": "cuda"}, ValueError, ["unknown backend 'cuda'", "auto", "triton", "torch"]),
    ({"dropout_p": 1.0}, ValueError, ["dropout_p must be in [0, 1)", "1.0"]),
    ({"dropout_p": -0.1}, ValueError, ["dropout_p must be in [0, 1)"]),
    ({"scaling": "2"}, TypeError, ["scaling must be a real number", "str"]),
    ({"seed": 1.5}, TypeError, ["seed must be an int"]),
    ({"seed": -1}, ValueError, ["seed must be in"]),
]


@pytest.mark.parametrize("over, exc, words", FUNCTION_CASES)
def test_function_rejects(over, exc, words):
    args, kwargs = _args(**over)
    with pytest.raises(exc) as info:
        lora_linear(*args.values(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, _ = _args()
    with pytest.raises(ValueError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        lora_linear(*args.values(), backend="triton")


def test_validation_happens_before_any_computation():
    """A bad call leaves no autograd history and touches no input."""
    args, _ = _args(lora_B=torch.randn(3, 5))
    args["x"].requires_grad_(True)
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError):
        lora_linear(*args.values())
    assert args["x"].grad is None
    for k in args:
        assert torch.equal(args[k], before[k])


LAYER_CASES = [
    ({"rank": 0}, ValueError, ["rank must be a positive int", "0"]),
    ({"rank": 2.5}, ValueError, ["rank must be a positive int", "2.5"]),
    ({"rank": True}, ValueError, ["rank must be a positive int"]),
    ({"dropout": 1.0}, ValueError, ["dropout must be in [0, 1)"]),
    ({"dropout": -0.5}, ValueError, ["dropout must be in [0, 1)"]),
    ({"dropout": "0.1"}, TypeError, ["dropout must be a real number"]),
    ({"init": "xavier"}, ValueError, ["unknown init 'xavier'", "lora", "gaussian", "seed"]),
    ({"alpha": "16"}, TypeError, ["alpha must be a real number"]),
]


@pytest.mark.parametrize("kwargs, exc, words", LAYER_CASES)
def test_layer_rejects(kwargs, exc, words):
    with pytest.raises(exc) as info:
        LoRALayer(8, 5, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_layer_rejects_wrong_input_width():
    layer = LoRALayer(64, 10, rank=4)
    with pytest.raises(ValueError, match="last dimension 32 but the layer has in_features=64"):
        layer(torch.randn(2, 32))


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        LoRALayer.from_linear(torch.nn.Conv1d(3, 3, 1))
