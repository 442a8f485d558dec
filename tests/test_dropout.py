"""LoRA dropout: peft's semantics, a mask regenerated from a seed, nothing extra saved.

The mask is read back exactly: with ``K = r = N``, ``W = 0``, ``A = B = I`` and ``s = 1`` the
layer outputs ``dropout(x)`` itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import BACKEND_TOL as TOL
from helpers import KERNEL_DEVICE, assert_close, dropped, make_params, make_x, read_mask, seed_for

from lora_kernels import (
    LoRALayer,
    LoRALinearFunction,
    dropout,
    lora_linear,
    torch_path,
    triton_path,
)
from lora_kernels.dropout import CHUNK_ELEMS
from lora_kernels.kernels import common
from lora_kernels.reference import lora_linear_reference

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_fraction_and_values(backend, p, dtype):
    m, k = 256, 64
    gen = torch.Generator().manual_seed(seed_for(backend, p, dtype))
    x = (torch.rand(m, k, generator=gen) + 0.5).to(dtype).to(DEVICE[backend])  # never zero
    y = dropped(x, p, 1234, backend)
    keep = y != 0
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Kept values are exactly x / (1 - p), as fp32 x * (1 / (1 - p)) rounded once to the dtype.
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    expected = (x.float() * scale).to(dtype)
    assert torch.equal(y[keep], expected[keep])
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_determines_the_mask(backend):
    a = read_mask(100, 40, 0.3, 7, backend)
    assert torch.equal(a, read_mask(100, 40, 0.3, 7, backend))
    assert not torch.equal(a, read_mask(100, 40, 0.3, 8, backend))
    # Columns are independent draws: no two rows (or columns) repeat the same pattern.
    assert len({tuple(r.tolist()) for r in a}) == a.shape[0]


@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.9])
def test_cpu_drop_positions(p):
    """The CPU mask's definition over several chunks: ascending, in range, each element dropped
    independently with probability p (the drop fraction, and that of neighbouring pairs, within
    5 sigma), and each chunk its own stream (the pool computes them in any order)."""
    n = 3 * CHUNK_ELEMS + 12345
    positions = dropout.drop_positions(n, p, 77)
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all())
    assert positions.numel() == 0 or 0 <= int(positions[0]) and int(positions[-1]) < n
    drop = torch.zeros(n, dtype=torch.bool)
    drop[positions] = True
    for observed, q, count in [
        (drop.double().mean(), p, n),
        ((drop[1:] & drop[:-1]).double().mean(), p * p, n - 1),
    ]:
        assert abs(float(observed) - q) < 5 * math.sqrt(q * (1 - q) / count) + 1e-12
    chunks = [
        dropout._chunk_positions(
            (s, min(CHUNK_ELEMS, n - s), p, dropout._chunk_seed(77, s // CHUNK_ELEMS))
        )
        for s in reversed(range(0, n, CHUNK_ELEMS))
    ]
    assert torch.equal(torch.cat(chunks[::-1]), positions)


@pytest.mark.parametrize("n", [1, 1000, CHUNK_ELEMS - 1, CHUNK_ELEMS + 7, 2 * CHUNK_ELEMS])
def test_cpu_mask_of_fewer_rows_is_a_prefix(n):
    """A function of the position only: the mask of ``n`` elements is the first ``n`` of a longer
    one's (a shorter last chunk walks the same gaps), and another seed gives another mask."""
    longer = dropout.drop_positions(2 * CHUNK_ELEMS + 100, 0.1, 5)
    assert torch.equal(dropout.drop_positions(n, 0.1, 5), longer[longer < n])
    if n >= 1000:
        assert not torch.equal(dropout.drop_positions(n, 0.1, 6), longer[longer < n])


def test_cpu_mask_compiled_and_eager_agree():
    """keep_mask (the bool mask compiled graphs multiply by) is drop_positions' complement."""
    m, k = 300, 1000
    keep = dropout.keep_mask((m, k), 0.2, 31, torch.device("cpu"))
    expected = torch.ones(m * k, dtype=torch.bool)
    expected[dropout.drop_positions(m * k, 0.2, 31)] = False
    assert torch.equal(keep.reshape(-1), expected)
    assert torch.equal(keep, read_mask(m, k, 0.2, 31, "torch"))


