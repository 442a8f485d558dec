"""DoRA's groundwork (issue 26): the factored weight norm against the merged weight's row
norms, and the float64 oracle ``dora_linear_reference`` against peft's own DoRA layer."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, seed_for
from torch import nn

from lora_kernels import dora
from lora_kernels.reference import dora_linear_reference, dora_weight_norm_reference

SHAPES = [(1, 1, 1), (17, 33, 3), (64, 48, 16), (5, 300, 7), (257, 31, 8)]  # (N, K, r)


def factors(n, k, r, dtype, gen):
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    lora_A = torch.randn(k, r, generator=gen, dtype=torch.float64).to(dtype) / k**0.5
    lora_B = torch.randn(r, n, generator=gen, dtype=torch.float64).to(dtype)
    return weight, lora_A, lora_B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("dtype", "adapter_dtype", "tol"),
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.float32, 1e-6),  # accumulated in float32
        (torch.float16, torch.float16, 1e-6),
    ],
)
def test_factored_norm_equals_the_merged_weights_row_norms(shape, dtype, adapter_dtype, tol):
    n, k, r = shape
    gen = torch.Generator().manual_seed(seed_for(shape, dtype))
    weight, lora_A, lora_B = factors(n, k, r, dtype, gen)
    lora_A, lora_B = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype)
    scaling = 0.7
    # The oracle on the same values, in float64. The factored form's rounding is relative to the
    # row's scale (||W_j||^2 + s^2 ||(A B)_j||^2), not to n_j^2, which can cancel far below it.
    w64, a64, b64 = weight.double(), lora_A.double(), lora_B.double()
    want = dora_weight_norm_reference(w64, a64, b64, scaling)
    scale = (w64 * w64).sum(1) + scaling**2 * ((a64 @ b64).T ** 2).sum(1)
    got = dora.weight_norm(weight, lora_A, lora_B, scaling)
    assert got.dtype == dora.accumulation_dtype(torch.promote_types(dtype, adapter_dtype))
    err = ((got.double() ** 2 - want**2).abs() / scale).max().item()
    assert err <= tol, f"n^2: error {err:.2e} of the row's scale > {tol:.0e}"
    cached = dora.weight_norm(weight, lora_A, lora_B, scaling, dora.base_row_norms_sq(weight))
    assert torch.equal(cached, got)


def test_factored_norm_reads_w_in_blocks_of_rows(monkeypatch):
    """Blocks smaller than W (here 3 rows of 50): the same norms, no (N, K) temporary."""
    gen = torch.Generator().manual_seed(1)
    weight, lora_A, lora_B = factors(20, 50, 4, torch.float64, gen)
    whole = dora.weight_norm(weight, lora_A, lora_B, 1.5)
    monkeypatch.setattr(dora, "BLOCK_ELEMS", 150)
    assert len(list(dora._row_blocks(weight, torch.float64))) == 7
    assert_close("blocked", dora.weight_norm(weight, lora_A, lora_B, 1.5), whole, 1e-14)
    assert_close("base", dora.base_row_norms_sq(weight), (weight * weight).sum(1), 1e-14)


def test_a_vanishing_merged_row_gives_zero_not_nan():
    weight = torch.zeros(3, 4, dtype=torch.float64)
    lora_A, lora_B = torch.eye(4, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    assert torch.equal(dora.weight_norm(weight, lora_A, lora_B, 1.0), torch.zeros(3).double())


# --- the oracle against peft's DoRA layer -------------------------------------------------------


class FixedMask(nn.Module):
    """A dropout whose mask is given: peft's DoRA layer then takes its dropout path (a base GEMM
    over the dropped input too), with a mask we can hand the reference."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1.0 - self.p)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_equals_peft_dora(dropout, bias):
    """Output and every gradient (x, A, B, magnitude) of peft's ``use_dora=True`` layer, in
    float32, to 1e-5 of the float64 oracle on the same values."""
    peft = pytest.importorskip("peft")

    torch.manual_seed(seed_for("dora", dropout, bias))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
        init_lora_weights=False,  # a nonzero B: the DoRA terms matter
    )  # fmt: skip
    model = peft.get_peft_model(nn.Sequential(nn.Linear(24, 12, bias=bias)), config)
    layer = model.base_model.model[0]
    base = layer.base_layer
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)  # m != n: c != 1
    x = torch.randn(2, 5, 24)
    mask = None
    if dropout:
        mask = (torch.rand(2, 5, 24) >= dropout).float()
        layer.lora_dropout["default"] = FixedMask(mask, dropout)
    layer.train()
    xs = x.clone().requires_grad_(True)
    y = layer(xs)
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    leaves = {
        "x": x.double(),
        "A": A.detach().t().double(),
        "B": B.detach().t().double(),
        "m": m.detach().double(),
    }
    for t in leaves.values():
        t.requires_grad_(True)
    b = None if base.bias is None else base.bias.detach().double()
    ref = dora_linear_reference(
        leaves["x"], base.weight.detach().double(), b, leaves["A"], leaves["B"], leaves["m"],
        layer.scaling["default"], dropout_mask=None if mask is None else mask.double(),
        dropout_p=dropout,
    )  # fmt: skip
    ref.backward(dy.double())
    assert_close("y", y, ref, 1e-5)
    assert_close("dx", xs.grad, leaves["x"].grad, 1e-5)
    assert_close("dA", A.grad.t(), leaves["A"].grad, 1e-5)
    assert_close("dB", B.grad.t(), leaves["B"].grad, 1e-5)
    assert_close("dm", m.grad, leaves["m"].grad, 1e-5)


