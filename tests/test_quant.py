"""QLoRA: LoRA over bitsandbytes 4-bit base weights, held to bitsandbytes itself (the oracle of
the format) and to peft's bnb LoRA layer."""

from __future__ import annotations

import copy
import gc
import itertools
import weakref

import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import BACKEND_TOL as TOL
from helpers import (
    KERNEL_DEVICE,
    assert_close,
    assert_matches_eager,
    read_mask,
    reference_with_grads,
    train_steps,
)
from torch import nn

from lora_kernels import (
    LoRALayer,
    adapters,
    from_peft,
    inject_lora,
    lora_linear,
    quant,
    roofline,
    testing,
    triton_path,
)
from lora_kernels.kernels import dequant
from lora_kernels.kernels.configs import fused_mm_config
from lora_kernels.kernels.fused_mm import fused_mm
from lora_kernels.reference import lora_linear_reference

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes' portable (odd-shape) kernels are torch.compile'd: run them eagerly here,
    which computes the same and spares the suite a compile per shape."""
    with torch._dynamo.config.patch(disable=True):
        yield


def quantized(n, k, *, quant_type="nf4", nested=True, blocksize=64, dtype=torch.float32, seed=0):
    """``(packed, state, W)``: a random ``W (n, k)`` quantized by bitsandbytes; ``packed``
    carries ``quant_state`` as ``Params4bit`` does."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.2).to(dtype)
    packed, state = F.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    packed.quant_state = state
    return packed, state, w


def bnb_dequantize(packed, state):
    """bitsandbytes' own dequantization of ``packed``.

    Its CPU kernel (``dequantize_4bit`` for an even last dimension) decodes blocks that span
    rows wrongly when K < blocksize (off by up to 0.4 at K = 128, blocksize 256, where ours and
    its portable kernel agree with the quantized values), so it is given the same bytes as one
    row of N x K elements: the flat format itself. An odd N x K runs its portable kernel."""
    n, k = state.shape
    if (n * k) % 2:
        return F.dequantize_4bit(packed, state)
    flat = copy.copy(state)
    flat.shape = torch.Size([1, n * k])
    return F.dequantize_4bit(packed, flat).reshape(n, k)


def bits(t):
    """The bit patterns of ``t``, the sign of zero aside: bitsandbytes' kernels give FP4's code 8
    as -0.0 or +0.0 depending on the path taken (we give +0.0, its table's value)."""
    t = t + 0.0  # -0.0 + 0.0 = +0.0; every other value unchanged
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_code_tables_are_bitsandbytes():
    for name, table in quant.CODES.items():
        theirs = F.get_4bit_type(name, device="cpu").float()
        assert torch.equal(torch.tensor(table, dtype=torch.float32), theirs), name


@pytest.mark.parametrize(
    "quant_type, nested, blocksize",
    list(itertools.product(["nf4", "fp4"], [False, True], [64, 128, 256])),
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bitsandbytes(quant_type, nested, blocksize, dtype):
    """Ours, by PyTorch ops (the torch path) and by our Triton kernel (the Triton path), bit for
    bit (but the sign of zero), over shapes with K below, at and above the blocksize, odd N, odd
    K and an odd element count."""
    for n, k in [(33, 130), (64, 128), (8, 320), (17, 45), (5, 1000)]:
        packed, state, _ = quantized(
            n, k, quant_type=quant_type, nested=nested, blocksize=blocksize, dtype=dtype
        )
        ours = quant.dequantize(packed, state.dtype)
        theirs = bnb_dequantize(packed, state)
        assert ours.shape == (n, k) and ours.dtype == dtype
        assert torch.equal(bits(ours), bits(theirs)), (n, k)
        on_device = packed.to(KERNEL_DEVICE)
        on_device.quant_state = state
        kernel = testing.dequantize(on_device, state.dtype).cpu()  # Triton (the interpreter here)
        assert torch.equal(bits(kernel), bits(theirs)), (n, k)


# Small tiles: several along N and K, so tiles start inside scale blocks (and, with odd K, rows
# on a low nibble).
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4,
               "num_stages": 1}  # fmt: skip


