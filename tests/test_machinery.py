"""PyTorch's machinery on models built from LoRALayer: torch.compile, autocast under compile,
activation checkpointing, DistributedDataParallel and FSDP2."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import WORLD, gloo, run_workers
from helpers import assert_close, assert_matches_eager
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_kernels import LoRALayer


def small_model(dropout=0.0, use_dora=False):
    torch.manual_seed(0)
    return nn.Sequential(
        LoRALayer(16, 32, rank=4, alpha=8, init="seed", dropout=dropout, use_dora=use_dora),
        nn.GELU(),
        LoRALayer(32, 8, rank=2, init="seed", dropout=dropout, use_dora=use_dora),
    )


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.inductor
def test_compile_fullgraph_matches_eager():
    model = small_model()
    x = torch.randn(2, 5, 16, requires_grad=True)
    model(x).square().mean().backward()
    eager_dx, eager = x.grad.clone(), trainable_grads(model)
    model.zero_grad(set_to_none=True)
    x.grad = None

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    assert_close("y", y, model(x).double(), 1e-6)
    y.square().mean().backward()
    assert_close("dx", x.grad, eager_dx.double(), 1e-6)
    grads = trainable_grads(model)
    assert grads.keys() == eager.keys() == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    for name in grads:
        assert_close(name, grads[name], eager[name].double(), 1e-6)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.inductor
def test_compile_fullgraph_under_autocast_matches_eager():
    """bfloat16 autocast around a compiled float32 model: eager's dtypes and numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRALayer(16, 32, rank=4, alpha=8, init="seed"),
        nn.GELU(),
        LoRALayer(32, 8, rank=2, init="seed"),
    )
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((y.detach(), grads))
        model.zero_grad(set_to_none=True)
    (y_eager, g_eager), (y_comp, g_comp) = results
    assert y_comp.dtype == torch.bfloat16
    assert_close("y", y_comp, y_eager.double(), 1e-2)
    for i, (got, want) in enumerate(zip(g_comp, g_eager)):
        assert got.dtype == torch.float32
        assert_close(f"grad {i}", got, want.double(), 1e-2)


# --- activation checkpointing ----------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_recomputes_the_same_dropout_mask(use_reentrant, backend):
    """Under torch.utils.checkpoint the forward runs twice; the recomputation draws the same seed
    (checkpoint restores the RNG state), so the gradients equal an uncheckpointed run's, bit for
    bit."""
    from helpers import KERNEL_DEVICE

    from lora_kernels import lora_linear

    dev = "cpu" if backend == "torch" else KERNEL_DEVICE
    gen = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(32, 16, generator=gen), torch.randn(8, 32, generator=gen)
    leaves = [
        torch.randn(5, 16, generator=gen),
        torch.randn(16, 4, generator=gen),
        torch.randn(4, 32, generator=gen),
        torch.randn(32, 2, generator=gen),
        torch.randn(2, 8, generator=gen),
    ]
    w1, w2 = w1.to(dev), w2.to(dev)
    leaves = [t.to(dev).requires_grad_(True) for t in leaves]

    def block(x, a1, b1, a2, b2):
        h = lora_linear(x, w1, None, a1, b1, 0.5, dropout_p=0.3, backend=backend)
        return lora_linear(torch.tanh(h), w2, None, a2, b2, 2.0, dropout_p=0.3, backend=backend)

    runs = []
    for fn in (block, lambda *t: checkpoint(block, *t, use_reentrant=use_reentrant)):
        torch.manual_seed(7)
        fn(*leaves).square().sum().backward()
        runs.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for i, (plain, ckpt) in enumerate(zip(*runs)):
        assert torch.equal(plain, ckpt), f"gradient {i} differs under checkpoint"


# --- DDP and FSDP2: 2 processes, gloo, CPU ------------------------------------------------


