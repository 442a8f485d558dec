"""Shared test helpers: input factories and the float64 comparison every test uses."""

from __future__ import annotations

import zlib

import torch

from lora_kernels.reference import lora_linear_reference, relative_errors
from lora_kernels.testing import drawn_mask, dropped  # noqa: F401  (dropped: for the tests)

# (dtype, relative error bound against float64) for the plain-PyTorch path.
TORCH_PATH_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def seed_for(*case) -> int:
    """A per-case generator seed that is stable across runs (unlike ``hash`` of strings)."""
    return zlib.crc32(repr(case).encode())


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Fail unless ``relative_errors(out, ref) <= rtol`` everywhere (``|out - ref| / (|ref| +
    mean|ref|)``, see ``lora_kernels.reference``); ``ref`` is float64. On failure the message
    names the worst element, its value and the reference's.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out64, ref64 = out.detach().double(), ref.detach().double()
    err = relative_errors(out64, ref64)
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.max() <= rtol, (
        f"{name}: relative error {err.max().item():.3e} > {rtol:.1e} at {idx}: "
        f"got {out64[idx].item()!r}, reference {ref64[idx].item()!r}"
    )


def train_steps(params, loss, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps on ``params`` of the scalar ``loss()`` returns: the losses."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        value = loss()
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    return losses


def make_x(lead: tuple[int, ...], k: int, dtype: torch.dtype, layout: str, gen) -> torch.Tensor:
    """Input of shape ``(*lead, k)``: contiguous, or a non-contiguous view of a larger tensor."""
    # NOTE: cast first, then take the view: .to() of a view with gaps returns a contiguous copy.
    if layout == "contiguous":
        return torch.randn(*lead, k, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "strided":  # every other column of a (.., 2k) tensor
        return torch.randn(*lead, 2 * k, generator=gen, dtype=torch.float64).to(dtype)[..., ::2]
    if layout == "transposed":  # leading dims stored after the feature dim
        return torch.randn(k, *lead, generator=gen, dtype=torch.float64).to(dtype).movedim(0, -1)
    raise ValueError(layout)


def make_params(k: int, n: int, r: int, dtype: torch.dtype, bias: bool, gen) -> dict:
    """``weight, bias, lora_A, lora_B`` with magnitudes like a trained layer (B non-zero)."""

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    return {
        "weight": rand(n, k, std=k**-0.5),
        "bias": rand(n) if bias else None,
        "lora_A": rand(k, r, std=k**-0.5),
        "lora_B": rand(r, n, std=r**-0.5),
    }


def run_with_grads(fn, x: torch.Tensor, params: dict, dy: torch.Tensor, **kwargs):
    """Call ``fn(x, weight, bias, lora_A, lora_B, **kwargs)`` on fresh leaves requiring grad;
    return ``(y, {name: grad})`` for every tensor input."""
    # detach, not clone: the leaf keeps the caller's (possibly non-contiguous) strides.
    leaves = {"x": x.detach().requires_grad_(True)}
    for name, t in params.items():
        leaves[name] = None if t is None else t.detach().clone().requires_grad_(True)
    y = fn(
        leaves["x"],
        leaves["weight"],
        leaves["bias"],
        leaves["lora_A"],
        leaves["lora_B"],
        **kwargs,
    )
    y.backward(dy)
    return y, {name: t.grad for name, t in leaves.items() if t is not None}


def reference_with_grads(x, params, dy, scaling, **kwargs):
    """The float64 oracle's output and gradients for the same inputs."""
    params64 = {k: None if v is None else v.double() for k, v in params.items()}
    return run_with_grads(
        lora_linear_reference, x.double(), params64, dy.double(), scaling=scaling, **kwargs
    )


# The device the Triton backend's tests run on: CUDA when present, else the interpreter on CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bounds of the Triton backend against float64 (see docs/kernels.md). In the
# interpreter dots are exact, so the bounds are the output dtype's rounding with margin.
TRITON_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 1e-2,
}

# The device each backend's tests run on, and its relative error bounds against float64. The
# torch path rounds dx twice in 16-bit (dy W, then the LoRA term added): 2e-3 is about two fp16
# half-ulps of the terms, 2e-2 two bf16 ones.
BACKEND_DEVICE = {"torch": "cpu", "triton": KERNEL_DEVICE}
BACKEND_TOL = {
    "torch": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2},
    "triton": TRITON_TOL,
}


def read_mask(m, k, p, seed, backend):
    """The boolean ``(m, k)`` keep-mask a call with this seed draws on ``backend``."""
    return drawn_mask(m, k, p, seed, backend, BACKEND_DEVICE[backend])


def assert_matches_eager(f, compiled, x, A, B, label: str = "") -> None:
    """``compiled`` (a ``torch.compile`` of ``f``) gives ``f(x, A, B)``'s output and its
    gradients for ``x``, ``A`` and ``B`` (a loss of ``y.square().sum()``), to 1e-6 relative."""
    results = []
    for fn in (f, compiled):
        y = fn(x, A, B)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()))
        x.grad = A.grad = B.grad = None
    for name, got, want in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
        assert_close(f"{label}{name}", got, want.double(), 1e-6)
