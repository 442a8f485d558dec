"""The fused LoRA GEMM on Hopper's tensor-memory accelerator: TMA descriptors, persistent tiles.

The same math as ``fused_mm`` (forward ``y`` and backward ``dx``, dropout, T in and out), with
two changes to how the tiles are fed:

- ``X``, ``Wt``, ``P`` and ``Q`` are read through host-built tensor descriptors
  (``triton.tools.tensor_descriptor.TensorDescriptor``): on sm_90 and later every tile load is
  one bulk copy (UTMALDG) instead of per-thread address arithmetic and ``cp.async``. The
  descriptors zero-fill outside the tensors, so no load is masked.
- A persistent grid: one program per SM walks the output tiles in the grouped order
  (``tile += NUM_PROGRAMS``), so the next tile's loads overlap the last one's epilogue.

TMA needs 16-byte aligned base pointers and strides and a unit last stride. A transposed
operand (``Wt = W^T`` in forward, ``P = B^T`` and ``Q = A^T`` in dx) is described by its
row-major original and its tiles are transposed in registers (``*_T`` flags). ``supports``
says whether a call's operands allow descriptors; the pointer kernel runs everywhere else.
The epilogue is the pointer kernel's own (``t_epilogue``, ``out_epilogue``): T, dropout and
bitwise determinism are unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import keep_threshold
from .common import dropout_keep, launch, mma, padded_rank
from .fused_mm import launch_meta, launch_outputs, out_epilogue, t_epilogue

try:  # host-built descriptors: Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover  (older Triton: the pointer kernel only)
    TensorDescriptor = None

# TMA's rules (CUDA's cuTensorMapEncodeTiled): 16-byte aligned base and strides, unit last stride.
TMA_ALIGN = 16


def describable(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``(row-major tensor, transposed)`` to build ``t``'s descriptor from: ``t`` itself when its
    last stride is 1, ``t.T`` when ``t`` is the transposed view of a row-major tensor; ``None``
    when TMA can't describe it (another layout, a misaligned base or stride, an empty tensor)."""
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


def supports(x, wt, p, q) -> bool:
    """Whether one ``fused_mm`` call can run on descriptors: Triton has them, ``x`` (after
    flattening) is row-major and TMA can describe it and each other operand (the transposed
    views of dx included)."""
    if TensorDescriptor is None:
        return False
    x_ok = describable(x)
    return x_ok is not None and not x_ok[1] and all(describable(t) for t in (wt, p, q))


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_fwd_tma_kernel(
    # descriptors (shape, strides and block shape built on the host)
    x_desc,  # X (M, K), block (BLOCK_M, BLOCK_K)
    w_desc,  # Wt (K, N), block (BLOCK_K, BLOCK_N); W_T: its row-major W (N, K), (BLOCK_N, BLOCK_K)
    p_desc,  # P (K, RANK), block (BLOCK_K, R); P_T: its transpose (RANK, K), (R, BLOCK_K)
    q_desc,  # Q (RANK, N), block (R, BLOCK_N); Q_T: its transpose (N, RANK), (BLOCK_N, R)
    # pointers
    bias_ptr,  # b (N,), only read with HAS_BIAS
    out_ptr,  # out (M, N), only written with STORE_OUT
    t_ptr,  # T (M, RANK) ACC, only written with STORE_T
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
    P_T: tl.constexpr,
    Q_T: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if STORE_OUT else 1
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    for tile in range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        # --- tile mapping: the grouped order of the pointer kernel, walked persistently
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

        # --- main loop: one bulk copy per tile; each X tile feeds both dots
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        xp = tl.zeros((BLOCK_M, R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            if STORE_OUT:
                if W_T:
                    w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
                else:
                    w = w_desc.load([k0, pid_n * BLOCK_N])
                acc = mma(x, w, acc, PRECISION, UPCAST)
            if not T_IN:
                if P_T:
                    p = tl.trans(p_desc.load([0, k0]))
                else:
                    p = p_desc.load([k0, 0])
                if DROPOUT_IN:
                    keep = dropout_keep(seed, offs_m, k0, BLOCK_K, dropout_threshold)
                    x = tl.where(keep, x, 0.0)
                xp = mma(x, p, xp, PRECISION, UPCAST)

        # --- epilogue: the pointer kernel's (T, dropout, bias, one rounding, masked stores)
        mask_m = offs_m < M
        xp = t_epilogue(xp, t_ptr, offs_m, mask_m, stride_tm, stride_tr, RANK, pid_n, scaling,
                        dropout_scale, STORE_T, T_IN, DROPOUT_IN, R)  # fmt: skip
        if STORE_OUT:
            if Q_T:
                q = tl.trans(q_desc.load([pid_n * BLOCK_N, 0]))
            else:
                q = q_desc.load([0, pid_n * BLOCK_N])
            out_epilogue(acc, xp, q, bias_ptr, out_ptr, offs_m, offs_n, mask_m, offs_n < N,
                         stride_om, stride_on, pid_n, seed, dropout_threshold, dropout_scale,
                         HAS_BIAS, DROPOUT_OUT, BLOCK_N, ACC, PRECISION, UPCAST)  # fmt: skip


def _descriptor(t: torch.Tensor, block: list[int]):
    """``t``'s descriptor with the kernel's ``block`` (given in ``t``'s own orientation) and
    whether the kernel must transpose its tiles."""
    base, transposed = describable(t)
    return TensorDescriptor.from_tensor(base, block[::-1] if transposed else block), transposed


def fused_mm_tma(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    p: torch.Tensor,
    q: torch.Tensor,
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``fused_mm`` on descriptors over a persistent grid; the same arguments and results, plus
    ``num_sms``. The caller checks ``supports(x, wt, p, q)`` first."""
    (m, k), n, rank = x.shape, wt.shape[1], p.shape[1]
    out, t, out_arg, t_arg = launch_outputs(x, n, rank, store_out, store_t, t_in)
    if m == 0:
        return out, t
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    r = padded_rank(rank)
    x_desc, _ = _descriptor(x, [block_m, block_k])
    w_desc, w_t = _descriptor(wt, [block_k, block_n])
    p_desc, p_t = _descriptor(p, [block_k, r])
    q_desc, q_t = _descriptor(q, [r, block_n])
    tiles = triton.cdiv(m, block_m) * (triton.cdiv(n, block_n) if store_out else 1)
    programs = min(num_sms, tiles)
    args = (
        x_desc, w_desc, p_desc, q_desc, bias if bias is not None else x, out_arg, t_arg,
        m, n, k, rank, programs,
        out_arg.stride(0), out_arg.stride(1),
        t_arg.stride(0), t_arg.stride(1),
        scaling, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed,
    )  # fmt: skip
    meta = launch_meta(x, bias, rank, t, t_in, store_out, dropout_in, dropout_out, config,
                       precision, upcast)  # fmt: skip
    meta.update(W_T=w_t, P_T=p_t, Q_T=q_t)
    launch(name, _lora_fwd_tma_kernel, (programs,), args, meta)
    return out, t
