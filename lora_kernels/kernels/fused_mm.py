"""The one-pass fused LoRA GEMM: forward ``y`` and backward ``dx`` with one kernel.

    out = X Wt + b + s * drop_out(drop_in(X) P) Q        (M x Nd)
    T   = s * drop_in(X) P                                (M x r, stored for the other pass)

forward: ``X = x, Wt = W^T, P = A, Q = B``       -> ``y``,  ``T = s S``  (dB needs it)
dx:      ``X = dY, Wt = W, P = B^T, Q = A^T``    -> ``dx``, ``T = s dS`` (dA needs it)

Dropout on the forward masks X's tile before the ``X P`` dot (``drop_in``); on dx it masks the
LoRA term of the output (``drop_out``). Transposed operands are strides, never copies.

With dropout, the forward runs as two launches of this kernel: a T-only pass (``STORE_OUT``
off: one column of tiles reads x once and generates each mask element once), then the output
pass reading T (``T_IN``): otherwise every column of tiles would regenerate the whole mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from ..dropout import keep_threshold
from .common import (
    acc_dtype,
    alloc,
    dropout_keep,
    launch,
    mma,
    mma_f32_lhs,
    padded_rank,
    tl_dtype,
    to_output,
)
from .dequant import decode

# Tile configs per GPU generation (compute-capability major), 16-bit inputs. Hopper takes a wider
# N tile (more reuse of each x tile, and the LoRA dot's r / BLOCK_N extra work halves) with 8 warps
# (two warpgroups for wgmma); Ampere's 164 KB of shared memory fits 128 x 128 x 32 in 4 stages,
# 8 warps keep the 128 x 128 fp32 accumulator at 64 registers a thread.
# Ranks padded to >= 64 add a (BLOCK_M x R) fp32 accumulator and an (R x BLOCK_N) tile: both
# generations halve BLOCK_N (Ampere at 128 x 128 spills); `inspect` shows them spill-free.
CONFIGS_16BIT = {
    8: {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 32,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 4,
    },
    9: {
        "BLOCK_M": 128,
        "BLOCK_N": 256,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
}
CONFIGS_16BIT_LARGE_RANK = {
    8: {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_K": 32,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 4,
    },
    9: {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
}
# float32 without TF32 runs on FMA units, whose dot operands live in registers: smaller tiles,
# and smaller still for large ranks (the 128-wide tiles spill hundreds of times at R = 64).
# float64 (verification: gradcheck through the interpreter) takes the same tables.
CONFIGS_FP32 = {
    8: {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_K": 16,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
    9: {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_K": 16,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
}
CONFIGS_FP32_LARGE_RANK = {
    8: {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
}
LARGE_RANK = 64  # padded rank from which the *_LARGE_RANK tables apply
# The dx launch with dropout keeps a second (BLOCK_M x BLOCK_N) fp32 tile (the LoRA term, masked
# before it joins the accumulator) and generates the mask there: Hopper's 256-wide tile spills
# hundreds of times, so it halves BLOCK_N (again at large ranks). Keyed by (arch, large rank).
CONFIGS_16BIT_DROPOUT_DX = {
    (9, False): {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
    (9, True): {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
}
# A 4-bit W dequantized in the K loop (quant.Packed; the small-M strategy, docs/qlora.md): the
# loop decodes its (BLOCK_K x BLOCK_N) tile in registers before the dot (offsets, bytes, codes,
# scales: several registers an element), so the tiles are smaller than the 16-bit tables' (which
# spill), and 64 rows: the strategy runs up to M ~ 512 tokens, where wider M tiles would be
# mostly masked rows. One tile for both generations, no spills at ranks 4 to 64, dropout or not
# (`inspect --base nf4`). Tried: 8 warps (Triton 3.2 crashes building them for sm_90), BLOCK_K 64
# (dx spilled on sm_80; 64 x 128 x 64 spilled on sm_100), 64 x 128 x 32 over 4 warps (spilled).
CONFIGS_4BIT = {
    8: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
}
# float32 compute over a 4-bit W (FMA dots, operands in registers): one narrow tile for both
# generations and every rank (the 16-bit fp32 tables spill up to 118 times with the decoding).
CONFIGS_4BIT_FP32 = {
    8: {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
}
# Newer GPUs than the tables know run Hopper's config; older ones Ampere's.
KNOWN_ARCHS = (8, 9)


# T-only launches (STORE_OUT off: the dropout forward's first pass, dS when dx is not needed) have
# one column of tiles, so BLOCK_M sets the grid: 64 rows give M / 64 programs (128 at M = 8192,
# one wave on an H100), each reading its rows of X once. BLOCK_N is unused there.
CONFIGS_T_ONLY = {
    8: {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
}
CONFIGS_T_ONLY_FP32 = {
    8: {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
    9: {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
}


def fused_mm_t_config(arch: int, dtype: torch.dtype) -> dict:
    """The launch config of T-only (``store_out=False``) launches."""
    arch = min(max(arch, KNOWN_ARCHS[0]), KNOWN_ARCHS[-1])
    table = CONFIGS_T_ONLY_FP32 if dtype in (torch.float32, torch.float64) else CONFIGS_T_ONLY
    return dict(table[arch])


def fused_mm_config(
    arch: int, dtype: torch.dtype, rank: int, dropout_out: bool = False, four_bit: bool = False
) -> dict:
    """The launch config for compute-capability major ``arch``, input ``dtype`` and ``rank``;
    ``dropout_out`` for the dx launch with dropout, ``four_bit`` for a 4-bit W dequantized in
    the K loop."""
    arch = min(max(arch, KNOWN_ARCHS[0]), KNOWN_ARCHS[-1])
    large = padded_rank(rank) >= LARGE_RANK
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if four_bit:
        return dict((CONFIGS_4BIT if sixteen_bit else CONFIGS_4BIT_FP32)[arch])
    if dropout_out and sixteen_bit and (arch, large) in CONFIGS_16BIT_DROPOUT_DX:
        return dict(CONFIGS_16BIT_DROPOUT_DX[arch, large])
    if not sixteen_bit:
        table = CONFIGS_FP32_LARGE_RANK if large else CONFIGS_FP32
    elif large:
        table = CONFIGS_16BIT_LARGE_RANK
    else:
        table = CONFIGS_16BIT
    return dict(table[arch])


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_fwd_kernel(
    # pointers
    x_ptr,  # X   (M, K)
    w_ptr,  # Wt  (K, N) (a transposed view: strides only)
    bias_ptr,  # b (N,), only read with HAS_BIAS
    p_ptr,  # P   (K, RANK)
    q_ptr,  # Q   (RANK, N)
    out_ptr,  # out (M, N), only written with STORE_OUT
    t_ptr,  # T   (M, RANK) ACC, only written with STORE_T
    ws_ptr,  # FOUR_BIT: fp32 scales of W's blocks of QBLOCK elements (w_ptr: its packed bytes)
    wc_ptr,  # FOUR_BIT: fp32 code table (16 entries)
    # sizes
    M,
    N,
    K,
    RANK,
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_pk,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_om,
    stride_on,
    stride_tm,
    stride_tr,
    # scalars
    scaling,
    dropout_threshold,  # int32, see lora_kernels.dropout.keep_threshold
    dropout_scale,  # 1 / (1 - dropout_p)
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    STORE_OUT: tl.constexpr,  # False: only T (dS without dx); the base GEMM is skipped
    STORE_T: tl.constexpr,
    T_IN: tl.constexpr,  # read T (already scaled) instead of computing X P
    DROPOUT_IN: tl.constexpr,
    DROPOUT_OUT: tl.constexpr,
    R: tl.constexpr,  # RANK padded to a power of two >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: float32 (float64 for float64 inputs)
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FOUR_BIT: tl.constexpr,  # Wt is bitsandbytes' 4-bit W, dequantized tile by tile in the K loop
    QBLOCK: tl.constexpr,  # FOUR_BIT: elements per scale
):
    # --- tile mapping: grouped order, so GROUP_M row-blocks share each Wt column-block in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if STORE_OUT else 1
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < RANK
    # NOTE: int64 row offsets: M * K passes 2**31 for long sequences of wide layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn

    # --- main loop: each X tile is loaded once and feeds both dots (T_IN: only the base GEMM)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    xp = tl.zeros((BLOCK_M, R), dtype=ACC)
    if FOUR_BIT:  # the flat index of the tile's first element (int64, as the x rows)
        w_first = (pid_n * BLOCK_N).to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        offs_k64 = offs_k.to(tl.int64)
        x = tl.load(
            x_rows + offs_k64[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if STORE_OUT:
            if FOUR_BIT:
                # NOTE: the strides are W's, in elements of the flat 4-bit sequence; the tile is
                # decoded in fp32 and rounded once to X's dtype, as the dequant kernel rounds.
                w = decode(
                    w_ptr, ws_ptr, wc_ptr, w_first,
                    offs_kb[:, None] * stride_wk + tl.arange(0, BLOCK_N)[None, :] * stride_wn,
                    mask_k[:, None] & mask_n[None, :], QBLOCK,
                )  # fmt: skip
                w = to_output(w, x_ptr.dtype.element_ty, UPCAST)
                w_first += BLOCK_K * stride_wk
            else:
                w = tl.load(
                    w_cols + offs_k64[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0,
                )
            acc = mma(x, w, acc, PRECISION, UPCAST)
        if not T_IN:
            p = tl.load(
                p_ptr + offs_k64[:, None] * stride_pk + offs_r[None, :] * stride_pr,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            if DROPOUT_IN:
                keep = dropout_keep(seed, offs_m, k0, BLOCK_K, dropout_threshold)
                x = tl.where(keep, x, 0.0)
            xp = mma(x, p, xp, PRECISION, UPCAST)

    # --- epilogue: T = s * drop_in(X) P; out += s * drop_out(T Q) + b
    xp = t_epilogue(xp, t_ptr, offs_m, mask_m, stride_tm, stride_tr, RANK, pid_n, scaling,
                    dropout_scale, STORE_T, T_IN, DROPOUT_IN, R)  # fmt: skip
    if STORE_OUT:
        q = tl.load(
            q_ptr + offs_r[:, None] * stride_qr + offs_n.to(tl.int64)[None, :] * stride_qn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        out_epilogue(acc, xp, q, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om,
                     stride_on, pid_n, seed, dropout_threshold, dropout_scale, HAS_BIAS,
                     DROPOUT_OUT, BLOCK_N, ACC, PRECISION, UPCAST)  # fmt: skip


@triton.jit
def t_epilogue(xp, t_ptr, offs_m, mask_m, stride_tm, stride_tr, RANK, pid_n, scaling,
               dropout_scale, STORE_T: tl.constexpr, T_IN: tl.constexpr,
               DROPOUT_IN: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """The tile's ``T = s * drop_in(X) P`` (read back instead with ``T_IN``), stored by the first
    column of tiles with ``STORE_T``; shared by the pointer and the descriptor kernels."""
    offs_r = tl.arange(0, R)
    mask_r = offs_r < RANK
    t_ptrs = t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + offs_r[None, :] * stride_tr
    if T_IN:
        xp = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    else:
        if DROPOUT_IN:
            xp = xp * dropout_scale
        xp = xp * scaling
    if STORE_T:
        # Only the first column of tiles writes T; every column computed the same values.
        if pid_n == 0:
            tl.store(t_ptrs, xp, mask=mask_m[:, None] & mask_r[None, :])
    return xp


@triton.jit
def out_epilogue(acc, xp, q, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om,
                 stride_on, pid_n, seed, dropout_threshold, dropout_scale,
                 HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``out = acc + s * drop_out(T Q) + b`` for one tile, cast once and stored; ``q`` is the
    tile's ``(R, BLOCK_N)`` slice of Q."""
    if DROPOUT_OUT:
        lora = mma_f32_lhs(xp, q, tl.zeros((xp.shape[0], BLOCK_N), dtype=ACC), PRECISION, UPCAST)
        keep = dropout_keep(seed, offs_m, pid_n * BLOCK_N, BLOCK_N, dropout_threshold)
        acc += tl.where(keep, lora * dropout_scale, 0.0)
    else:
        acc = mma_f32_lhs(xp, q, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(
        out_ptrs,
        to_output(acc, out_ptr.dtype.element_ty, UPCAST),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def fused_mm(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    p: torch.Tensor,
    q: torch.Tensor,
    scaling: float,
    *,
    config: dict,
    precision: str,
    upcast: bool,
    store_out: bool = True,
    store_t: bool = True,
    dropout_p: float = 0.0,
    dropout_in: bool = False,
    dropout_out: bool = False,
    seed: int = 0,
    t_in: torch.Tensor | None = None,
    name: str = "lora_fwd",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_lora_fwd_kernel``: ``x (M, K)``, ``wt (K, N)`` (a tensor, or a 4-bit
    ``quant.Packed``, dequantized in the K loop), ``p (K, r)``, ``q (r, N)`` (any strides) ->
    ``(out (M, N) | None, T (M, r) float32 (float64) | None)``. ``name`` labels the
    launch for ``inspect``. ``t_in``: a T computed by an earlier ``store_out=False`` launch, read
    instead of recomputing ``X P`` (then nothing is stored into T)."""
    (m, k), n, rank = x.shape, wt.shape[1], p.shape[1]
    # T-only launches read no W: over a 4-bit one too, the 16-bit build serves (x stands in).
    packed = isinstance(wt, quant.Packed)
    four_bit = packed and store_out
    w_arg, ws_arg, wc_arg = (
        (wt.data, wt.scales, wt.code) if four_bit else (x if packed else wt, x, x)
    )
    out, t, out_arg, t_arg = launch_outputs(x, n, rank, store_out, store_t, t_in)
    if m == 0:
        return out, t
    n_tiles = triton.cdiv(n, config["BLOCK_N"]) if store_out else 1
    grid = (triton.cdiv(m, config["BLOCK_M"]) * n_tiles,)
    args = (
        x, w_arg, bias if bias is not None else x, p, q, out_arg, t_arg, ws_arg, wc_arg,
        m, n, k, rank,
        x.stride(0), x.stride(1),
        wt.stride(0), wt.stride(1),
        p.stride(0), p.stride(1),
        q.stride(0), q.stride(1),
        out_arg.stride(0), out_arg.stride(1),
        t_arg.stride(0), t_arg.stride(1),
        scaling, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed,
    )  # fmt: skip
    meta = launch_meta(x, bias, rank, t, t_in, store_out, dropout_in, dropout_out, config,
                       precision, upcast)  # fmt: skip
    meta.update(FOUR_BIT=four_bit, QBLOCK=wt.blocksize if four_bit else 1)
    launch(name, _lora_fwd_kernel, grid, args, meta)
    return out, t


def launch_outputs(x, n: int, rank: int, store_out: bool, store_t: bool, t_in):
    """``(out, T, out_arg, t_arg)`` of one launch (shared with the descriptor launcher): the
    ``(M, N)`` output and the float32 ``(M, r)`` T where written (T only without ``t_in``), and
    the tensors the kernel gets for them (any tensor stands in for one never written:
    ``STORE_OUT`` / ``STORE_T`` are constexpr)."""
    m = x.shape[0]
    out = alloc((m, n), x.dtype, x.device) if store_out else None
    t = alloc((m, rank), acc_dtype(x.dtype), x.device) if store_t and t_in is None else None
    t_arg = t_in if t_in is not None else t if t is not None else x
    return out, t, out if store_out else x, t_arg


def launch_meta(x, bias, rank, t, t_in, store_out, dropout_in, dropout_out, config, precision,
                upcast) -> dict:  # fmt: skip
    """The constexpr arguments both fused kernels take (the config's ``TMA`` flag picks the
    kernel, it is none of them)."""
    return {
        "HAS_BIAS": bias is not None,
        "STORE_OUT": store_out,
        "STORE_T": t is not None,
        "T_IN": t_in is not None,
        "DROPOUT_IN": dropout_in,
        "DROPOUT_OUT": dropout_out,
        "R": padded_rank(rank),
        "ACC": tl_dtype(acc_dtype(x.dtype)),
        "PRECISION": precision,
        "UPCAST": upcast,
        **{key: value for key, value in config.items() if key != "TMA"},
    }
