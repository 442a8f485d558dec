"""QDoRA: DoRA over bitsandbytes 4-bit bases (issue 26), held to the float64 oracle on the
dequantized weight (both paths, the kernels in the interpreter) and to peft's own bnb DoRA layer
(``from_peft``, ``patch_peft``, adapter files both ways)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import BACKEND_TOL as TOL
from helpers import assert_close, make_x, read_mask, seed_for, train_steps
from test_dora_paths import EXTRA, oracle
from test_quant import bnb_dequantize, linear4bit, quantized
from torch import nn

from lora_kernels import (
    LoRALayer,
    adapters,
    dora,
    from_peft,
    inject_lora,
    load_peft_adapter,
    patch_peft,
    quant,
    save_peft_adapter,
)
from lora_kernels.function import dora_linear
from lora_kernels.kernels import dequant

bnb = pytest.importorskip("bitsandbytes")
NAMES = ("x", "bias", "lora_A", "lora_B", "magnitude")


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """(as in test_quant: bitsandbytes' portable kernels run eagerly, no compile per shape)"""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_qdora_equals_the_oracle(backend, dtype, rank, p, monkeypatch):
    """Output and every gradient over a 4-bit base equal the float64 oracle on bitsandbytes'
    dequantized weight: odd sizes, a 3-D strided input, ranks 1 / 16 / 64, dropout 0 and 0.25.
    The Triton path dequantizes with our kernel once in forward (the norm and the GEMM share
    it) and once in backward (dx); the torch path with PyTorch ops."""
    launches = []
    real = dequant.launch_dequant
    monkeypatch.setattr(dequant, "launch_dequant", lambda *a: launches.append(1) or real(*a))
    device = DEVICE[backend]
    gen = torch.Generator().manual_seed(seed_for("qdora", backend, dtype, rank, p))
    lead, k, n = (2, 3, 7), 65, 17
    packed, state, _ = quantized(n, k, dtype=dtype, seed=rank)
    w = bnb_dequantize(packed, state)
    leaves = {
        "x": make_x(lead, k, dtype, "strided", gen),
        "bias": torch.randn(n, generator=gen).to(dtype),
        "lora_A": (torch.randn(k, rank, generator=gen) * k**-0.5).to(dtype),
        "lora_B": (torch.randn(rank, n, generator=gen) * 0.5).to(dtype),
        # (c = m / n in [0.5, 1.5], as test_dora_paths' unit-norm rows have it)
        "magnitude": (w.double().norm(dim=1) * (torch.rand(n, generator=gen) + 0.5)).to(dtype),
    }
    leaves = {name: t.to(device).requires_grad_(True) for name, t in leaves.items()}
    weight = packed.to(device)
    weight.quant_state = state
    scaling, seed = 0.75, 19
    y = dora_linear(
        leaves["x"], weight, leaves["bias"], leaves["lora_A"], leaves["lora_B"],
        leaves["magnitude"], scaling, dropout_p=p, seed=seed, backend=backend,
    )  # fmt: skip
    dy = torch.randn(y.shape, generator=gen).to(dtype).to(device)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert len(launches) == (2 if backend == "triton" else 0)
    mask = None
    if p:  # the mask this backend draws (the Triton path's fused dropout launches: theirs)
        mask = read_mask(y[..., 0].numel(), k, p, seed, backend).view(leaves["x"].shape)
    mask = None if mask is None else mask.double()
    y_ref, grads = oracle(leaves, dy, scaling, mask, p, weight=w)
    tol = TOL[backend][dtype] * (EXTRA[p] if dtype.itemsize == 2 else 1.0)
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        assert leaves[name].grad.dtype == dtype, name
        assert_close(f"d{name}", leaves[name].grad, grads[name], tol)


def test_nothing_dense_is_kept_for_backward():
    """Between forward and backward a QDoRA call keeps no ``(N, K)`` tensor: the dequantized
    weight lives for the forward only (backward decodes it again where dx needs it)."""
    base = linear4bit(96, 40, seed=1)
    layer = LoRALayer.from_linear(base, rank=4, use_dora=True, init="seed")
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(8, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (40, 96) not in shapes and (96, 40) not in shapes
    y.sum().backward()
    assert x.grad is not None and layer.magnitude.grad is not None


def test_a_fresh_qdora_layer_is_its_base():
    """peft's init over a 4-bit base: the magnitude is the dequantized weight's row norms (in
    the compute dtype), so with ``B = 0`` the layer computes its base layer's output."""
    base = linear4bit(45, 33, seed=2)
    layer = LoRALayer.from_linear(base, rank=4, alpha=8, use_dora=True)
    w = quant.dequantize(base.weight, torch.float32).double()
    assert_close("magnitude", layer.magnitude, w.norm(dim=1), 1e-6)
    x = torch.randn(5, 45, requires_grad=True)
    with torch.no_grad():
        assert_close("y", layer(x), base(x).double(), 1e-6)


def test_the_base_norms_are_kept_per_compute_dtype(monkeypatch):
    """The base rows' squared norms of a 4-bit weight are computed once per weight and the
    dtype it is dequantized to."""
    calls = []
    real = dora.base_row_norms_sq
    monkeypatch.setattr(dora, "base_row_norms_sq", lambda w, d=None: calls.append(d) or real(w, d))
    weight = linear4bit(64, 24, seed=3).weight
    first = dora.cached_base_sq(weight, torch.float32)
    assert dora.cached_base_sq(weight, torch.float32) is first
    half = dora.cached_base_sq(weight, torch.bfloat16)
    assert calls == [torch.float32, torch.bfloat16]
    w = quant.dequantize(weight, torch.bfloat16).double()
    assert_close("base_sq", half, w.square().sum(1), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        dora.base_row_norms_sq(weight)


def test_merge_is_refused_and_delta_weight_is_given():
    """merge over a 4-bit base is refused (as for LoRA), nothing changed; ``delta_weight`` is
    DoRA's ``c (W + s (A B)^T) - W`` on the dequantized weight."""
    layer = LoRALayer.from_linear(linear4bit(32, 16, seed=4), rank=4, use_dora=True, init="seed")
    before = layer.linear.weight.data.clone()
    with pytest.raises(RuntimeError, match="4-bit base"):
        layer.merge()
    assert torch.equal(layer.linear.weight.data, before) and not layer.merged
    w = quant.dequantize(layer.linear.weight, torch.float32).double()
    A, B, m = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    merged = w + layer.scaling * (A @ B).t()
    expected = merged * (m / merged.norm(dim=1))[:, None] - w
    assert_close("delta", layer.delta_weight(), expected, 1e-5)


def peft_qdora(k, n, rank, *, compute_dtype=torch.float32, quant_type="nf4", seed=0, dropout=0.0):
    """peft's DoRA over a bitsandbytes ``Linear4bit`` (peft.tuners.lora.bnb.Linear4bit), with
    non-zero ``B`` and magnitudes off the base's norms (a trained adapter)."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("proj", linear4bit(k, n, compute_dtype=compute_dtype,
                                        quant_type=quant_type, seed=seed))  # fmt: skip
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: peft's bnb layers
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"],
        init_lora_weights=False, use_dora=True,
    )  # fmt: skip
    theirs = peft.get_peft_model(model, config)
    with torch.no_grad():
        magnitude = theirs.base_model.model.proj.lora_magnitude_vector["default"].weight
        magnitude.mul_(torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return theirs


def peft_grads(model, x, dy):
    """``(y, {name: grad})`` of one forward and backward: x's and every trainable parameter's,
    by peft's parameter names (LoRALayer's are mapped to them)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = {"x": x.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = _our_name(name)
            # (peft's adapters are nn.Linear weights: (r, in) and (out, r), ours transposed)
            grads[key] = p.grad.t() if key != "magnitude" and name.endswith(".weight") else p.grad
    return y, grads


def _our_name(name: str) -> str:
    """``lora_A`` / ``lora_B`` / ``magnitude`` for a parameter name, ours or peft's."""
    for ours, theirs in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                         ("magnitude", "lora_magnitude_vector.default.weight")):  # fmt: skip
        if name.endswith((f".{ours}", f".{theirs}")):
            return ours
    raise AssertionError(f"an unexpected trainable parameter {name}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("k, n, rank", [(45, 33, 1), (130, 64, 16)])
def test_from_peft_and_patch_peft_give_peft_s_numbers(quant_type, k, n, rank):
    """peft's own QDoRA layer, the same model patched (``patch_peft``: runs ``dora_linear``,
    no fallback) and converted (``from_peft``): float32 output and every gradient (x, A, B, the
    magnitude) equal to 1e-5."""
    gen = torch.Generator().manual_seed(k)
    x, dy = torch.randn(6, k, generator=gen), torch.randn(6, n, generator=gen)
    theirs = peft_qdora(k, n, rank, quant_type=quant_type, seed=rank)
    y_peft, g_peft = peft_grads(theirs, x, dy)
    theirs.zero_grad()

    report = patch_peft(theirs)
    assert report.fallback == {} and len(report.fused) == 1, str(report)
    y_patched, g_patched = peft_grads(theirs, x, dy)
    theirs.zero_grad()
    assert "DoRALinearFunctionBackward" in _graph(y_patched)

    ours = from_peft(theirs)
    layer = adapters.lora_layers(ours)["proj"]
    assert layer.use_dora and quant.is_4bit(layer.linear.weight)
    y_ours, g_ours = peft_grads(ours, x, dy)
    for label, y, grads in (("patched", y_patched, g_patched), ("from_peft", y_ours, g_ours)):
        assert_close(f"{label} y", y, y_peft.double(), 1e-5)
        assert set(grads) == set(g_peft) == {"x", "lora_A", "lora_B", "magnitude"}
        for name, g in g_peft.items():
            assert_close(f"{label} d{name}", grads[name], g.double(), 1e-5)


def _graph(tensor) -> set[str]:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [child for child, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


def test_bfloat16_compute_is_within_rounding_of_the_oracle():
    """A bfloat16 compute dtype (QLoRA's usual one): ours, converted from peft, within bfloat16
    rounding of the float64 oracle on the weight dequantized to bfloat16, as peft is."""
    theirs = peft_qdora(64, 48, 8, compute_dtype=torch.bfloat16, seed=5)
    gen = torch.Generator().manual_seed(5)
    x, dy = torch.randn(7, 64, generator=gen), torch.randn(7, 48, generator=gen)
    x, dy = x.bfloat16(), dy.bfloat16()
    y_peft, _ = peft_grads(theirs, x, dy)
    layer = from_peft(theirs)
    mine = adapters.lora_layers(layer)["proj"]
    y, grads = peft_grads(layer, x, dy)
    assert y.dtype == torch.bfloat16
    w = quant.dequantize(mine.linear.weight, torch.bfloat16)
    leaves = {"x": x, "bias": mine.linear.bias.bfloat16(), "lora_A": mine.lora_A,
              "lora_B": mine.lora_B, "magnitude": mine.magnitude}  # fmt: skip
    y_ref, ref = oracle(leaves, dy, mine.scaling, weight=w)
    tol = TOL["torch"][torch.bfloat16] * EXTRA[0.0]
    assert_close("y", y, y_ref, tol)
    assert_close("peft y", y_peft, y_ref, tol)
    for name in ("x", "lora_A", "lora_B", "magnitude"):
        assert_close(f"d{name}", grads[name], ref[name], tol)


def test_adapter_files_round_trip_with_peft(tmp_path):
    """Our QDoRA adapter (``inject_lora(..., use_dora=True)`` on a 4-bit model, trained a few
    steps) saves peft's files (``use_dora: true``, ``lora_magnitude_vector`` keys) that peft
    loads onto a 4-bit base with our outputs; peft's saved QDoRA adapter loads into ours."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", linear4bit(64, 24, seed=6))
    packed = model.proj.weight.data.clone()
    inject_lora(model, ["proj"], rank=4, alpha=8, use_dora=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 3  # lora_A, lora_B, magnitude
    x, target = torch.randn(16, 64), torch.randn(16, 24)
    losses = train_steps(params, lambda: (model(x) - target).square().mean(), 5, 1e-2)
    assert losses[-1] < losses[0] and torch.equal(model.proj.linear.weight.data, packed)
    save_peft_adapter(model, tmp_path / "ours")
    with torch.no_grad():
        expected = model(x)

    base = nn.Sequential()
    base.add_module("proj", linear4bit(64, 24, seed=6))
    base.is_loaded_in_4bit = True
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    assert theirs.peft_config["default"].use_dora
    # (a grad-requiring input keeps bitsandbytes' CPU repacking out: see test_quant)
    assert_close("peft y", theirs(x.clone().requires_grad_(True)), expected.double(), 1e-5)
    theirs.save_pretrained(tmp_path / "theirs")

    again = nn.Sequential()
    again.add_module("proj", linear4bit(64, 24, seed=6))
    load_peft_adapter(again, tmp_path / "theirs")
    assert adapters.lora_layers(again)["proj"].use_dora
    with torch.no_grad():
        assert_close("loaded y", again(x), expected.double(), 1e-6)


def test_4bit_minilm_under_peft_dora_patched(tmp_path):
    """A 4-bit MiniLM under peft's DoRA (QDoRA) layers, patched: peft's outputs (every layer
    fused, none falling back), training lowers the loss without touching a packed weight, and
    peft's own save reloads into a fresh 4-bit MiniLM with the trained outputs."""
    peft = pytest.importorskip("peft")
    from test_quant import hidden, minilm_4bit

    model, real_models = minilm_4bit()
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False,
        use_dora=True,
    )  # fmt: skip
    theirs = peft.get_peft_model(model, config)
    batch = real_models.batch()
    expected = hidden(theirs, batch)
    report = patch_peft(theirs)
    assert len(report.fused) == 12 and report.fallback == {}, str(report)
    assert_close("hidden", hidden(theirs, batch), expected.double(), 1e-5)

    fallbacks = report.calls.copy()  # (a live count, shared by the whole process)
    layers = [m for m in theirs.modules() if hasattr(m, "lora_magnitude_vector")]
    packed = [layer.base_layer.weight.data.clone() for layer in layers]
    theirs.train()
    params = [p for p in theirs.parameters() if p.requires_grad]
    assert len(params) == 36  # A, B and the magnitude of 12 layers
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))

    def loss():
        return (theirs(**batch).last_hidden_state - target).square().mean()

    losses = train_steps(params, loss, 3, 1e-3)
    assert losses[-1] < losses[0] and report.calls == fallbacks
    assert all(torch.equal(layer.base_layer.weight.data, w) for layer, w in zip(layers, packed))

    theirs.eval()
    theirs.save_pretrained(tmp_path / "adapter")
    trained = hidden(theirs, batch)
    fresh, _ = minilm_4bit()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert_close("hidden after the round trip", hidden(loaded, batch), trained.double(), 1e-5)