def in_loop_mm(x, w, dtype, *, lora=None):
    """``x @ w`` by the fused kernel reading a 4-bit ``w`` (a ``quant.Packed``) in its K loop,
    or a dense one; ``lora``: ``(P, Q)``, zeros by default."""
    k, n = w.shape
    p, q = lora if lora is not None else (x.new_zeros(k, 1), x.new_zeros(1, n))
    upcast = x.device.type == "cpu" and dtype == torch.bfloat16
    return fused_mm(
        x, w, None, p, q, 0.5, config=SMALL_TILES, num_sms=1, precision="ieee", upcast=upcast
    )


@pytest.mark.parametrize(
    "quant_type, nested, blocksize, dtype",
    [(*fmt, torch.bfloat16) for fmt in itertools.product(["nf4", "fp4"], [False, True], [64, 256])]
    + [("fp4", True, 128, dtype) for dtype in DTYPES],
)
def test_in_loop_dequantization_is_bitsandbytes(quant_type, nested, blocksize, dtype):
    """The other Triton strategy: the fused kernel decoding 4-bit tiles in its K loop. Times the
    identity (exact in fp32 accumulation) it gives W^T (forward's operand) and W (dx's) bit for
    bit (but the sign of zero) as bitsandbytes dequantizes them; over random x and adapters its
    output and T are the buffer strategy's (the dequant kernel's W, then the same kernel) bit
    for bit. Odd N and K: rows starting on a low nibble, tiles inside a scale block."""
    for n, k in [(33, 130), (40, 45)]:
        packed, state, _ = quantized(
            n, k, quant_type=quant_type, nested=nested, blocksize=blocksize, dtype=dtype
        )
        theirs = bnb_dequantize(packed, state)
        on_device = packed.to(KERNEL_DEVICE)
        on_device.quant_state = state
        w = quant.packed(on_device)
        for operand, size, want in [(w.t(), k, theirs.t()), (w, n, theirs)]:
            eye = torch.eye(size, dtype=dtype, device=KERNEL_DEVICE)
            out, _ = in_loop_mm(eye, operand, dtype)
            assert torch.equal(bits(out.cpu()), bits(want.contiguous())), (n, k, operand.shape)
        gen = torch.Generator().manual_seed(n * k)
        x = torch.randn(19, k, generator=gen).to(dtype).to(KERNEL_DEVICE)
        lora = [(torch.randn(*s, generator=gen) * 0.1).to(dtype).to(KERNEL_DEVICE)
                for s in ((k, 5), (5, n))]  # fmt: skip
        buffer = testing.dequantize(on_device, dtype)
        for got, expected in zip(in_loop_mm(x, w.t(), dtype, lora=lora),
                                 in_loop_mm(x, buffer.t(), dtype, lora=lora)):  # fmt: skip
            assert torch.equal(bits(got.cpu()), bits(expected.cpu())), (n, k)


def test_dequantize_in_pieces(monkeypatch):
    """Pieces of a few blocks (the last one short) give the same weight as one piece."""
    packed, state, _ = quantized(37, 130, blocksize=64)
    whole = quant.dequantize(packed, torch.float32)
    monkeypatch.setattr(quant, "PIECE_ELEMS", 3 * 64)
    assert torch.equal(bits(quant.dequantize(packed, torch.float32)), bits(whole))


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16, torch.float32])
def test_other_quant_storage_is_the_same_bytes(storage):
    w = torch.randn(16, 64) * 0.2
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=storage)
    packed.quant_state = state
    assert packed.dtype == storage
    assert torch.equal(quant.dequantize(packed, torch.float32), F.dequantize_4bit(packed, state))


