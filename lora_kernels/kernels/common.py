"""Pieces every LoRA kernel shares: the dot wrappers, the rank padding, output allocation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # host-built descriptors (Hopper's TMA): Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover  (older Triton: the pointer kernels only)
    TensorDescriptor = None

# tl.dot needs every dimension >= 16; the rank is padded (masked) to a power of two >= 16 inside
# the kernels, never in user memory.
MIN_DOT_DIM = 16

# Every launch passes this option explicitly: Triton 3.9 warns when it is left to its default,
# and FMA contraction is what the accumulation in every kernel here wants.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# TMA's rules (CUDA's cuTensorMapEncodeTiled): 16-byte aligned base and strides, unit last stride.
TMA_ALIGN = 16

# Tests set this to fill every kernel output with NaN before launch, so an element a kernel
# forgets to write fails the comparison instead of passing by luck on zero-filled memory.
POISON_OUTPUTS = False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator (and saved ``T``) dtype: float32, or float64 for float64 inputs, which the
    kernels take so ``gradcheck`` can verify them (no tensor cores in float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a torch floating dtype (for ``tl.constexpr`` arguments)."""
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


def padded_rank(rank: int) -> int:
    """``R``: the rank as the kernels see it, a power of two >= 16.

    A plain loop (not ``triton.next_power_of_2``): the launch plan is chosen from it inside
    ``torch.compile``'s trace, where with ``dynamic=True`` the rank is a symbolic size; each
    comparison then becomes a guard and ``R`` a constant of the graph."""
    padded = MIN_DOT_DIM
    while padded < rank:
        padded *= 2
    return padded


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when ``POISON_OUTPUTS`` is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def describable(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``(row-major tensor, transposed)`` to build ``t``'s TMA descriptor from: ``t`` itself
    when its last stride is 1, ``t.T`` when ``t`` is the transposed view of a row-major tensor;
    ``None`` when TMA can't describe it (another layout, a misaligned base or stride, an empty
    tensor)."""
    if t.dim() != 2 or t.numel() == 0:
        return None
    if t.stride(1) == 1:
        base, transposed = t, False
    elif t.stride(0) == 1:
        base, transposed = t.t(), True
    else:
        return None
    if base.data_ptr() % TMA_ALIGN or (base.stride(0) * base.element_size()) % TMA_ALIGN:
        return None
    return base, transposed


@dataclass
class Launch:
    """One kernel launch, as ``launch`` would make it: what ``inspect`` compiles for a GPU."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture_launches():
    """Record launches instead of running them (tensors may live on the ``meta`` device)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def launch(name: str, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)`` on the GPU its tensors live on, or recorded under
    ``capture_launches``.

    NOTE: Triton launches on the *current* CUDA device and its current stream, whatever device the
    arguments live on (triton-lang/triton#2441). A model split over GPUs in one process
    (transformers' ``device_map="auto"``) has layers on ``cuda:1`` while ``cuda:0`` is current:
    those launches run under ``torch.cuda.device`` of their own tensors.
    """
    kwargs = {**kwargs, **LAUNCH_OPTIONS}
    if _captured is not None:
        _captured.append(Launch(name, kernel, grid, args, kwargs))
        return
    device = next(a.device for a in args if hasattr(a, "device"))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of the ``tile``-th output tile in the grouped order: ``GROUP_M``
    row-blocks walk the column-blocks together, so they share each column-block of W in L2
    (Triton's tutorial 03). Launched tile by tile, or walked by a persistent grid."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on tensor cores; fp32 accumulation.

    NOTE: ``UPCAST`` is for Triton's interpreter only, where ``tl.dot`` on bfloat16 is wrong
    (triton issue 11584): the operands go through float32, which the interpreter multiplies
    exactly. GPU builds never set it.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def fp16_fit(big):
    """``(scale, inv)`` for the fp32 magnitudes ``big`` (a row's or a column's largest): a power
    of two bringing each under ``2**15`` (``big * inv``), and its inverse; 1 where it already
    is (and for inf / NaN, which pass as they are). Built from the exponent bits, so both are
    exact and multiplying by them loses nothing: float16 (largest 65504) then holds the hi part
    of a hi / lo split."""
    e = (big.to(tl.uint32, bitcast=True) >> 23) & 0xFF  # big < 2 ** (e - 126)
    # NOTE: float16's largest finite value is 65504; 142 is the biased exponent of 2**15.
    over = (e >= 142) & (e < 255)
    # scale = 2 ** (e - 127 - 14), inv = 2 ** (127 - (e - 141)): |v| * inv < 2 ** 15
    e = tl.where(over, e, 142)
    scale = tl.where(over, ((e - 14) << 23).to(tl.float32, bitcast=True), 1.0)
    inv = tl.where(over, ((268 - e) << 23).to(tl.float32, bitcast=True), 1.0)
    return scale, inv


@triton.jit
def mma_f32_lhs(a_f32, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a_f32 @ b`` where ``a_f32`` is an fp32 accumulator tile and ``b`` is an input tile.

    NOTE: for 16-bit ``b``, ``a_f32`` is split into ``hi + lo`` in ``b``'s dtype and multiplied
    twice, so the LoRA intermediate keeps ~16 mantissa bits instead of being rounded to 8 (bf16)
    or 11 (fp16) before the second product. The extra dot is ``r / K`` of the main GEMM's work.
    float16 b: rows of ``a_f32`` past float16's range are scaled down by a power of two first
    (``acc``'s rows with them, and back after: exact), so the LoRA intermediate keeps float32's
    range, as float32 adapters promise (peft computes that branch in float32).
    """
    if b.dtype == a_f32.dtype:
        return mma(a_f32, b, acc, PRECISION, UPCAST)
    elif b.dtype == tl.float16:
        scale, inv = fp16_fit(tl.max(tl.abs(a_f32), axis=1))
        acc = _split_lhs(a_f32 * inv[:, None], b, acc * inv[:, None], PRECISION, UPCAST)
        return acc * scale[:, None]
    else:
        return _split_lhs(a_f32, b, acc, PRECISION, UPCAST)


@triton.jit
def _split_lhs(a_f32, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a_f32 @ b`` with ``a_f32`` split into ``hi + lo`` in ``b``'s dtype (``b``
    16-bit, ``a_f32`` within its range): two dots."""
    a_hi = a_f32.to(b.dtype)
    a_lo = (a_f32 - a_hi.to(a_f32.dtype)).to(b.dtype)
    acc = mma(a_hi, b, acc, PRECISION, UPCAST)
    return mma(a_lo, b, acc, PRECISION, UPCAST)


@triton.jit
def mma_f32_rhs(a, b_f32, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b_f32``: ``mma_f32_lhs`` with the float32 operand on the right. NOTE: with
    float16 ``a`` the caller keeps ``b_f32`` under float16's range (``lora_grad``'s ``FIT``)."""
    if a.dtype == b_f32.dtype:
        return mma(a, b_f32, acc, PRECISION, UPCAST)
    else:
        b_hi = b_f32.to(a.dtype)
        b_lo = (b_f32 - b_hi.to(b_f32.dtype)).to(a.dtype)
        acc = mma(a, b_hi, acc, PRECISION, UPCAST)
        return mma(a, b_lo, acc, PRECISION, UPCAST)


@triton.jit
def to_output(acc, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Cast an fp32 tile to the output dtype, rounding to nearest even.

    NOTE: Triton's interpreter truncates fp32 -> bfloat16 (the GPU rounds to nearest even), so
    interpreter bf16 runs (``UPCAST``) add the rounding bias to the fp32 bits first; truncating
    the biased value is round-to-nearest-even. Only normal numbers are biased: zeros, subnormals
    (which the interpreter's conversion mishandles once biased), Inf and NaN pass untouched.
    """
    if UPCAST:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        normal = (tl.abs(acc) >= 1.1754943508222875e-38) & (tl.abs(acc) < float("inf"))
        acc = tl.where(normal, bits.to(tl.float32, bitcast=True), acc)
    return acc.to(dtype)


@triton.jit
def dropout_keep(seed, rows, col_start, BLOCK_COLS: tl.constexpr, threshold):
    """Keep-mask ``(len(rows), BLOCK_COLS)`` of the elements ``(row, col_start + j)`` of x.

    Philox4x32 keyed on ``seed`` with the counter ``(col // 4, row)``: one call gives the four
    random words of columns ``4c .. 4c + 3``, interleaved back into column order. The mask is a
    function of the element's position only, never of tile sizes or programs, so forward, dx and
    dA regenerate the same mask. ``col_start`` must be a multiple of 4 (every block is).
    """
    quads = (col_start // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.uint32)
    # NOTE: tl.philox with explicit 32-bit counters, not tl.randint4x on an int64 counter: up to
    # Triton 3.3, randint4x runs Philox4x64 on 64-bit offsets (other words); from 3.4 it splits
    # them into (lo, hi). philox itself is the same from Triton 3.2 to 3.9.
    c0, c1 = tl.broadcast(quads[None, :], rows.to(tl.uint32)[:, None])
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    # NOTE: flipping the top bit maps uint32 order onto int32 order (lora_kernels.dropout).
    signed = (words ^ 0x80000000).to(tl.int32, bitcast=True)
    return signed >= threshold
