"""The LoRA weight gradients on Hopper's tensor-memory accelerator: ``lora_grad``'s reduction,
with ``U`` and ``V`` read through tensor descriptors over a persistent grid.

    G = U^T drop(V)        U (M, r) float32, V (M, D)  ->  G (r, D)

The work is ``lora_grad``'s: one float32 partial per (M chunk, D tile), summed on the host in a
fixed order. Here one program per SM walks those items (``item += NUM_PROGRAMS``), and each
step's ``(BLOCK_M, R)`` and ``(BLOCK_M, BLOCK_D)`` tiles are one bulk copy each. Chunks are
multiples of ``BLOCK_M``, so a tile never straddles two chunks; the last one's rows past M read
as zeros. ``supports`` says whether a call's operands allow descriptors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import keep_threshold
from .common import dropout_keep, launch, mma_f32_rhs, padded_rank
from .fused_mm_tma import TensorDescriptor, describable
from .lora_grad import grad_meta, partials, reduce_partials


def supports(u: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether one ``lora_grad`` call can run on descriptors: both operands row-major and
    describable by TMA (``T`` is ``(M, r)`` float32: r a multiple of 4)."""
    if TensorDescriptor is None:
        return False
    return all(d is not None and not d[1] for d in (describable(u), describable(v)))


@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _lora_grad_tma_kernel(
    # descriptors
    u_desc,  # U (M, RANK) ACC, block (BLOCK_M, R)
    v_desc,  # V (M, D), block (BLOCK_M, BLOCK_D)
    # pointers
    part_ptr,  # partials (SPLIT, RANK, D) ACC (any strides: dA writes them transposed)
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
):
    num_d = tl.cdiv(D, BLOCK_D)
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
        for m0 in range(m_start, m_end, BLOCK_M):
            u = u_desc.load([m0, 0])
            v = v_desc.load([m0, pid_d * BLOCK_D])
            if DROPOUT:
                offs_m = m0 + tl.arange(0, BLOCK_M)
                keep = dropout_keep(seed, offs_m, pid_d * BLOCK_D, BLOCK_D, dropout_threshold)
                v = tl.where(keep, v, 0.0)
            acc = mma_f32_rhs(tl.trans(v), u, acc, PRECISION, UPCAST)

        # --- epilogue: one float32 partial per (chunk, D tile), as the pointer kernel's
        if DROPOUT:
            acc = acc * dropout_scale
        part_ptrs = (
            part_ptr + pid_s * stride_ps + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr
        )
        tl.store(part_ptrs, acc, mask=(offs_d < D)[:, None] & (offs_r < RANK)[None, :])


def lora_grad_tma(
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
    """``lora_grad`` on descriptors over a persistent grid: the same arguments and result. The
    caller checks ``supports(u, v)`` first."""
    (m, rank), d = u.shape, v.shape[1]
    out_shape = (d, rank) if transpose_out else (rank, d)
    if m == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=u.device)
    split, chunk, part, (stride_ps, stride_pr, stride_pd) = partials(u, d, transpose_out, config,
                                                                    num_sms)  # fmt: skip
    r = padded_rank(rank)
    u_desc = TensorDescriptor.from_tensor(u, [config["BLOCK_M"], r])
    v_desc = TensorDescriptor.from_tensor(v, [config["BLOCK_M"], config["BLOCK_D"]])
    programs = min(num_sms, triton.cdiv(d, config["BLOCK_D"]) * split)
    args = (
        u_desc, v_desc, part,
        m, d, rank, chunk, split, programs,
        stride_ps, stride_pr, stride_pd,
        keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed,
    )  # fmt: skip
    meta = grad_meta(u, rank, dropout_p, config, precision, upcast)
    launch(name, _lora_grad_tma_kernel, (programs,), args, meta)
    return reduce_partials(part, split, out_dtype)