def test_autocast_leaves_a_4bit_weight_alone():
    """Under torch.autocast the 4-bit weight (even in a float quant_storage, which holds codes)
    is dequantized to autocast's dtype, not cast: as the same call on bfloat16 inputs."""
    w = torch.randn(24, 64) * 0.2
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.float32)
    packed.quant_state = state
    x, A, B = torch.randn(5, 64), torch.randn(64, 4) * 0.1, torch.randn(4, 24) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, packed, None, A, B)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lora_linear(x.bfloat16(), packed, None, A, B))


def reference_grads(x, w, bias, lora_A, lora_B, scaling, dy, mask=None, p=0.0):
    """The float64 oracle (``helpers.reference_with_grads``) on the dequantized weight ``w``:
    its output and ``[dx, dA, dB]``."""
    params = {"weight": w, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    y, grads = reference_with_grads(x, params, dy, scaling, dropout_mask=mask, dropout_p=p)
    return y, [grads[name] for name in ("x", "lora_A", "lora_B")]


@pytest.fixture
def dequant_calls(monkeypatch):
    """How many times the Triton path dequantized a 4-bit weight into a buffer."""
    calls = []
    real = dequant.launch_dequant

    def counted(packed, scales, code, out, blocksize):
        calls.append(out.dtype)
        return real(packed, scales, code, out, blocksize)

    monkeypatch.setattr(dequant, "launch_dequant", counted)
    return calls


@pytest.mark.parametrize("backend, strategy", [("torch", ""), ("triton", "in_loop"),
                                               ("triton", "buffer")])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("m, k, n, rank", [(7, 45, 33, 1), (20, 130, 64, 16), (5, 64, 17, 64)])
def test_lora_linear_takes_the_4bit_weight(
    backend, strategy, dtype, p, m, k, n, rank, monkeypatch, dequant_calls
):
    """Output and every gradient equal the float64 reference on bitsandbytes' dequantized
    weight (with the read-back mask at p > 0), on both backends and both Triton strategies
    (the one asked for is the one that ran: no buffer in the loop, one per use of W else);
    odd shapes, ranks 1 to 64."""
    monkeypatch.setenv("LORA_KERNELS_4BIT", strategy)
    dev = DEVICE[backend]
    packed, state, _ = quantized(n, k, dtype=dtype, seed=m + k)
    w = bnb_dequantize(packed, state)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    lora_A = (torch.randn(k, rank, generator=gen) * 0.2).to(dtype)
    lora_B = (torch.randn(rank, n, generator=gen) * 0.2).to(dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)
    mask = read_mask(m, k, p, 11, backend).cpu().double() if p else None
    leaves = [t.clone().to(dev).requires_grad_(True) for t in (x, lora_A, lora_B)]
    packed_dev = packed.to(dev)
    packed_dev.quant_state = state
    y = lora_linear(
        leaves[0], packed_dev, bias.to(dev), leaves[1], leaves[2], 0.5,
        dropout_p=p, seed=11, backend=backend,
    )  # fmt: skip
    y.backward(dy.to(dev))
    assert len(dequant_calls) == {"": 0, "in_loop": 0, "buffer": 2}[strategy]
    y_ref, grads_ref = reference_grads(x, w, bias, lora_A, lora_B, 0.5, dy, mask, p)
    tol = TOL[backend][dtype]
    assert_close("y", y, y_ref, tol)
    for name, leaf, g in zip(["dx", "dA", "dB"], leaves, grads_ref):
        assert_close(name, leaf.grad, g, tol)


@pytest.mark.parametrize("strategy", ["in_loop", "buffer"])
@pytest.mark.parametrize(
    "storage, blocksize", [(torch.uint8, 64), (torch.float32, 4096), (torch.bfloat16, 128)]
)
def test_both_strategies_take_any_input_layout(strategy, storage, blocksize, monkeypatch):
    """Either Triton strategy over another quant_storage and blocksizes up to bitsandbytes'
    largest (FP4): an empty batch, a 3-D input and a strided one, output and dx against the
    float64 reference on bitsandbytes' dequantized weight."""
    monkeypatch.setenv("LORA_KERNELS_4BIT", strategy)
    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(blocksize)) * 0.2
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="fp4", quant_storage=storage)
    packed.quant_state = state
    w = F.dequantize_4bit(packed, state).double()
    packed = packed.to(KERNEL_DEVICE)
    packed.quant_state = state
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(70, 3, generator=gen), torch.randn(3, 40, generator=gen)
    inputs = [torch.randn(0, 70), torch.randn(2, 5, 70), torch.randn(6, 140, generator=gen)[:, ::2]]
    for x in inputs:
        x = x.to(KERNEL_DEVICE).requires_grad_(True)
        y = lora_linear(x, packed, None, A.to(x.device), B.to(x.device), 0.5, backend="triton")
        dy = torch.randn(y.shape, generator=gen).to(x.device)
        y.backward(dy)
        ref = x.detach().double().cpu().requires_grad_(True)
        y_ref = lora_linear_reference(ref, w, None, A.double(), B.double(), 0.5)
        y_ref.backward(dy.double().cpu())
        assert_close(f"{tuple(x.shape)} y", y, y_ref, TOL["triton"][torch.float32])
        assert_close(f"{tuple(x.shape)} dx", x.grad, ref.grad, TOL["triton"][torch.float32])