# --- DoRA through lora_linear and LoRALayer (the torch path's math; no fused DoRA kernel yet) ----


def dora_case(dtype, gen, n=12, k=24, r=4, lead=(2, 5)):
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64).to(dtype)
    weight, lora_A, lora_B = (t.to(dtype) for t in factors(n, k, r, torch.float64, gen))
    bias = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    magnitude = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return x, weight, bias, lora_A, lora_B, magnitude


@pytest.mark.parametrize(
    ("dtype", "backend", "dropout", "tol"),
    [
        (torch.float64, "torch", 0.0, 1e-12),
        (torch.float64, "torch", 0.3, 1e-12),
        (torch.float32, "torch", 0.0, 1e-5),
        (torch.float32, "torch", 0.3, 1e-5),
        # the fused DoRA launches (interpreter: the column scale in the epilogue; with dropout
        # mask(x) stored by the T-only pass, read beside x against each W tile)
        (torch.float32, "triton", 0.0, 1e-4),
        (torch.float32, "triton", 0.3, 1e-4),
    ],
)
def test_dora_linear_equals_the_reference(dropout, dtype, backend, tol):
    """Output and the gradients of x, A, B and the magnitude, against the float64 oracle with
    the same dropout mask (the call's seed given)."""
    from helpers import read_mask

    from lora_kernels import lora_linear

    gen = torch.Generator().manual_seed(seed_for("dora_linear", dropout, dtype, backend))
    x, weight, bias, lora_A, lora_B, m = dora_case(dtype, gen)
    leaves = [x, lora_A, lora_B, m]
    for t in leaves:
        t.requires_grad_(True)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=dropout, seed=11,
                    backend=backend, magnitude=m)  # fmt: skip
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    y.backward(dy)
    mask = None
    if dropout:
        mask = read_mask(10, 24, dropout, 11, backend).view(2, 5, 24).double()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    xr, ar, br, mr = ref_leaves
    ref = dora_linear_reference(
        xr, weight.double(), bias.double(), ar, br, mr, 0.5, dropout_mask=mask, dropout_p=dropout
    )
    ref.backward(dy.double())
    assert y.dtype == dtype
    assert_close("y", y, ref, tol)
    for name, t, r in zip(("x", "A", "B", "m"), leaves, ref_leaves):
        assert_close(f"d{name}", t.grad, r.grad, tol)


