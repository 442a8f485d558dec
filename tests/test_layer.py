"""LoRALayer semantics and the seeds' toy program."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from torch import nn

from lora_kernels import LoRALayer
from lora_kernels.demo import main, train
from lora_kernels.reference import lora_linear_reference


def test_seed_program_counts_and_training(capsys):
    """The seeds' program, unchanged, on our layer: 296 of 946, losses finite and falling."""
    main([])
    out = capsys.readouterr().out
    assert "Trainable parameters: 296" in out
    assert "Total parameters: 946" in out
    assert "Backend: torch" in out
    assert out.count("Loss:") == 10

    torch.manual_seed(42)
    frozen_before = LoRALayer(64, 10, rank=4).linear.weight.clone()
    model, losses = train(log=lambda *_: None)
    assert len(losses) == 10
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert torch.equal(model.linear.weight, frozen_before)  # the frozen weight never moved
    assert model.linear.weight.grad is None and model.linear.bias.grad is None


def test_seed_layer_attributes_and_forward():
    """The seeds' attributes and formula hold on our layer."""
    torch.manual_seed(0)
    layer = LoRALayer(64, 10, rank=4, init="seed")
    assert isinstance(layer.linear, nn.Linear)
    assert layer.lora_A.shape == (64, 4) and layer.lora_B.shape == (4, 10)
    assert layer.scaling == 1.0
    assert not layer.linear.weight.requires_grad and not layer.linear.bias.requires_grad
    x = torch.randn(32, 64)
    seeds = layer.linear(x) + layer.scaling * (x @ layer.lora_A @ layer.lora_B)
    assert_close("y", layer(x), seeds, 1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 1, 3)])
def test_layer_matches_float64_reference(bias, lead):
    torch.manual_seed(1)
    layer = LoRALayer(33, 17, rank=7, alpha=14.0, bias=bias, init="seed")
    layer64 = LoRALayer(33, 17, rank=7, alpha=14.0, bias=bias, dtype=torch.float64)
    layer64.load_state_dict(layer.state_dict())
    x = torch.randn(*lead, 33, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    dy = torch.randn(*lead, 17)
    layer(x).backward(dy)
    w, b = layer64.linear.weight, layer64.linear.bias
    lora_linear_reference(x64, w, b, layer64.lora_A, layer64.lora_B, 2.0).backward(dy.double())
    assert_close("dx", x.grad, x64.grad, 1e-5)
    assert_close("dA", layer.lora_A.grad, layer64.lora_A.grad, 1e-5)
    assert_close("dB", layer.lora_B.grad, layer64.lora_B.grad, 1e-5)
    assert layer.linear.weight.grad is None


def test_unfrozen_weight_and_bias_get_gradients():
    torch.manual_seed(2)
    layer = LoRALayer(16, 8, rank=2, init="seed", dtype=torch.float64)
    layer.linear.requires_grad_(True)
    x = torch.randn(5, 16, dtype=torch.float64)
    layer(x).sum().backward()
    w, b = (
        layer.linear.weight.detach().requires_grad_(),
        layer.linear.bias.detach().requires_grad_(),
    )
    lora_linear_reference(x, w, b, layer.lora_A.detach(), layer.lora_B.detach()).sum().backward()
    assert_close("dW", layer.linear.weight.grad, w.grad, 1e-12)
    assert_close("db", layer.linear.bias.grad, b.grad, 1e-12)


@pytest.mark.parametrize(
    "alpha, use_rslora, expected",
    [(None, False, 1.0), (8, False, 2.0), (8, True, 4.0), (16.0, False, 4.0), (None, True, 1.0)],
)
def test_scaling(alpha, use_rslora, expected):
    assert LoRALayer(8, 8, rank=4, alpha=alpha, use_rslora=use_rslora).scaling == expected


def test_init_lora_starts_at_the_frozen_linear():
    torch.manual_seed(3)
    layer = LoRALayer(100, 20, rank=8)
    assert torch.equal(layer.lora_B, torch.zeros(8, 20))
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) over in_features, as peft
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
    x = torch.randn(4, 100)
    assert torch.equal(layer(x), layer.linear(x))