def test_the_strategy_follows_the_roofline_threshold(monkeypatch, dequant_calls):
    """Unforced, the Triton path reads a 4-bit W in the K loop up to the threshold (the
    roofline's break-even for its GPU's tables) and dequantizes it into a buffer above; a bad
    LORA_KERNELS_4BIT is named before anything runs."""
    monkeypatch.delenv("LORA_KERNELS_4BIT", raising=False)
    device = torch.device(KERNEL_DEVICE)
    for arch, gpu, dtype in [(9, "H100", torch.bfloat16), (8, "A100", torch.float16)]:
        block_m = fused_mm_config(arch, dtype, 16, four_bit=True)["BLOCK_M"]
        facts = (arch, triton_path.INTERPRETER_SMS)
        with monkeypatch.context() as patch:  # the device's config tables: Hopper's, Ampere's
            patch.setattr(triton_path, "_device_facts", lambda device, facts=facts: facts)
            threshold = triton_path.in_loop_max_m(device, dtype)
        assert threshold == roofline.in_loop_max_tokens(gpu, block_m)
    # float32: 4 bytes saved per element, not 2
    block_m = fused_mm_config(9, torch.float32, 16, four_bit=True)["BLOCK_M"]
    threshold = triton_path.in_loop_max_m(device, torch.float32)
    assert threshold == roofline.in_loop_max_tokens("H100", block_m, 4)
    assert triton_path.in_loop(device, torch.float32, threshold)
    assert not triton_path.in_loop(device, torch.float32, threshold + 1)
    packed, state, _ = quantized(24, 64)
    packed = packed.to(KERNEL_DEVICE)
    packed.quant_state = state
    A, B = torch.randn(64, 4), torch.randn(4, 24)
    for m, calls in [(3, 0), (threshold + 1, 1)]:
        dequant_calls.clear()
        x = torch.randn(m, 64).to(KERNEL_DEVICE)
        lora_linear(x, packed, None, A.to(x.device), B.to(x.device), backend="triton")
        assert len(dequant_calls) == calls, m
    monkeypatch.setenv("LORA_KERNELS_4BIT", "fused")
    with pytest.raises(ValueError, match="LORA_KERNELS_4BIT='fused'.*in_loop, buffer"):
        lora_linear(x, packed, None, A.to(x.device), B.to(x.device), backend="triton")


@pytest.mark.inductor
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("backend, strategy", [("torch", ""), ("triton", "in_loop"),
                                               ("triton", "buffer")])  # fmt: skip