def test_dora_layer_starts_equal_to_its_linear_and_trains_its_magnitude():
    from lora_kernels import LoRALayer

    torch.manual_seed(0)
    layer = LoRALayer(24, 12, rank=4, alpha=8, use_dora=True)
    assert layer.magnitude.shape == (12,) and layer.magnitude.requires_grad
    assert_close("m", layer.magnitude, layer.linear.weight.double().norm(dim=1), 1e-6)
    x = torch.randn(3, 24)
    assert_close("y", layer(x), layer.linear(x).double(), 1e-6)
    layer(x).square().sum().backward()
    assert layer.magnitude.grad is not None and layer.linear.weight.grad is None
    assert "use_dora=True" in repr(layer)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 24 * 4 + 4 * 12 + 12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dora_merge_unmerge_and_the_state_dict(dtype):
    """merge writes c * (W + s (A B)^T); forward is unchanged; unmerge gives W back; a merged
    DoRA layer's state loads into an unmerged one (the state holds the unmerged weight)."""
    from lora_kernels import LoRALayer

    torch.manual_seed(1)
    layer = LoRALayer(24, 12, rank=4, alpha=8, init="seed", use_dora=True, dtype=dtype)
    with torch.no_grad():
        layer.magnitude.mul_(1.2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    x = torch.randn(3, 24, dtype=dtype)
    w0 = layer.linear.weight.detach().clone()
    with torch.no_grad():
        want = layer(x)
        delta = layer.delta_weight()
        layer.merge()
        assert_close("merged W", layer.linear.weight, (w0.double() + delta.double()), tol)
        assert_close("merged y", layer(x), want.double(), tol)
        fresh = LoRALayer(24, 12, rank=4, alpha=8, use_dora=True, dtype=dtype)
        fresh.load_state_dict(layer.state_dict())
        assert_close("fresh y", fresh(x), want.double(), tol)
        layer.unmerge()
        assert_close("unmerged W", layer.linear.weight, w0.double(), tol)
        assert_close("unmerged y", layer(x), want.double(), tol)


def dora_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))


def trained_dora_model():
    from lora_kernels import inject_lora

    model = inject_lora(dora_model(), ["0", "2"], rank=2, alpha=4, init="seed", use_dora=True)
    with torch.no_grad():
        for i in (0, 2):
            model[i].magnitude.mul_(1.1 + 0.1 * i)
    return model


def test_dora_injected_trains_its_magnitudes():
    model = trained_dora_model()
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(f"{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B", "magnitude"))


def test_dora_adapter_round_trips_through_ours_and_peft(tmp_path):
    """Our save holds peft's DoRA keys (lora_magnitude_vector, use_dora: true): our loader and
    peft's read it back with equal outputs; peft's own DoRA save loads into ours."""
    peft = pytest.importorskip("peft")
    from lora_kernels import load_peft_adapter, save_peft_adapter

    model, x = trained_dora_model().eval(), torch.randn(5, 8)
    save_peft_adapter(model, tmp_path / "ours")
    with torch.no_grad():
        want = model(x)
        ours = load_peft_adapter(dora_model(), tmp_path / "ours").eval()
        assert ours[0].use_dora and torch.equal(ours[2].magnitude, model[2].magnitude)
        assert_close("our load", ours(x), want.double(), 1e-6)
        theirs = peft.PeftModel.from_pretrained(dora_model(), str(tmp_path / "ours")).eval()
        assert_close("peft's load", theirs(x), want.double(), 1e-5)
        theirs.save_pretrained(str(tmp_path / "peft"))
        back = load_peft_adapter(dora_model(), tmp_path / "peft").eval()
        assert_close("peft's save, our load", back(x), want.double(), 1e-5)


def test_mixed_dora_layers_are_refused_on_save(tmp_path):
    from lora_kernels import inject_lora, save_peft_adapter

    model = inject_lora(dora_model(), ["0"], rank=2, use_dora=True)
    inject_lora(model, ["2"], rank=2)
    with pytest.raises(ValueError, match="mix use_dora"):
        save_peft_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_over_an_empty_input_dimension_computes_what_the_reference_does(dropout):
    """K = 0 (nn.Linear takes it): the dropout mask is drawn for the rows, counted, not -1 (a
    crash before). Every row norm is 0 and so is the magnitude: c = 0 / 0, NaN, in the
    reference too."""
    from lora_kernels import LoRALayer

    layer = LoRALayer(0, 4, rank=2, dropout=dropout, init="seed", use_dora=True).train()
    x = torch.randn(2, 3, 0, requires_grad=True)
    y = layer(x)
    ref = dora_linear_reference(
        x.detach().double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
        layer.lora_B.double(), layer.magnitude.double(), layer.scaling,
    )  # fmt: skip
    assert y.shape == ref.shape and torch.equal(y.isnan(), ref.isnan()) and ref.isnan().all()
    y.sum().backward()
    assert x.grad.shape == x.shape
