"""The one-pass fused LoRA GEMM: forward ``y`` and backward ``dx`` with one kernel family.

    out = X Wt + b + s * drop_out(drop_in(X) Down) Up      (M x Nd)
    T   = s * drop_in(X) Down                              (M x r, stored for the other pass)

forward: ``X = x, Wt = W^T, Down = A, Up = B``       -> ``y``,  ``T = s S``  (dB needs it)
dx:      ``X = dY, Wt = W, Down = B^T, Up = A^T``    -> ``dx``, ``T = s dS`` (dA needs it)

``Down`` and ``Up`` are the LoRA branch's two factors in the order this pass meets them.
Dropout on the forward masks X's tile before the ``X Down`` dot (``drop_in``); on dx it masks
the LoRA term of the output (``drop_out``). Transposed operands are strides, never copies.

With dropout, the forward runs as two launches: a T-only pass (``STORE_OUT`` off: one column of
tiles reads x once and generates each mask element once), then the output pass reading T
(``T_IN``): otherwise every column of tiles would regenerate the whole mask.

Two kernels, one epilogue (``t_epilogue``, ``out_epilogue``: T, dropout, bias, one rounding):

- ``_lora_fwd_kernel`` loads its tiles through pointers, one program a tile; its ``Wt`` may be
  a bitsandbytes 4-bit W decoded tile by tile in the K loop (``FOUR_BIT``).
- ``_lora_fwd_tma_kernel`` (Hopper and later) reads ``X``, ``Wt``, ``Down`` and ``Up`` through
  host-built tensor descriptors: every tile load is one bulk copy (UTMALDG), zero-filled outside
  the tensors, so no load is masked. A persistent grid walks the tiles in the same grouped
  order (``tile += NUM_PROGRAMS``), so the next tile's loads overlap the last one's epilogue. A
  transposed operand is described by its row-major original and its tiles are transposed in
  registers (``*_T`` flags).

DoRA (docs/dora.md) adds to both: the output's column scale and z's store (``COL_SCALE``,
``STORE_Z``), the dx pass's scale on X's columns (``X_SCALE``), and with dropout ``mask(X)``
stored by the T-only pass (``STORE_XM``) and a second base product on each W tile
(``BASE_DROP_IN`` forward, ``BASE_DROP_OUT`` dx; see ``out_epilogue``).

``fused_mm`` launches the descriptor kernel where the config asks for it (``TMA``: Hopper's
tables, or the tuner) and TMA can describe the operands (``supports``: 16-byte aligned base and
strides, unit last stride), the pointer kernel everywhere else. The configs are
``kernels/configs.py``'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from ..dropout import keep_threshold
from .common import (
    TensorDescriptor,
    acc_dtype,
    alloc,
    describable,
    dropout_keep,
    grouped_tile,
    launch,
    mma,
    mma_f32_lhs,
    padded_rank,
    tl_dtype,
    to_output,
)
from .dequant import decode


@triton.jit
def t_epilogue(
    xp,
    t_ptr,
    offs_m,
    mask_m,
    stride_tm,
    stride_tr,
    RANK,
    pid_n,
    scaling,
    dropout_scale,
    STORE_T: tl.constexpr,
    T_IN: tl.constexpr,
    DROPOUT_IN: tl.constexpr,
    R: tl.constexpr,
):
    """The tile's ``T = s * drop_in(X) Down`` (read back instead with ``T_IN``), stored by the
    first column of tiles with ``STORE_T``; shared by the pointer and the descriptor kernels.
    ``t_ptr`` is ``None`` unless ``STORE_T`` or ``T_IN``."""
    offs_r = tl.arange(0, R)
    t_offs = offs_m.to(tl.int64)[:, None] * stride_tm + offs_r[None, :] * stride_tr
    mask_t = mask_m[:, None] & (offs_r < RANK)[None, :]
    if T_IN:
        xp = tl.load(t_ptr + t_offs, mask=mask_t, other=0.0)
    else:
        if DROPOUT_IN:
            xp = xp * dropout_scale
        xp = xp * scaling
    if STORE_T:
        # Only the first column of tiles writes T; every column computed the same values.
        if pid_n == 0:
            tl.store(t_ptr + t_offs, xp, mask=mask_t)
    return xp


@triton.jit
def out_epilogue(
    acc,
    acc2,
    xp,
    up,
    bias_ptr,
    out_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    stride_om,
    stride_on,
    pid_n,
    seed,
    dropout_threshold,
    dropout_scale,
    scale_ptr,
    z_ptr,
    HAS_BIAS: tl.constexpr,
    DROPOUT_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    COL_SCALE: tl.constexpr,
    STORE_Z: tl.constexpr,
    BASE_DROP_IN: tl.constexpr,
    BASE_DROP_OUT: tl.constexpr,
):
    """``out = acc + s * drop_out(T Up) + b`` for one tile, cast once and stored; ``up`` is the
    tile's ``(R, BLOCK_N)`` slice of Up, ``xp`` its T. ``bias_ptr`` is ``None`` unless
    ``HAS_BIAS``. DoRA: ``COL_SCALE`` multiplies each column by ``c`` (``scale_ptr``, ACC)
    before the bias; ``STORE_Z`` also stores the unscaled ``z`` (``z_ptr``, out's layout), the
    one tensor DoRA's magnitude gradient needs. DoRA with dropout: ``acc2`` is the K loop's
    second base product (unused otherwise): forward (``BASE_DROP_IN``) ``mask(X) Wt``, so that
    ``z = acc2 / (1 - p) + T Up`` and ``out = acc - acc2 / (1 - p) + c z + b``; dx
    (``BASE_DROP_OUT``) ``(X f) Wt``, added under the mask with the LoRA term."""
    if DROPOUT_OUT:
        lora = mma_f32_lhs(xp, up, tl.zeros((xp.shape[0], BLOCK_N), dtype=ACC), PRECISION, UPCAST)
        keep = dropout_keep(seed, offs_m, pid_n * BLOCK_N, BLOCK_N, dropout_threshold)
        lora = lora * dropout_scale
        if BASE_DROP_OUT:
            lora += acc2
        acc += tl.where(keep, lora, 0.0)
    elif BASE_DROP_IN:
        acc2 = acc2 * dropout_scale  # x_d Wt
        rest = acc - acc2  # the base GEMM over the dropped elements, which c does not scale
        acc = mma_f32_lhs(xp, up, acc2, PRECISION, UPCAST)
    else:
        acc = mma_f32_lhs(xp, up, acc, PRECISION, UPCAST)
    offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        tl.store(z_ptr + offs, to_output(acc, z_ptr.dtype.element_ty, UPCAST), mask=mask)
    if COL_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if BASE_DROP_IN:
        acc += rest
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + offs, to_output(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def scaled_x(x, scale_ptr, offs_k, mask_k, UPCAST: tl.constexpr):
    """DoRA's dx pass: the ``dY`` tile's columns times ``c`` (``dz = dY c``; with dropout also
    times ``f = (c - 1) / (1 - p)``), rounded once to the tile's dtype for the dots."""
    c = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    return to_output(x.to(c.dtype) * c[None, :], x.dtype, UPCAST)


@triton.jit
def x_operands(
    x, scale_ptr, offs_k, mask_k, X_SCALE: tl.constexpr, BASE_DROP_OUT: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """The X tile as the base dot takes it and as the Down dot does: both ``x`` itself, or
    with ``X_SCALE`` both ``x c`` (DoRA's dz); with ``BASE_DROP_OUT`` (DoRA's dropout dx) the
    base dot takes ``dY`` unscaled, only the Down dot ``dY c``."""
    xs = x
    if X_SCALE:
        xs = scaled_x(x, scale_ptr, offs_k, mask_k, UPCAST)
        if not BASE_DROP_OUT:
            x = xs
    return x, xs


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_fwd_kernel(
    # pointers (None where a constexpr switch says the kernel never reads or writes it)
    x_ptr,  # X    (M, K)
    w_ptr,  # Wt   (K, N) (a transposed view: strides only); None without STORE_OUT
    bias_ptr,  # b (N,); None without HAS_BIAS
    down_ptr,  # Down (K, RANK)
    up_ptr,  # Up   (RANK, N)
    out_ptr,  # out  (M, N); None without STORE_OUT
    t_ptr,  # T    (M, RANK) ACC; None without STORE_T or T_IN
    ws_ptr,  # FOUR_BIT: fp32 scales of W's blocks of QBLOCK elements (w_ptr: its packed bytes)
    wc_ptr,  # FOUR_BIT: fp32 code table (16 entries)
    scale_ptr,  # DoRA's c (N or K,) ACC: output columns (COL_SCALE) or X's columns (X_SCALE)
    z_ptr,  # STORE_Z: (M, N), out's strides; else None
    scale2_ptr,  # BASE_DROP_OUT: DoRA's f = (c - 1) / (1 - p) (K,) ACC, on X's columns; else None
    xm_ptr,  # STORE_XM / BASE_DROP_IN: mask(X) (M, K) contiguous, X's dtype; else None
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
    stride_dk,
    stride_dr,
    stride_ur,
    stride_un,
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
    T_IN: tl.constexpr,  # read T (already scaled) instead of computing X Down
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
    COL_SCALE: tl.constexpr,  # DoRA forward: out = c * (X Wt + T Up) + b (see out_epilogue)
    STORE_Z: tl.constexpr,  # DoRA forward: also store z = X Wt + T Up
    X_SCALE: tl.constexpr,  # DoRA dx: X's tiles times c along K (dz = dY c)
    BASE_DROP_IN: tl.constexpr,  # DoRA forward with dropout: also mask(X) Wt (out_epilogue)
    BASE_DROP_OUT: tl.constexpr,  # DoRA dx with dropout: also (X f) Wt; c on the Down dot only
    STORE_XM: tl.constexpr,  # DoRA's T-only pass: also store mask(X), read by BASE_DROP_IN
):
    # --- tile mapping: grouped order, so GROUP_M row-blocks share each Wt column-block in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if STORE_OUT else 1
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < RANK
    # NOTE: int64 row offsets: M * K passes 2**31 for long sequences of wide layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if STORE_XM or BASE_DROP_IN:
        xm_rows = xm_ptr + offs_m.to(tl.int64)[:, None] * K

    # --- main loop: each X tile is loaded once and feeds both dots (T_IN: only the base GEMM);
    # DoRA with dropout: a second base product on the same W tile (acc2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc2 = acc
    if BASE_DROP_IN or BASE_DROP_OUT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
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
        x, xs = x_operands(x, scale_ptr, offs_k, mask_k, X_SCALE, BASE_DROP_OUT, UPCAST)
        if STORE_OUT:
            if FOUR_BIT:
                # NOTE: the strides are W's, in elements of the flat 4-bit sequence; the tile is
                # decoded in fp32 and rounded once to X's dtype, as the dequant kernel rounds.
                w = decode(
                    w_ptr,
                    ws_ptr,
                    wc_ptr,
                    w_first,
                    offs_kb[:, None] * stride_wk + tl.arange(0, BLOCK_N)[None, :] * stride_wn,
                    mask_k[:, None] & mask_n[None, :],
                    QBLOCK,
                )
                w = to_output(w, x_ptr.dtype.element_ty, UPCAST)
                w_first += BLOCK_K * stride_wk
            else:
                w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
                w = tl.load(
                    w_cols + offs_k64[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0,
                )
            acc = mma(x, w, acc, PRECISION, UPCAST)
            if BASE_DROP_IN:
                xm = tl.load(
                    xm_rows + offs_k64[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
                )
                acc2 = mma(xm, w, acc2, PRECISION, UPCAST)
            if BASE_DROP_OUT:
                acc2 = mma(scaled_x(x, scale2_ptr, offs_k, mask_k, UPCAST), w, acc2, PRECISION,
                           UPCAST)  # fmt: skip
        if not T_IN:
            down = tl.load(
                down_ptr + offs_k64[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            if DROPOUT_IN:
                keep = dropout_keep(seed, offs_m, k0, BLOCK_K, dropout_threshold)
                xs = tl.where(keep, xs, 0.0)
                if STORE_XM:
                    tl.store(xm_rows + offs_k64[None, :], xs,
                             mask=mask_m[:, None] & mask_k[None, :])  # fmt: skip
            xp = mma(xs, down, xp, PRECISION, UPCAST)

    # --- epilogue: T = s * drop_in(X) Down; out += s * drop_out(T Up) + b
    xp = t_epilogue(xp, t_ptr, offs_m, mask_m, stride_tm, stride_tr, RANK, pid_n, scaling,
                    dropout_scale, STORE_T=STORE_T, T_IN=T_IN, DROPOUT_IN=DROPOUT_IN,
                    R=R)  # fmt: skip
    if STORE_OUT:
        up = tl.load(
            up_ptr + offs_r[:, None] * stride_ur + offs_n.to(tl.int64)[None, :] * stride_un,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        out_epilogue(acc, acc2, xp, up, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
                     stride_om, stride_on, pid_n, seed, dropout_threshold, dropout_scale,
                     scale_ptr, z_ptr, HAS_BIAS=HAS_BIAS, DROPOUT_OUT=DROPOUT_OUT,
                     BLOCK_N=BLOCK_N, ACC=ACC, PRECISION=PRECISION, UPCAST=UPCAST,
                     COL_SCALE=COL_SCALE, STORE_Z=STORE_Z, BASE_DROP_IN=BASE_DROP_IN,
                     BASE_DROP_OUT=BASE_DROP_OUT)  # fmt: skip


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_fwd_tma_kernel(
    # descriptors (shape, strides and block shape built on the host)
    x_desc,  # X (M, K), block (BLOCK_M, BLOCK_K)
    w_desc,  # Wt (K, N), block (BLOCK_K, BLOCK_N); W_T: its row-major W (N, K), (BLOCK_N, BLOCK_K)
    down_desc,  # Down (K, RANK), block (BLOCK_K, R); DOWN_T: its transpose (RANK, K), (R, BLOCK_K)
    up_desc,  # Up (RANK, N), block (R, BLOCK_N); UP_T: its transpose (N, RANK), (BLOCK_N, R)
    # pointers (None where a constexpr switch says the kernel never reads or writes it)
    bias_ptr,  # b (N,); None without HAS_BIAS
    out_ptr,  # out (M, N); None without STORE_OUT
    t_ptr,  # T (M, RANK) ACC; None without STORE_T or T_IN
    scale_ptr,  # DoRA's c, as the pointer kernel's
    z_ptr,  # STORE_Z: (M, N), out's strides; else None
    scale2_ptr,  # BASE_DROP_OUT: DoRA's f, as the pointer kernel's
    xm_desc,  # BASE_DROP_IN: mask(X) (M, K), block (BLOCK_M, BLOCK_K); else None
    xm_ptr,  # STORE_XM: mask(X) (M, K) contiguous, stored through pointers; else None
    # sizes
    M,
    N,
    K,
    RANK,
    NUM_PROGRAMS,  # the persistent grid's size (the SM count, or fewer tiles)
    # strides
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
    STORE_OUT: tl.constexpr,
    STORE_T: tl.constexpr,
    T_IN: tl.constexpr,
    DROPOUT_IN: tl.constexpr,
    DROPOUT_OUT: tl.constexpr,
    W_T: tl.constexpr,
    DOWN_T: tl.constexpr,
    UP_T: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    COL_SCALE: tl.constexpr,
    STORE_Z: tl.constexpr,
    X_SCALE: tl.constexpr,
    BASE_DROP_IN: tl.constexpr,
    BASE_DROP_OUT: tl.constexpr,
    STORE_XM: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if STORE_OUT else 1
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        # --- tile mapping: the grouped order of the pointer kernel, walked persistently
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

        # --- main loop: one bulk copy per tile; each X tile feeds both dots
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc2 = acc
        if BASE_DROP_IN or BASE_DROP_OUT:
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        xp = tl.zeros((BLOCK_M, R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x, xs = x_operands(x, scale_ptr, offs_k, offs_k < K, X_SCALE, BASE_DROP_OUT, UPCAST)
            if STORE_OUT:
                if W_T:
                    w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
                else:
                    w = w_desc.load([k0, pid_n * BLOCK_N])
                acc = mma(x, w, acc, PRECISION, UPCAST)
                if BASE_DROP_IN:
                    acc2 = mma(xm_desc.load([pid_m * BLOCK_M, k0]), w, acc2, PRECISION, UPCAST)
                if BASE_DROP_OUT:
                    xf = scaled_x(x, scale2_ptr, offs_k, offs_k < K, UPCAST)
                    acc2 = mma(xf, w, acc2, PRECISION, UPCAST)
            if not T_IN:
                if DOWN_T:
                    down = tl.trans(down_desc.load([0, k0]))
                else:
                    down = down_desc.load([k0, 0])
                if DROPOUT_IN:
                    keep = dropout_keep(seed, offs_m, k0, BLOCK_K, dropout_threshold)
                    xs = tl.where(keep, xs, 0.0)
                    if STORE_XM:
                        xm_offs = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
                        tl.store(xm_ptr + xm_offs, xs,
                                 mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])  # fmt: skip
                xp = mma(xs, down, xp, PRECISION, UPCAST)

        # --- epilogue: the pointer kernel's (T, dropout, bias, one rounding, masked stores)
        mask_m = offs_m < M
        xp = t_epilogue(xp, t_ptr, offs_m, mask_m, stride_tm, stride_tr, RANK, pid_n, scaling,
                        dropout_scale, STORE_T=STORE_T, T_IN=T_IN, DROPOUT_IN=DROPOUT_IN,
                        R=R)  # fmt: skip
        if STORE_OUT:
            if UP_T:
                up = tl.trans(up_desc.load([pid_n * BLOCK_N, 0]))
            else:
                up = up_desc.load([0, pid_n * BLOCK_N])
            out_epilogue(acc, acc2, xp, up, bias_ptr, out_ptr, offs_m, offs_n, mask_m,
                         offs_n < N, stride_om, stride_on, pid_n, seed, dropout_threshold,
                         dropout_scale, scale_ptr, z_ptr, HAS_BIAS=HAS_BIAS,
                         DROPOUT_OUT=DROPOUT_OUT, BLOCK_N=BLOCK_N, ACC=ACC, PRECISION=PRECISION,
                         UPCAST=UPCAST, COL_SCALE=COL_SCALE, STORE_Z=STORE_Z,
                         BASE_DROP_IN=BASE_DROP_IN, BASE_DROP_OUT=BASE_DROP_OUT)  # fmt: skip


def fused_mm(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    scaling: float,
    *,
    config: dict,
    num_sms: int,
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
    col_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    z_out: torch.Tensor | None = None,
    xm_out: torch.Tensor | None = None,
    xm_in: torch.Tensor | None = None,
    x_scale2: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One launch of the fused kernel: ``x (M, K)``, ``wt (K, N)`` (a tensor, or a 4-bit
    ``quant.Packed``, dequantized in the K loop), ``lora_down (K, r)``, ``lora_up (r, N)`` (any
    strides) -> ``(out (M, N) | None, T (M, r) float32 (float64) | None)``. ``num_sms`` sizes the
    descriptor kernel's persistent grid. ``name`` labels the launch for ``inspect``. ``t_in``: a
    T computed by an earlier ``store_out=False`` launch, read instead of recomputing ``X Down``
    (then nothing is stored into T). DoRA: ``col_scale`` ``(N,)`` scales the output's columns
    before the bias, ``z_out`` ``(M, N)`` (contiguous) receives the unscaled output, and
    ``x_scale`` ``(K,)`` scales ``x``'s columns as they are loaded (both ACC dtype). DoRA with
    dropout: the T-only launch also stores ``mask(x)`` (unscaled, exact) into ``xm_out``
    (``(M, K)`` contiguous, x's dtype); the output launch reading it (``xm_in``, with ``t_in``
    and ``col_scale``) takes ``mask(x) wt`` beside ``x wt`` on each W tile: ``y = x wt - x_d wt +
    c z + b``, ``z = x_d wt + T up``. ``x_scale2`` ``(K,)`` (dx, with ``dropout_out``: ``f = (c -
    1) / (1 - p)``) adds ``(x f) wt`` under the mask, ``x_scale`` then scaling only the Down
    dot's ``x``."""
    (m, k), n, rank = x.shape, wt.shape[1], lora_down.shape[1]
    out = alloc((m, n), x.dtype, x.device) if store_out else None
    t = alloc((m, rank), acc_dtype(x.dtype), x.device) if store_t and t_in is None else None
    if m == 0:
        return out, t
    t_arg = t_in if t_in is not None else t  # the T the kernel reads or writes
    meta = {
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
        "COL_SCALE": col_scale is not None,
        "STORE_Z": z_out is not None,
        "X_SCALE": x_scale is not None,
        "BASE_DROP_IN": xm_in is not None,
        "BASE_DROP_OUT": x_scale2 is not None,
        "STORE_XM": xm_out is not None,
        **{key: value for key, value in config.items() if key != "TMA"},
    }
    scalars = (scaling, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed)
    scale = col_scale if col_scale is not None else x_scale
    four_bit = isinstance(wt, quant.Packed)
    xm = xm_out if xm_out is not None else xm_in
    describe = (x, wt, lora_down, lora_up) + ((xm_in,) if xm_in is not None else ())
    if config.get("TMA") and not four_bit and supports(*describe):
        operands = (x, wt, bias, lora_down, lora_up, out, t_arg, scale, z_out, x_scale2, xm_in,
                    xm_out)  # fmt: skip
        _launch_descriptors(name, operands, (m, n, k, rank), scalars, meta, num_sms)
        return out, t
    # A T-only launch reads no W (over a 4-bit one too: the 16-bit build serves).
    four_bit = four_bit and store_out
    if not store_out:
        w_arg, scales, code = None, None, None
    elif four_bit:
        w_arg, scales, code = wt.data, wt.scales, wt.code
    else:
        w_arg, scales, code = wt, None, None
    n_tiles = triton.cdiv(n, config["BLOCK_N"]) if store_out else 1
    grid = (triton.cdiv(m, config["BLOCK_M"]) * n_tiles,)
    args = (
        x, w_arg, bias, lora_down, lora_up, out, t_arg, scales, code, scale, z_out, x_scale2, xm,
        m, n, k, rank,
        x.stride(0), x.stride(1),
        wt.stride(0), wt.stride(1),
        lora_down.stride(0), lora_down.stride(1),
        lora_up.stride(0), lora_up.stride(1),
        *_strides(out), *_strides(t_arg),
        *scalars,
    )  # fmt: skip
    meta.update(FOUR_BIT=four_bit, QBLOCK=wt.blocksize if four_bit else 1)
    launch(name, _lora_fwd_kernel, grid, args, meta)
    return out, t


def _launch_descriptors(name, operands, sizes, scalars, meta: dict, num_sms: int) -> None:
    """``fused_mm``'s launch of ``_lora_fwd_tma_kernel``: the descriptors of ``X``, ``Wt``,
    ``Down`` and ``Up`` for the config's tiles, a persistent grid of at most ``num_sms``
    programs."""
    x, wt, bias, lora_down, lora_up, out, t_arg, scale, z_out, scale2, xm_in, xm_out = operands
    m, n, _, _ = sizes
    block_m, block_n, block_k, r = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["R"]
    x_desc, _ = _descriptor(x, [block_m, block_k])
    w_desc, w_t = _descriptor(wt, [block_k, block_n])
    down_desc, down_t = _descriptor(lora_down, [block_k, r])
    up_desc, up_t = _descriptor(lora_up, [r, block_n])
    xm_desc = None if xm_in is None else _descriptor(xm_in, [block_m, block_k])[0]
    tiles = triton.cdiv(m, block_m) * (triton.cdiv(n, block_n) if meta["STORE_OUT"] else 1)
    programs = min(num_sms, tiles)
    args = (
        x_desc, w_desc, down_desc, up_desc, bias, out, t_arg, scale, z_out, scale2, xm_desc,
        xm_out, *sizes, programs,
        *_strides(out), *_strides(t_arg),
        *scalars,
    )  # fmt: skip
    meta = {**meta, "W_T": w_t, "DOWN_T": down_t, "UP_T": up_t}
    launch(name, _lora_fwd_tma_kernel, (programs,), args, meta)


def supports(x, wt, lora_down, lora_up, *more) -> bool:
    """Whether one ``fused_mm`` call can run on descriptors: Triton has them, ``x`` (after
    flattening) is row-major and TMA can describe it and each other operand (the transposed
    views of dx included; DoRA's ``mask(x)``, in ``more``)."""
    if TensorDescriptor is None:
        return False
    x_ok = describable(x)
    others = (wt, lora_down, lora_up, *more)
    return x_ok is not None and not x_ok[1] and all(describable(t) for t in others)


def _descriptor(t: torch.Tensor, block: list[int]):
    """``t``'s descriptor with the kernel's ``block`` (given in ``t``'s own orientation) and
    whether the kernel must transpose its tiles."""
    base, transposed = describable(t)
    return TensorDescriptor.from_tensor(base, block[::-1] if transposed else block), transposed


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    """A 2-D kernel argument's strides, ``(0, 0)`` for one that is absent (``None``)."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))