def test_compile_fullgraph_over_a_4bit_base(backend, strategy, dynamic, monkeypatch):
    """``lora_linear`` on a 4-bit weight inside one torch.compile graph (the Triton path's
    launches, the dequantization's included, are opaque ops) equals eager, output and every
    gradient, over batches of several sizes, with dropout (an explicit seed)."""
    monkeypatch.setenv("LORA_KERNELS_4BIT", strategy)
    dev = DEVICE[backend]
    packed, state, _ = quantized(12, 16)
    packed = packed.to(dev)
    packed.quant_state = state
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(16, 4, generator=gen).to(dev).requires_grad_(True)
    B = torch.randn(4, 12, generator=gen).to(dev).requires_grad_(True)

    def f(x, A, B):
        return lora_linear(x, packed, None, A, B, 0.5, dropout_p=0.2, seed=7, backend=backend)

    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    with torch._dynamo.config.patch(disable=False):  # the module's fixture turns dynamo off
        compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
        for m in (3, 5, 9):
            x = torch.randn(m, 16, generator=gen).to(dev).requires_grad_(True)
            assert_matches_eager(f, compiled, x, A, B, f"m={m} ")
    assert stats["unique_graphs"] > graphs  # it compiled


def test_nothing_16_bit_is_kept():
    """Backward keeps x and S only (the packed weight is a parameter): the dequantized weight
    is freed when forward returns, and backward's own copy when backward returns."""
    packed, state, _ = quantized(64, 128)
    made = []
    real = quant.dequantize

    def tracked(weight, dtype):
        out = real(weight, dtype)
        made.append(weakref.ref(out))
        return out

    saved = []
    x = torch.randn(9, 128, requires_grad=True)
    lora_A = torch.randn(128, 8, requires_grad=True)
    lora_B = torch.randn(8, 64, requires_grad=True)
    try:
        quant.dequantize = tracked
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lora_linear(x, packed, None, lora_A, lora_B, 2.0)
        gc.collect()
        assert len(made) == 1 and made[0]() is None  # not kept for backward
        params = {lora_A.data_ptr(), lora_B.data_ptr()}
        activations = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
        assert activations == [(9, 8), (9, 128)]  # S and x
        y.sum().backward()
        gc.collect()
        assert len(made) == 2 and made[1]() is None
    finally:
        quant.dequantize = real


def linear4bit(k, n, *, compute_dtype=torch.float32, quant_type="nf4", bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type)
    layer.load_state_dict(base.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move


def peft_over(module_4bit, rank, dropout=0.0):
    import peft

    model = nn.Sequential()
    model.add_module("proj", module_4bit)
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: peft's bnb layers
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"],
        init_lora_weights=False,
    )  # fmt: skip
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("k, n, rank", [(45, 33, 1), (130, 64, 16), (64, 96, 64)])
def test_from_peft_equals_peft_bnb_layer(compute_dtype, quant_type, k, n, rank):
    """peft's bnb LoRA layer (peft.tuners.lora.bnb.Linear4bit) and ours from it: float32 equal
    to 1e-6, bfloat16 both within bf16 rounding of the float64 reference (peft computes its
    LoRA branch in the adapters' float32, we in the compute dtype)."""
    pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = linear4bit(k, n, compute_dtype=compute_dtype, quant_type=quant_type, seed=rank)
    theirs = peft_over(base, rank)
    module = theirs.base_model.model.proj
    assert isinstance(module, PeftLinear4bit)
    w = F.dequantize_4bit(base.weight.data, base.weight.quant_state)
    A = module.lora_A["default"].weight.detach().t().clone()
    B = module.lora_B["default"].weight.detach().t().clone()
    x = torch.randn(6, k, dtype=compute_dtype)
    dy = torch.randn(6, n, dtype=compute_dtype)
    x1 = x.clone().requires_grad_(True)
    y1 = theirs(x1)
    y1.backward(dy)
    peft_A, peft_B = module.lora_A["default"].weight, module.lora_B["default"].weight
    grads1 = [x1.grad, peft_A.grad.t(), peft_B.grad.t()]

    ours = from_peft(theirs)
    layer = adapters.lora_layers(ours)["proj"]
    assert layer.linear is base and layer.lora_A.dtype == torch.float32
    x2 = x.clone().requires_grad_(True)
    y2 = ours(x2)
    y2.backward(dy)
    grads2 = [x2.grad, layer.lora_A.grad, layer.lora_B.grad]
    assert y2.dtype == y1.dtype == compute_dtype
    y_ref, grads_ref = reference_grads(x, w, base.bias, A, B, layer.scaling, dy)
    if compute_dtype == torch.float32:
        assert_close("y", y2, y1.double(), 1e-6)
        for name, g2, g1 in zip(["dx", "dA", "dB"], grads2, grads1):
            assert_close(name, g2, g1.double(), 1e-6)
    tol = TOL["torch"][compute_dtype]
    for name, out in [("y", y2), ("peft y", y1)]:
        assert_close(name, out, y_ref, tol)
    for name, g2, g1, g in zip(["dx", "dA", "dB"], grads2, grads1, grads_ref):
        assert_close(name, g2, g, tol)
        assert_close(f"peft {name}", g1, g, tol)


