"""The LoRA weight gradients: reductions over the M tokens of a small and a wide operand.

    G = U^T drop(V)        U (M, r) float32, V (M, D)  ->  G (r, D)

computed as G^T = drop(V)^T U, tile by tile: the wide D side is the dot's M dimension, so each
(BLOCK_D x R) tile is a tensor-core shape on every generation (Hopper's wgmma needs M >= 64).

dB = (s S)^T dY            U = T from the forward, V = dY,  D = N
dA = (dropout(x)^T (s dS))^T: U = T from the dx pass, V = x (the forward's mask), D = K

M is split into SPLIT chunks; each program reduces one (chunk, D-tile) into a float32 partial,
and the partials are summed in a fixed order on the host: no atomics, so two runs give bitwise
identical gradients.

Two kernels, one reduction: ``_lora_grad_kernel`` loads its tiles through pointers, one program
per (chunk, D tile); ``_lora_grad_tma_kernel`` (Hopper and later) reads ``U`` and ``V`` through
tensor descriptors, one bulk copy a tile, and one program per SM walks the same items
(``item += NUM_PROGRAMS``). Chunks are multiples of ``BLOCK_M``, so a descriptor tile never
straddles two chunks; the last one's rows past M read as zeros. ``lora_grad`` launches the
descriptor kernel where the config asks for it and TMA can describe both operands
(``supports``), the pointer kernel everywhere else. The configs are ``kernels/configs.py``'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import keep_threshold
from .common import (
    TensorDescriptor,
    alloc,
    describable,
    dropout_keep,
    fp16_fit,
    launch,
    mma_f32_rhs,
    padded_rank,
    tl_dtype,
)

# Enough programs to fill every SM about twice, but never chunks shorter than MIN_CHUNK_BLOCKS
# reduction steps (each chunk's partial costs an (r x D) float32 write and read).
PROGRAMS_PER_SM = 2
MIN_CHUNK_BLOCKS = 4


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_grad_kernel(
    # pointers
    u_ptr,  # U (M, RANK) ACC
    v_ptr,  # V (M, D)
    part_ptr,  # partials (SPLIT, RANK, D) ACC (any strides: dA writes them transposed)
    z_ptr,  # DM: DoRA's z (M, D); else None
    dm_ptr,  # DM: partials (SPLIT, D) ACC of sum_rows(V z), contiguous; else None
    fit_ptr,  # FIT: (2, RANK) float32: U's column scales, then their inverses; else None
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
    stride_zm,
    stride_zd,
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
    DM: tl.constexpr,  # DoRA's dB launch: also sum_rows(dY z), the magnitude's gradient
    FIT: tl.constexpr,  # float16 V: U's columns times fit's inverses, the sum times its scales
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

    if FIT:
        fit_scale = tl.load(fit_ptr + offs_r, mask=mask_r, other=1.0)
        fit_inv = tl.load(fit_ptr + RANK + offs_r, mask=mask_r, other=1.0)

    # --- main loop over this chunk's rows
    acc = tl.zeros((BLOCK_D, R), dtype=ACC)
    dm = tl.zeros((BLOCK_D,), dtype=ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        if FIT:
            u = u * fit_inv[None, :]
        v = tl.load(
            v_ptr + rows[:, None] * stride_vm + offs_d.to(tl.int64)[None, :] * stride_vd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_d * BLOCK_D, BLOCK_D, dropout_threshold)
            v = tl.where(keep, v, 0.0)
        if DM:
            z = tl.load(
                z_ptr + rows[:, None] * stride_zm + offs_d.to(tl.int64)[None, :] * stride_zd,
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            dm += tl.sum(v.to(ACC) * z.to(ACC), axis=0)
        acc = mma_f32_rhs(tl.trans(v), u, acc, PRECISION, UPCAST)

    # --- epilogue: one float32 partial per (chunk, D tile); masked rows r >= RANK never stored
    if DM:
        tl.store(dm_ptr + pid_s * D + offs_d, dm, mask=mask_d)
    if FIT:
        acc = acc * fit_scale[None, :]
    if DROPOUT:
        acc = acc * dropout_scale
    part_ptrs = (
        part_ptr + pid_s * stride_ps + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr
    )
    tl.store(part_ptrs, acc, mask=mask_d[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_grad_tma_kernel(
    # descriptors
    u_desc,  # U (M, RANK) ACC, block (BLOCK_M, R)
    v_desc,  # V (M, D), block (BLOCK_M, BLOCK_D)
    # pointers
    part_ptr,  # partials (SPLIT, RANK, D) ACC (any strides: dA writes them transposed)
    z_desc,  # DM: DoRA's z (M, D), block (BLOCK_M, BLOCK_D); else None
    dm_ptr,  # DM: partials (SPLIT, D) ACC, contiguous; else None
    fit_ptr,  # FIT: as the pointer kernel's
    # sizes
    M,
    D,
    RANK,
    CHUNK,  # rows per split, a multiple of BLOCK_M
    SPLIT,
    NUM_PROGRAMS,
    # strides
    stride_ps,
    stride_pr,
    stride_pd,
    # scalars
    dropout_threshold,
    dropout_scale,
    seed,
    # meta-parameters
    DROPOUT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    DM: tl.constexpr,
    FIT: tl.constexpr,
):
    num_d = tl.cdiv(D, BLOCK_D)
    if FIT:
        offs_fit = tl.arange(0, R)
        fit_scale = tl.load(fit_ptr + offs_fit, mask=offs_fit < RANK, other=1.0)
        fit_inv = tl.load(fit_ptr + RANK + offs_fit, mask=offs_fit < RANK, other=1.0)
    for item in range(tl.program_id(0), num_d * SPLIT, NUM_PROGRAMS):
        # --- work mapping: D tiles fastest, as the pointer kernel's grid axis 0
        pid_d = item % num_d
        pid_s = item // num_d
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, R)
        m_start = pid_s * CHUNK
        m_end = min(m_start + CHUNK, M)

        # --- main loop over this chunk's rows
        acc = tl.zeros((BLOCK_D, R), dtype=ACC)
        dm = tl.zeros((BLOCK_D,), dtype=ACC)
        for m0 in range(m_start, m_end, BLOCK_M):
            u = u_desc.load([m0, 0])
            if FIT:
                u = u * fit_inv[None, :]
            v = v_desc.load([m0, pid_d * BLOCK_D])
            if DM:  # (rows past M read as zeros, in z and in V)
                z = z_desc.load([m0, pid_d * BLOCK_D])
                dm += tl.sum(v.to(ACC) * z.to(ACC), axis=0)
            if DROPOUT:
                offs_m = m0 + tl.arange(0, BLOCK_M)
                keep = dropout_keep(seed, offs_m, pid_d * BLOCK_D, BLOCK_D, dropout_threshold)
                v = tl.where(keep, v, 0.0)
            acc = mma_f32_rhs(tl.trans(v), u, acc, PRECISION, UPCAST)

        # --- epilogue: one float32 partial per (chunk, D tile), as the pointer kernel's
        if DM:
            tl.store(dm_ptr + pid_s * D + offs_d, dm, mask=offs_d < D)
        if FIT:
            acc = acc * fit_scale[None, :]
        if DROPOUT:
            acc = acc * dropout_scale
        part_ptrs = (
            part_ptr + pid_s * stride_ps + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr
        )
        tl.store(part_ptrs, acc, mask=(offs_d < D)[:, None] & (offs_r < RANK)[None, :])


@triton.jit
def _fp16_fit_kernel(u_ptr, fit_ptr, M, RANK, stride_um, stride_ur, R: tl.constexpr,
                     BLOCK_M: tl.constexpr):  # fmt: skip
    """One program: ``U``'s column magnitudes (``(M, RANK)`` float32), and per column the power
    of two (and inverse) that brings it under float16's range (``common.fp16_fit``), into
    ``fit`` ``(2, RANK)``."""
    offs_r = tl.arange(0, R)
    mask_r = offs_r < RANK
    big = tl.zeros((R,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=(rows < M)[:, None] & mask_r[None, :],
            other=0.0,
        )
        big = tl.maximum(big, tl.max(tl.abs(u), axis=0))
    scale, inv = fp16_fit(big)
    tl.store(fit_ptr + offs_r, scale, mask=mask_r)
    tl.store(fit_ptr + RANK + offs_r, inv, mask=mask_r)


FIT_BLOCK_M = 128  # rows of U per step of the fit kernel


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
    col_scale: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
):
    """``u (M, r)`` float32, ``v (M, D)`` -> ``u^T drop(v)`` as ``(r, D)``, or ``(D, r)`` with
    ``transpose_out``, in ``out_dtype``: one launch of either kernel, then the fixed-order sum
    of the partials. ``col_scale`` ``(D,)`` (DoRA's ``c``, ACC dtype): the sum's ``D`` side
    times it before the one rounding (``u^T (v c)``).

    float16 ``v``: the kernels split ``u`` into float16 ``hi + lo`` for the dots, so ``u``'s
    columns are brought under float16's range by exact powers of two as they are loaded, and
    the sum scaled back (exact): the LoRA intermediate keeps float32's range. The powers come
    from one small launch over ``u`` (``lora_fp16_fit``: one program, ``M x r`` read). NOTE:
    found in the reductions themselves (per step, or a first pass over each chunk), they
    spilled 3 to 70 instructions (sm_80, sm_100, sm_120).

    ``z`` (DoRA's dB launch, ``v``'s shape, no dropout): also ``sum_rows(v z)``
    ``(D,)`` in ACC, from the same tiles of ``v`` (one more read, of ``z``): then returns
    ``(grad, that sum)``."""
    (m, rank), d = u.shape, v.shape[1]
    if m == 0:
        grad = torch.zeros(
            (d, rank) if transpose_out else (rank, d), dtype=out_dtype, device=u.device
        )
        return grad if z is None else (grad, torch.zeros(d, dtype=u.dtype, device=u.device))
    # The chunks are multiples of BLOCK_M; the partials lie in the output's own layout, so the
    # host-side sum lands contiguous.
    fit = None
    if v.dtype == torch.float16 and u.dtype == torch.float32:
        fit = alloc((2, rank), torch.float32, u.device)
        fit_args = (u, fit, m, rank, u.stride(0), u.stride(1))
        fit_meta = {"R": padded_rank(rank), "BLOCK_M": FIT_BLOCK_M, "num_warps": 4}
        launch("lora_fp16_fit", _fp16_fit_kernel, (1,), fit_args, fit_meta)
    split = num_splits(m, d, config, num_sms)
    chunk = triton.cdiv(triton.cdiv(m, split), config["BLOCK_M"]) * config["BLOCK_M"]
    split = triton.cdiv(m, chunk)
    part = alloc((split, *((d, rank) if transpose_out else (rank, d))), u.dtype, u.device)
    dm = alloc((split, d), u.dtype, u.device) if z is not None else None
    stride_ps, first, second = part.stride()
    part_strides = (stride_ps, second, first) if transpose_out else (stride_ps, first, second)
    meta = {
        "DROPOUT": dropout_p > 0.0,
        "R": padded_rank(rank),
        "ACC": tl_dtype(u.dtype),
        "PRECISION": precision,
        "UPCAST": upcast,
        "DM": z is not None,
        "FIT": fit is not None,
        **{key: value for key, value in config.items() if key != "TMA"},
    }
    scalars = (keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed)
    if config.get("TMA") and supports(u, v) and (z is None or supports(u, z)):
        u_desc = TensorDescriptor.from_tensor(u, [meta["BLOCK_M"], meta["R"]])
        v_desc = TensorDescriptor.from_tensor(v, [meta["BLOCK_M"], meta["BLOCK_D"]])
        z_desc = None
        if z is not None:
            z_desc = TensorDescriptor.from_tensor(z, [meta["BLOCK_M"], meta["BLOCK_D"]])
        programs = min(num_sms, triton.cdiv(d, meta["BLOCK_D"]) * split)
        args = (u_desc, v_desc, part, z_desc, dm, fit, m, d, rank, chunk, split, programs,
                *part_strides, *scalars)  # fmt: skip
        launch(name, _lora_grad_tma_kernel, (programs,), args, meta)
    else:
        args = (
            u, v, part, z, dm, fit,
            m, d, rank, chunk,
            u.stride(0), u.stride(1),
            v.stride(0), v.stride(1),
            *part_strides,
            *((0, 0) if z is None else z.stride()),
            *scalars,
        )  # fmt: skip
        launch(name, _lora_grad_kernel, (triton.cdiv(d, meta["BLOCK_D"]), split), args, meta)
    # NOTE: a fixed-order sum over the split axis (no atomics): deterministic run to run.
    total = part[0] if split == 1 else part.sum(0)
    if col_scale is not None:  # (the D side)
        total = total * (col_scale[:, None] if transpose_out else col_scale[None, :])
    if dm is not None:  # (the same fixed-order sum)
        return total.to(out_dtype), dm[0] if split == 1 else dm.sum(0)
    return total.to(out_dtype)


def num_splits(m: int, d: int, config: dict, num_sms: int) -> int:
    """How many M-chunks to reduce in parallel for an ``(m, d)`` wide operand."""
    d_tiles = triton.cdiv(d, config["BLOCK_D"])
    by_occupancy = triton.cdiv(num_sms * PROGRAMS_PER_SM, d_tiles)
    by_length = triton.cdiv(m, config["BLOCK_M"] * MIN_CHUNK_BLOCKS)
    return max(1, min(by_occupancy, by_length))


def supports(u: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether one ``lora_grad`` call can run on descriptors: Triton has them and both operands
    are row-major and describable by TMA (``T`` is ``(M, r)`` float32: r a multiple of 4)."""
    if TensorDescriptor is None:
        return False
    return all(d is not None and not d[1] for d in (describable(u), describable(v)))
