"""The LoRA weight gradients: reductions over the M tokens of a small and a wide operand.

    G = U^T drop(V)        U (M, r) float32, V (M, D)  ->  G (r, D)

computed as G^T = drop(V)^T U, tile by tile: the wide D side is the dot's M dimension, so each
(BLOCK_D x R) tile is a tensor-core shape on every generation (Hopper's wgmma needs M >= 64).

dB = (s S)^T dY            U = T from the forward, V = dY,  D = N
dA = (dropout(x)^T (s dS))^T: U = T from the dx pass, V = x (the forward's mask), D = K

M is split into SPLIT chunks; each program reduces one (chunk, D-tile) into a float32 partial,
and the partials are summed in a fixed order on the host: no atomics, so two runs give bitwise
identical gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import keep_threshold
from .common import alloc, dropout_keep, launch, mma_f32_rhs, padded_rank, tl_dtype

# Per GPU generation. BLOCK_M is the reduction step; BLOCK_D the width of the output tile.
# Ranks padded to >= 64 double the warps (and Ampere halves BLOCK_M): the (BLOCK_D x R)
# accumulator and the hi/lo split U tile otherwise pass 255 registers a thread and spill.
GRAD_CONFIGS = {
    8: {"BLOCK_M": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 4},
}
GRAD_CONFIGS_LARGE_RANK = {
    8: {"BLOCK_M": 32, "BLOCK_D": 128, "num_warps": 8, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_D": 128, "num_warps": 8, "num_stages": 4},
}
LARGE_RANK = 64
# With dropout (dA only), the mask's Philox state joins the registers: Ampere takes its
# large-rank config at every rank (64 x 128 spills at R >= 64). Keyed by arch.
GRAD_CONFIGS_16BIT_DROPOUT = {
    8: {"BLOCK_M": 32, "BLOCK_D": 128, "num_warps": 8, "num_stages": 3},
}
GRAD_CONFIGS_FP32 = {
    8: {"BLOCK_M": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3},
}
KNOWN_ARCHS = (8, 9)
# Enough programs to fill every SM about twice, but never chunks shorter than MIN_CHUNK_BLOCKS
# reduction steps (each chunk's partial costs an (r x D) float32 write and read).
PROGRAMS_PER_SM = 2
MIN_CHUNK_BLOCKS = 4


def grad_config(arch: int, dtype: torch.dtype, rank: int, dropout: bool = False) -> dict:
    """Launch config of ``_lora_grad_kernel`` for compute-capability major ``arch``;
    ``dropout`` for the dA launch with dropout."""
    arch = min(max(arch, KNOWN_ARCHS[0]), KNOWN_ARCHS[-1])
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if dropout and sixteen_bit and arch in GRAD_CONFIGS_16BIT_DROPOUT:
        return dict(GRAD_CONFIGS_16BIT_DROPOUT[arch])
    if not sixteen_bit:
        table = GRAD_CONFIGS_FP32
    elif padded_rank(rank) >= LARGE_RANK:
        table = GRAD_CONFIGS_LARGE_RANK
    else:
        table = GRAD_CONFIGS
    return dict(table[arch])


def num_splits(m: int, d: int, config: dict, num_sms: int) -> int:
    """How many M-chunks to reduce in parallel for an ``(m, d)`` wide operand."""
    d_tiles = triton.cdiv(d, config["BLOCK_D"])
    by_occupancy = triton.cdiv(num_sms * PROGRAMS_PER_SM, d_tiles)
    by_length = triton.cdiv(m, config["BLOCK_M"] * MIN_CHUNK_BLOCKS)
    return max(1, min(by_occupancy, by_length))


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_grad_kernel(
    # pointers
    u_ptr,  # U (M, RANK) ACC
    v_ptr,  # V (M, D)
    part_ptr,  # partials (SPLIT, RANK, D) ACC (any strides: dA writes them transposed)
    # sizes
    M,
    D,
    RANK,
    CHUNK,  # rows per split, a multiple of BLOCK_M
    # strides
    stride_um,
    stride_ur,
    stride_vm,
    stride_vd,
    stride_ps,
    stride_pr,
    stride_pd,
    # scalars
    dropout_threshold,  # int32, see lora_kernels.dropout.keep_threshold
    dropout_scale,
    seed,
    # meta-parameters
    DROPOUT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # float32 (float64 for float64 inputs)
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # --- tile mapping: axis 0 over D tiles, axis 1 over M chunks
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R)
    offs_mb = tl.arange(0, BLOCK_M)
    mask_d = offs_d < D
    mask_r = offs_r < RANK
    m_start = pid_s * CHUNK
    m_end = min(m_start + CHUNK, M)

    # --- main loop over this chunk's rows
    acc = tl.zeros((BLOCK_D, R), dtype=ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + rows[:, None] * stride_vm + offs_d.to(tl.int64)[None, :] * stride_vd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_d * BLOCK_D, BLOCK_D, dropout_threshold)
            v = tl.where(keep, v, 0.0)
        acc = mma_f32_rhs(tl.trans(v), u, acc, PRECISION, UPCAST)

    # --- epilogue: one float32 partial per (chunk, D tile); masked rows r >= RANK never stored
    if DROPOUT:
        acc = acc * dropout_scale
    part_ptrs = (
        part_ptr + pid_s * stride_ps + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr
    )
    tl.store(part_ptrs, acc, mask=mask_d[:, None] & mask_r[None, :])


def lora_grad(
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    transpose_out: bool,
    out_dtype: torch.dtype,
    config: dict,
    num_sms: int,
    precision: str,
    upcast: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    name: str = "lora_bwd_dB",
) -> torch.Tensor:
    """``u (M, r)`` float32, ``v (M, D)`` -> ``u^T drop(v)`` as ``(r, D)``, or ``(D, r)`` with
    ``transpose_out``, in ``out_dtype``."""
    (m, rank), d = u.shape, v.shape[1]
    out_shape = (d, rank) if transpose_out else (rank, d)
    if m == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=u.device)
    split, chunk, part, (stride_ps, stride_pr, stride_pd) = partials(u, d, transpose_out, config,
                                                                    num_sms)  # fmt: skip
    grid = (triton.cdiv(d, config["BLOCK_D"]), split)
    args = (
        u, v, part,
        m, d, rank, chunk,
        u.stride(0), u.stride(1),
        v.stride(0), v.stride(1),
        stride_ps, stride_pr, stride_pd,
        keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed,
    )  # fmt: skip
    meta = grad_meta(u, rank, dropout_p, config, precision, upcast)
    launch(name, _lora_grad_kernel, grid, args, meta)
    return reduce_partials(part, split, out_dtype)


def partials(u, d: int, transpose_out: bool, config: dict, num_sms: int):
    """``(splits, rows per split, partials, (stride_ps, stride_pr, stride_pd))`` of one
    reduction (shared with the descriptor launcher). The chunks are multiples of ``BLOCK_M``;
    the partials lie in the output's own layout, so the host-side sum lands contiguous."""
    m, rank = u.shape
    split = num_splits(m, d, config, num_sms)
    chunk = triton.cdiv(triton.cdiv(m, split), config["BLOCK_M"]) * config["BLOCK_M"]
    split = triton.cdiv(m, chunk)
    part = alloc((split, *((d, rank) if transpose_out else (rank, d))), u.dtype, u.device)
    stride_ps, first, second = part.stride()
    strides = (stride_ps, second, first) if transpose_out else (stride_ps, first, second)
    return split, chunk, part, strides


def grad_meta(u, rank: int, dropout_p: float, config: dict, precision: str, upcast: bool) -> dict:
    """The constexpr arguments both reduction kernels take (not the config's ``TMA`` flag)."""
    return {
        "DROPOUT": dropout_p > 0.0,
        "R": padded_rank(rank),
        "ACC": tl_dtype(u.dtype),
        "PRECISION": precision,
        "UPCAST": upcast,
        **{key: value for key, value in config.items() if key != "TMA"},
    }


def reduce_partials(part: torch.Tensor, split: int, out_dtype: torch.dtype) -> torch.Tensor:
    # NOTE: a fixed-order sum over the split axis (no atomics): deterministic run to run.
    grad = part[0] if split == 1 else part.sum(0)
    return grad.to(out_dtype)