def test_dropout_against_the_read_back_mask():
    base = linear4bit(64, 40, seed=3)
    layer = LoRALayer.from_linear(base, rank=8, alpha=16, dropout=0.3, init="seed")
    x = torch.randn(10, 64)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31, ()))  # the seed the layer's call draws next
    torch.manual_seed(5)
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    y.sum().backward()
    mask = read_mask(10, 64, 0.3, seed, "torch").double()
    w = F.dequantize_4bit(base.weight.data, base.weight.quant_state)
    y_ref, grads = reference_grads(
        x, w, base.bias, layer.lora_A, layer.lora_B, layer.scaling, torch.ones(10, 40), mask, 0.3
    )
    assert_close("y", y, y_ref, 1e-5)
    got = [x1.grad, layer.lora_A.grad, layer.lora_B.grad]
    for name, g_ours, g in zip(["dx", "dA", "dB"], got, grads):
        assert_close(name, g_ours, g, 1e-5)


def test_inject_lora_on_a_4bit_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(linear4bit(32, 48, seed=1), nn.ReLU(), linear4bit(48, 8, seed=2))
    packed = [bytes(m.weight.data.numpy().tobytes()) for m in (model[0], model[2])]
    inject_lora(model, "all-linear", rank=4, alpha=8)
    layers = adapters.lora_layers(model)
    assert set(layers) == {"0", "2"}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 and all(p.dtype == torch.float32 for p in params)
    x, target = torch.randn(16, 32), torch.randn(16, 8)
    losses = train_steps(params, lambda: (model(x) - target).square().mean(), 5, 1e-2)
    assert losses[-1] < losses[0]
    after = [bytes(layers[n].linear.weight.data.numpy().tobytes()) for n in ("0", "2")]
    assert after == packed  # the 4-bit base never changes


def test_adapter_round_trip_with_peft(tmp_path):
    """Our adapter saved over a 4-bit base loads into peft on a 4-bit base: equal outputs;
    and peft's saved adapter loads into ours."""
    peft = pytest.importorskip("peft")
    from lora_kernels import load_peft_adapter, save_peft_adapter

    model = nn.Sequential()
    model.add_module("proj", linear4bit(64, 24, seed=4))
    inject_lora(model, ["proj"], rank=4, alpha=8, init="seed")
    save_peft_adapter(model, tmp_path / "ours")
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)

    base = nn.Sequential()
    base.add_module("proj", linear4bit(64, 24, seed=4))
    base.is_loaded_in_4bit = True
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    x_grad = x.clone().requires_grad_(True)  # NOTE: a grad-requiring input keeps bitsandbytes'
    # CPU repacking out of the oracle. Its CPU kernels round differently per instruction set
    # (AVX-512 or not): float32 equal to 1e-6, as test_from_peft_equals_peft_bnb_layer.
    assert_close("peft y", theirs(x_grad), expected.double(), 1e-6)
    theirs.save_pretrained(tmp_path / "theirs")

    again = nn.Sequential()
    again.add_module("proj", linear4bit(64, 24, seed=4))
    load_peft_adapter(again, tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(again(x), expected)


def test_merge_is_refused_on_a_4bit_base():
    layer = LoRALayer.from_linear(linear4bit(32, 16), rank=4, init="seed")
    before = layer.linear.weight.data.clone()
    with pytest.raises(RuntimeError, match="4-bit base"):
        layer.merge()
    with pytest.raises(RuntimeError, match="4-bit base"):
        adapters.merge_and_unload(nn.Sequential(layer))
    assert torch.equal(layer.linear.weight.data, before) and not layer.merged


def test_bad_4bit_inputs_are_named():
    unquantized = bnb.nn.Linear4bit(32, 16)  # still float: bitsandbytes quantizes on .to(device)
    with pytest.raises(ValueError, match="not quantized yet"):
        LoRALayer.from_linear(unquantized, rank=4)
    packed, _, _ = quantized(16, 32)
    x, A, B = torch.randn(3, 32), torch.randn(32, 4), torch.randn(4, 16)
    packed.requires_grad_(False)
    with pytest.raises(ValueError, match=r"in_features=32"):
        lora_linear(torch.randn(3, 31), packed, None, A, B)
    with pytest.raises(ValueError, match="out_features=16"):
        lora_linear(x, packed, None, A, torch.randn(4, 15))
    trainable = nn.Parameter(packed.float(), requires_grad=True)
    trainable.quant_state = packed.quant_state
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, trainable, None, A, B)