def test_a_dropped_nan_does_not_reach_the_lora_branch():
    """The CPU path zeroes dropped elements (index_fill_), as the kernels' where does, instead of
    multiplying them by 0: a NaN there leaves the LoRA branch's S = dropout(x) A finite."""
    m, k, p, seed = 6, 40, 0.3, 9
    gen = torch.Generator().manual_seed(3)
    params = make_params(k, 5, 4, torch.float32, False, gen)
    drops = dropout.drop_positions(m * k, p, seed)
    x = make_x((m,), k, torch.float32, "contiguous", gen)
    clean = x.clone()
    x.view(-1)[drops[0]] = float("nan")
    args = (params["weight"], None, params["lora_A"], params["lora_B"], 1.0, p, seed)
    _, S = torch_path.forward(x, *args)
    assert torch.isfinite(S).all()
    assert torch.equal(S, torch_path.forward(clean, *args)[1])


def test_triton_mask_does_not_depend_on_tiles(monkeypatch):
    """Ampere's and Hopper's tile configs (different BLOCK sizes everywhere) give one mask."""
    masks = []
    for arch in (8, 9):
        monkeypatch.setattr(triton_path, "INTERPRETER_ARCH", arch)
        triton_path._device_facts.cache_clear()
        masks.append(read_mask(300, 130, 0.2, 99, "triton"))
    triton_path._device_facts.cache_clear()
    assert torch.equal(masks[0], masks[1])