def test_init_gaussian_and_seed():
    torch.manual_seed(4)
    g = LoRALayer(400, 30, rank=10, init="gaussian")
    assert torch.equal(g.lora_B, torch.zeros(10, 30))
    assert abs(g.lora_A.std().item() - 0.1) < 0.01
    s = LoRALayer(400, 30, rank=10, init="seed")
    assert abs(s.lora_A.std().item() - 1.0) < 0.05 and abs(s.lora_B.std().item() - 1.0) < 0.1


def test_factory_kwargs():
    layer = LoRALayer(8, 4, rank=2, dtype=torch.float64, device="cpu", bias=False)
    assert layer.linear.bias is None
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


def test_from_linear_shares_storage_and_freezes():
    linear = nn.Linear(12, 6, dtype=torch.float64)
    layer = LoRALayer.from_linear(linear, rank=3, alpha=6)
    assert layer.linear is linear
    assert layer.linear.weight.data_ptr() == linear.weight.data_ptr()
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.shape == (12, 3)
    assert layer.scaling == 2.0 and layer.in_features == 12 and layer.out_features == 6


def test_linear_attributes_read_through():
    """Code that reads `.weight` / `.bias` off the nn.Linear it replaced keeps working (T5's
    `self.wo.weight.dtype`); they are not extra parameters or state-dict entries."""
    layer = LoRALayer(12, 6, rank=2)
    assert layer.weight is layer.linear.weight and layer.bias is layer.linear.bias
    assert LoRALayer(12, 6, bias=False).bias is None
    assert set(layer.state_dict()) == {"linear.weight", "linear.bias", "lora_A", "lora_B"}
    assert len(list(layer.parameters())) == 4


def test_weight_and_bias_assignment_gets_a_clear_error():
    layer = LoRALayer(12, 6, rank=2)
    weight = layer.linear.weight
    for name, value in [
        ("weight", nn.Parameter(torch.zeros(6, 12))),  # nn.Module answered with a KeyError
        ("weight", torch.zeros(6, 12)),
        ("bias", None),
    ]:
        with pytest.raises(AttributeError, match=f"LoRALayer.{name} is read-only.*layer.linear"):
            setattr(layer, name, value)
    assert layer.linear.weight is weight
    layer.linear.weight = nn.Parameter(torch.zeros(6, 12))  # the way the message names
    assert layer.weight is layer.linear.weight


def test_torchscript_refused_trace_works():
    torch.manual_seed(3)
    layer = LoRALayer(12, 6, rank=2, init="seed")
    for module in (layer, nn.Sequential(nn.Linear(12, 12), layer)):  # submodules too
        with pytest.raises(RuntimeError, match="TorchScript.*torch.compile or torch.export"):
            torch.jit.script(module)
    x = torch.randn(5, 12)
    with pytest.warns(torch.jit.TracerWarning):  # validation reads shapes: traced as constants
        traced = torch.jit.trace(layer, x)
    assert torch.equal(traced(x), layer(x))


@pytest.mark.inductor  # torch.export imports inductor
def test_export_matches_eager():
    torch.manual_seed(3)
    layer = LoRALayer(12, 6, rank=2, init="seed")
    x = torch.randn(5, 12)
    exported = torch.export.export(layer, (x,))
    assert torch.equal(exported.module()(x), layer(x))