def _wrap(model, how):
    how = how.removesuffix("_dora")
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:  # FSDP2 as torchtune applies it: each layer, then the root
        if isinstance(layer, LoRALayer):
            if how == "fsdp2_inner":  # the frozen linear inside a unit of its own first
                fully_shard(layer.linear)
            fully_shard(layer)
    return fully_shard(model)


def _dist_worker(rank, world, out_dir, x, y, how):
    with gloo(rank, world, out_dir):
        model = _wrap(small_model(use_dora=how.endswith("_dora")), how)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        if how == "fsdp2_inner_dora":  # refused, naming what to wrap instead
            try:
                model(x[shard])
            except ValueError as e:
                torch.save({"error": str(e)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return model
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        params = (model.module if how.startswith("ddp") else model).named_parameters()
        # FSDP2 keeps each rank's shard of a gradient (a DTensor): gather the whole of it.
        grads = {n: p.grad if p.grad is None or how.startswith("ddp") else p.grad.full_tensor()
                 for n, p in params}  # fmt: skip
        error = None
        if how == "fsdp2":  # a layer's forward without its unit's hooks: the weight is a shard
            try:
                LoRALayer.forward(model[0], x[shard])
            except RuntimeError as e:
                error = str(e)
        torch.save({"grads": grads, "error": error}, os.path.join(out_dir, f"rank{rank}.pt"))
    return model


@pytest.mark.parametrize(
    "how", ["ddp", "fsdp2", "fsdp2_inner", "ddp_dora", "fsdp2_dora", "fsdp2_inner_dora"]
)
def test_data_parallel_gradients_equal_full_batch(tmp_path, how):
    """DistributedDataParallel and FSDP2 (``fully_shard``) over two ranks, FSDP2 also with each
    frozen linear a unit of its own inside its layer's (then called: it unshards only in its own
    forward): each rank's LoRA gradients (DoRA layers': the magnitudes' too) equal one
    process's full-batch gradients; frozen weights get none. DoRA over a linear that is a unit
    of its own is refused with a ValueError saying what to wrap."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 16, generator=gen), torch.randn(12, 8, generator=gen)
    run_workers(_dist_worker, (x, y, how), tmp_path, how)
    if how == "fsdp2_inner_dora":  # DoRA's norm reads W, whole only in the unit's own forward
        for rank in range(WORLD):
            error = torch.load(tmp_path / f"rank{rank}.pt")["error"]
            assert "FSDP unit of its own" in error and "LoRA layer" in error, error
        return
    single = small_model(use_dora=how.endswith("_dora"))
    nn.functional.mse_loss(single(x), y).backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        grads = result["grads"]
        if how == "fsdp2":
            assert "DTensor" in result["error"], result["error"]
        assert grads.keys() == dict(single.named_parameters()).keys()
        for name, p in single.named_parameters():
            if p.requires_grad:  # both average the shards' mean losses: the full-batch mean
                assert_close(f"rank {rank} {name}", grads[name], p.grad.double(), 1e-6)
            else:
                assert grads[name] is None, name  # frozen weights get no gradient


def assert_compiled_matches_eager(f, x, A, B):
    """``f(x, A, B)`` and its ``torch.compile(fullgraph=True)``: same output and gradients."""
    assert_matches_eager(f, torch.compile(f, fullgraph=True), x, A, B)


@pytest.mark.inductor
def test_compile_fullgraph_with_dropout_and_explicit_seed_matches_eager():
    """An explicit seed fixes the mask: compiled and eager runs agree, output and gradients."""
    from lora_kernels import lora_linear

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    w, b = torch.randn(12, 16, generator=gen), torch.randn(12, generator=gen)
    A = torch.randn(16, 4, generator=gen, requires_grad=True)
    B = torch.randn(4, 12, generator=gen, requires_grad=True)

    def f(x, A, B):
        return lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, seed=1234)

    assert_compiled_matches_eager(f, x, A, B)


@pytest.mark.inductor
def test_compile_fullgraph_layer_dropout():
    """LoRALayer's dropout (seed drawn per call) runs inside one graph; manual_seed reproduces
    the compiled run; eval mode equals eager."""
    model = small_model(dropout=0.3)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16)
    torch.manual_seed(5)
    y1 = compiled(x)
    torch.manual_seed(5)
    assert torch.equal(compiled(x), y1)
    assert not torch.equal(compiled(x), y1)  # a fresh seed, a fresh mask
    model.eval()
    assert_close("eval", compiled(x), model(x).double(), 1e-6)


@pytest.mark.inductor
@pytest.mark.parametrize(
    "dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_compile_fullgraph_triton_path(dtype, adapter_dtype):
    """The Triton path is two torch.library ops: one graph, and eager-equal results (the
    kernels run in the interpreter here, on a GPU for real); with float32 adapters on a
    bfloat16 layer too (the ops' fake results carry the adapters' gradient dtype)."""
    from helpers import KERNEL_DEVICE

    from lora_kernels import lora_linear

    gen = torch.Generator().manual_seed(3)
    dev = {"device": KERNEL_DEVICE, "dtype": dtype}
    ad = {"device": KERNEL_DEVICE, "dtype": adapter_dtype}
    x = torch.randn(6, 16, generator=gen).to(**dev).requires_grad_(True)
    w, b = torch.randn(12, 16, generator=gen).to(**dev), torch.randn(12, generator=gen).to(**dev)
    A = torch.randn(16, 4, generator=gen).to(**ad).requires_grad_(True)
    B = torch.randn(4, 12, generator=gen).to(**ad).requires_grad_(True)

    def f(x, A, B):
        return lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, seed=99, backend="triton")

    assert_compiled_matches_eager(f, x, A, B)


@pytest.mark.inductor
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
# ids: make floor's inductor run (`-m inductor -k "not triton_path"`) takes the torch one
@pytest.mark.parametrize("backend", ["torch", "triton"], ids=["torch_path", "triton_path"])
def test_compile_fullgraph_dynamic_shapes(backend, dynamic):
    """Batches of several sizes through one compiled function: with automatic dynamic shapes
    (the recompile after a second size) and dynamic=True (sizes symbolic, the rank included).
    The Triton path's launch plan must stay a constant of the graph (with dynamic=True it failed
    to compile: the plan's arguments were a tensor and a symbolic rank)."""
    from helpers import KERNEL_DEVICE

    from lora_kernels import lora_linear

    dev = "cpu" if backend == "torch" else KERNEL_DEVICE
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(12, 16, generator=gen).to(dev)
    A = torch.randn(16, 4, generator=gen).to(dev).requires_grad_(True)
    B = torch.randn(4, 12, generator=gen).to(dev).requires_grad_(True)

    def f(x, A, B):
        return lora_linear(x, w, None, A, B, 0.5, dropout_p=0.2, seed=5, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for m in (3, 5, 9):
        x = torch.randn(m, 16, generator=gen).to(dev).requires_grad_(True)
        assert_matches_eager(f, compiled, x, A, B, f"m={m} ")


@pytest.mark.inductor
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_compile_fullgraph_layer_training_dynamic_triton_path(monkeypatch, dropout):
    """A LoRALayer in training mode, compiled with dynamic=True, on the Triton path (what every
    GPU user gets). The layer's float dropout turns symbolic there; the plan's arguments must
    stay constants (it failed to compile: "assume_constant_result argument conversion")."""
    from lora_kernels import validation

    monkeypatch.setattr(validation, "AUTO_TRITON_DEVICE_TYPES", ("cuda", "cpu"))  # the interpreter
    torch.manual_seed(0)
    layer = LoRALayer(16, 12, rank=4, init="seed", dropout=dropout).train()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for m in (6, 3):
        x = torch.randn(m, 16, requires_grad=True)
        y = compiled(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        if dropout == 0.0:
            assert_close(f"M={m}", y, layer(x).double(), 1e-5)