def philox4x32_10(counters, key):
    """Philox4x32-10 (Salmon et al., SC'11), written from the paper in numpy: the independent
    definition the Triton mask is held to. ``counters``: uint32 array ``(..., 4)``; ``key``: 2."""
    mul0, mul1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    bump0, bump1, low = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85), np.uint64(0xFFFFFFFF)
    c = [counters[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        p0, p1 = mul0 * c[0], mul1 * c[2]  # 32 x 32 -> 64-bit products: exact in uint64
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & low, (p0 >> 32) ^ c[3] ^ k1, p0 & low]
        k0, k1 = (k0 + bump0) & low, (k1 + bump1) & low
    return np.stack(c, axis=-1).astype(np.uint32)


def test_philox_reference_known_answers():
    """The numpy Philox against Random123's published known-answer vectors."""
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for counters, key, expected in kat:
        got = philox4x32_10(np.array(counters, dtype=np.uint32), key)
        assert got.tolist() == expected


@pytest.mark.parametrize("m, k, p, seed", [(37, 130, 0.3, 7), (5, 9, 0.9, 2**31 - 1)])
def test_triton_mask_is_the_documented_philox(m, k, p, seed):
    """docs/dropout.md's definition, bit for bit: element ``(row, col)`` is kept iff word
    ``col % 4`` of Philox4x32-10(counter ``(col // 4, row, 0, 0)``, key ``(seed, 0)``) is
    ``>= p * 2**32``. Pins the words against Triton versions whose ``tl.randint4x`` differ."""
    rows, quads = np.meshgrid(np.arange(m), np.arange((k + 3) // 4), indexing="ij")
    counters = np.stack([quads, rows, 0 * rows, 0 * rows], axis=-1).astype(np.uint32)
    words = philox4x32_10(counters, (seed, 0)).reshape(m, -1)[:, :k]
    expected = torch.from_numpy(words.astype(np.int64) >= min(int(p * 2**32), 2**32 - 1))
    assert torch.equal(read_mask(m, k, p, seed, "triton").cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_reproduces(backend):
    gen = torch.Generator().manual_seed(3)
    x = make_x((20,), 16, torch.float32, "contiguous", gen).to(DEVICE[backend])
    p = {
        k: v.to(DEVICE[backend]) for k, v in make_params(16, 8, 4, torch.float32, True, gen).items()
    }

    def call():
        return lora_linear(x, **p, dropout_p=0.5, backend=backend)  # seed=None: drawn

    torch.manual_seed(0)
    y1 = call()
    y2 = call()
    torch.manual_seed(0)
    assert torch.equal(call(), y1)
    assert not torch.equal(y1, y2)


# One chunk of the mask (the main thread), and three (the pool's threads).
@pytest.mark.parametrize("m", [5, 2 * CHUNK_ELEMS // 64 + 3])
def test_inference_mode_first_then_training(m):
    """A first dropout call under torch.inference_mode (generation with a model left in train
    mode) must not leave buffers that later calls outside it can't refill."""
    gen = torch.Generator().manual_seed(6)
    x = make_x((m,), 64, torch.float32, "contiguous", gen)
    p = make_params(64, 8, 4, torch.float32, True, gen)
    with torch.inference_mode():
        y_inference = lora_linear(x, **p, dropout_p=0.5, seed=12, backend="torch")
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    y = lora_linear(x, **leaves, dropout_p=0.5, seed=12, backend="torch")
    y.sum().backward()
    assert torch.equal(y.detach(), y_inference)


def test_layer_manual_seed_and_eval():
    torch.manual_seed(4)
    layer = LoRALayer(32, 16, rank=4, dropout=0.3, init="seed")
    x = torch.randn(10, 32)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), y1)
    layer.eval()
    no_dropout = lora_linear(
        x, layer.linear.weight, layer.linear.bias, layer.lora_A, layer.lora_B, layer.scaling
    )
    assert torch.equal(layer(x), no_dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lead, k, n, rank",
    [
        ((64,), 64, 64, 8),
        # odd shapes
        ((17,), 33, 20, 5),
        ((127,), 17, 300, 3),
        ((3, 7), 130, 9, 33),
    ],
)
def test_backward_uses_the_forward_mask(backend, dtype, lead, k, n, rank):
    """Output and every gradient equal the reference with the read-back mask applied."""
    check_against_reference(backend, dtype, lead, k, n, rank, "contiguous")


def check_against_reference(backend, dtype, lead, k, n, rank, layout, requires=None):
    """One dropout call's output and gradients (of the leaves ``requires`` names, default all)
    against the float64 reference with the read-back mask."""
    p, seed, scaling = 0.25, 2024, 0.5
    gen = torch.Generator().manual_seed(seed_for(backend, dtype, lead, k, n, rank, layout))
    dev = DEVICE[backend]
    x = make_x(lead, k, dtype, layout, gen).to(dev)
    params = {k_: v.to(dev) for k_, v in make_params(k, n, rank, dtype, True, gen).items()}
    dy = torch.randn(*lead, n, generator=gen).to(dtype).to(dev)
    mask = read_mask(math.prod(lead), k, p, seed, backend).reshape(*lead, k)

    leaves = {"x": x, **params}
    requires = requires or list(leaves)
    leaves = {n: t.detach().clone().requires_grad_(n in requires) for n, t in leaves.items()}
    y = lora_linear(*leaves.values(), scaling, dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)

    ref_leaves = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    y_ref = lora_linear_reference(
        *ref_leaves.values(), scaling, dropout_mask=mask.double(), dropout_p=p
    )
    y_ref.backward(dy.double())
    tol = TOL[backend][dtype]
    assert_close("y", y, y_ref, tol)
    for name in requires:
        assert_close(f"d{name}", leaves[name].grad, ref_leaves[name].grad, tol)
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("requires", [None, ["x"], ["lora_A"]], ids=["all", "x", "A"])
def test_torch_path_blocks_of_rows(monkeypatch, dtype, layout, requires):
    """Eager CPU dropout runs in blocks of rows (the last one short); same mask, same math."""
    lead, k, n, rank = (37,), 33, 20, 5
    whole = read_mask(37, k, 0.25, 2024, "torch")
    monkeypatch.setattr(torch_path, "BLOCK_ELEMS", 4 * k)  # blocks of 4 rows: 9 x 4 + 1
    assert torch_path._block_rows(k) == 4
    mask = check_against_reference("torch", dtype, lead, k, n, rank, layout, requires)
    assert torch.equal(mask, whole)


def test_triton_gradcheck_with_dropout():
    gen = torch.Generator().manual_seed(5)
    x = make_x((2, 3), 6, torch.float64, "contiguous", gen)
    p = make_params(6, 4, 3, torch.float64, True, gen)
    inputs = [x, p["weight"], p["bias"], p["lora_A"], p["lora_B"]]
    inputs = [t.to(KERNEL_DEVICE).requires_grad_(True) for t in inputs]

    def fn(*tensors):
        return LoRALinearFunction.apply(*tensors, 0.7, 0.4, 77, "triton")

    assert torch.autograd.gradcheck(fn, inputs)


def saved_bytes(backend, dropout_p):
    """Bytes of every tensor saved for backward by one call (x, A, B requiring grad)."""
    gen = torch.Generator().manual_seed(6)
    dev = DEVICE[backend]
    x = make_x((128,), 64, torch.float32, "contiguous", gen).to(dev).requires_grad_(True)
    p = {k: v.to(dev) for k, v in make_params(64, 48, 8, torch.float32, True, gen).items()}
    A, B = p["lora_A"].requires_grad_(True), p["lora_B"].requires_grad_(True)
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, p["weight"], p["bias"], A, B, dropout_p=dropout_p, backend=backend)
    return sorted(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_nothing_more(backend):
    with_dropout = saved_bytes(backend, 0.1)
    assert with_dropout == saved_bytes(backend, 0.0)
    # x (128 x 64 fp32), W, A, B and S (128 x 8 fp32): nothing of size M x K but x itself.
    assert with_dropout.count(128 * 64 * 4) == 1