def test_scalar_input_names_in_features():
    with pytest.raises(ValueError, match="in_features=64.*scalar"):
        LoRALayer(64, 10)(torch.tensor(1.0))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_unmerge_round_trip(dtype, tol):
    torch.manual_seed(5)
    layer = LoRALayer(24, 12, rank=4, alpha=8, init="seed", dtype=dtype)
    x = torch.randn(6, 24, dtype=dtype)
    weight0 = layer.linear.weight.clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert_close("merged y", layer(x), y0.double(), tol)
    assert_close(
        "merged W",
        layer.linear.weight,
        (weight0.double() + 2.0 * (layer.lora_A.double() @ layer.lora_B.double()).T),
        tol,
    )
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close("unmerged W", layer.linear.weight, weight0.double(), tol)
    assert_close("unmerged y", layer(x), y0.double(), tol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_refuses_non_finite_and_leaves_weight():
    layer = LoRALayer(8, 4, rank=2, init="seed", dtype=torch.float16)
    with torch.no_grad():
        layer.lora_A.fill_(200.0)
        layer.lora_B.fill_(200.0)  # 2 * 200 * 200 = 80000 > float16 max
    before = layer.linear.weight.clone()
    with pytest.raises(RuntimeError, match="non-finite in torch.float16"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.linear.weight, before)


def test_state_dict_keys_and_round_trip():
    layer = LoRALayer(8, 4, rank=2, init="seed")
    assert sorted(layer.state_dict()) == ["linear.bias", "linear.weight", "lora_A", "lora_B"]
    other = LoRALayer(8, 4, rank=2)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(other(x), layer(x))


def test_extra_repr():
    layer = LoRALayer(64, 10, rank=4, alpha=8, dropout=0.1)
    assert layer.extra_repr() == (
        "in_features=64, out_features=10, rank=4, scaling=2, dropout=0.1, merged=False"
    )
    assert "(linear): Linear(in_features=64, out_features=10, bias=True)" in repr(layer)


def test_dropout_only_in_training():
    torch.manual_seed(6)
    layer = LoRALayer(32, 16, rank=4, dropout=0.5, init="seed")
    x = torch.randn(10, 32)
    plain = lora_linear_reference(
        x, layer.linear.weight, layer.linear.bias, layer.lora_A, layer.lora_B
    )
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert_close("eval", layer(x), plain.double(), 1e-5)
    layer.train()
    assert not torch.allclose(layer(x), plain)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), y1)  # torch.manual_seed reproduces the mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_output_takes_in_place_ops(backend, lead):
    """As nn.Linear's: `y += residual`, `relu_` on the output work, with the right gradients
    (autograd refuses in-place ops on a custom Function's output that is a view made inside it)."""
    from helpers import KERNEL_DEVICE

    from lora_kernels import lora_linear

    dev = "cpu" if backend == "torch" else KERNEL_DEVICE
    gen = torch.Generator().manual_seed(11)
    w, bias = torch.randn(8, 16, generator=gen).to(dev), torch.randn(8, generator=gen).to(dev)
    leaves = [
        torch.randn(*lead, 16, generator=gen).to(dev).requires_grad_(True),
        torch.randn(16, 3, generator=gen).to(dev).requires_grad_(True),
        torch.randn(3, 8, generator=gen).to(dev).requires_grad_(True),
    ]
    residual = torch.randn(*lead, 8, generator=gen).to(dev)
    y = lora_linear(leaves[0], w, bias, leaves[1], leaves[2], 0.5, backend=backend)
    assert y.shape == (*lead, 8) and not y._is_view()
    y += residual
    y.relu_()
    y.square().sum().backward()

    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    y_ref = lora_linear_reference(ref[0], w.double(), bias.double(), ref[1], ref[2], 0.5)
    torch.relu(y_ref + residual.double()).square().sum().backward()
    for name, got, want in zip(("x", "lora_A", "lora_B"), leaves, ref):
        assert_close(f"d{name}", got.grad, want.grad, 1e-4)


def test_inplace_activation_after_the_layer_trains():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALayer(16, 32, rank=4, init="seed"), nn.ReLU(inplace=True))
    model(torch.randn(2, 7, 16)).sum().backward()
    assert model[0].lora_A.grad is not None and model[0].lora_A.grad.abs().sum() > 0