def test_without_bitsandbytes_the_error_says_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    base = linear4bit(32, 16)
    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ImportError, match=r"lora_kernels\[qlora\]"):
        LoRALayer.from_linear(base, rank=4)


def minilm_4bit(quant_type="nf4"):
    """all-MiniLM-L6-v2 with every linear quantized by bitsandbytes on CPU (float32 compute),
    marked as transformers marks a 4-bit model."""
    real_models = pytest.importorskip("real_models")
    model = real_models.base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            q = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None,
                compute_dtype=torch.float32, quant_type=quant_type,
            )  # fmt: skip
            q.load_state_dict(module.state_dict())
            adapters.set_submodule(model, name, q.to("cpu"))
    model.is_loaded_in_4bit = True
    return model, real_models


def test_4bit_minilm_from_peft_round_trip_and_training(tmp_path):
    """A 4-bit MiniLM under peft's QLoRA layers: from_peft computes peft's outputs, our saved
    adapter loads back into peft on a fresh 4-bit MiniLM with equal outputs, and training
    steps lower the loss without touching a packed weight."""
    import peft

    from lora_kernels import save_peft_adapter

    model, real_models = minilm_4bit()
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value", "dense"], init_lora_weights=False
    )
    theirs = peft.get_peft_model(model, config)
    batch = real_models.batch()
    expected = hidden(theirs, batch)
    ours = from_peft(theirs)
    layers = adapters.lora_layers(ours)  # 5 per BERT layer and the pooler's dense
    assert len(layers) == 31 and all(quant.is_4bit(layer.weight) for layer in layers.values())
    assert_close("hidden", hidden(ours, batch), expected.double(), 1e-5)

    packed = {n: layer.linear.weight.data.clone() for n, layer in layers.items()}
    ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))

    def loss():
        return (ours(**batch).last_hidden_state - target).square().mean()

    losses = train_steps(params, loss, 3, 1e-3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(layers[n].linear.weight.data, w) for n, w in packed.items())

    ours.eval()
    save_peft_adapter(ours, tmp_path / "adapter")
    trained = hidden(ours, batch)
    fresh, _ = minilm_4bit()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert_close("hidden after the round trip", hidden(loaded, batch), trained.double(), 1e-5)


def hidden(model, batch):
    """The last hidden state of a model over bitsandbytes layers (its linears without LoRA run
    bitsandbytes' own forward), its input embeddings requiring grad: bitsandbytes repacks a
    4-bit weight in place on its first eval-mode CPU call without grad on AVX512-BF16 CPUs, and
    computes with another kernel from then on, which takes the weight out of the format every
    oracle here reads."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    return out.last_hidden_state.detach()
