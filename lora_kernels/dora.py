"""DoRA's weight norm without the ``(out, in)`` merged weight.

DoRA scales each output column by ``c_j = m_j / n_j`` with ``n_j = || W_j + s ((A B)^T)_j ||``,
the row norm of the merged weight. Expanding the square,

    n_j^2 = ||W_j||^2 + 2 s <(W A)_j, B_{:,j}> + s^2 B_{:,j}^T (A^T A) B_{:,j}

needs one thin pass over ``W`` (``W A``: ``(N, r)``), the ``r x r`` Gram matrix ``A^T A`` and
the base rows' squared norms, which stay constant while ``W`` is frozen (pass them in to skip
that pass). Accumulated in float32 (float64 for float64), as the kernels accumulate.

A bitsandbytes 4-bit ``W`` is decoded block of rows by block of rows (``quant.dequantize_rows``:
the values the layer's base GEMM multiplies by, rounded to its compute dtype), never whole.
"""

from __future__ import annotations

import weakref

import torch

from . import quant


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows of W read per step (as a block of at most this many elements in the accumulation
# dtype): the only (rows, K) temporaries, whatever N.
BLOCK_ELEMS = 2**22


def values_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``weight``'s values: its own; for a 4-bit weight ``dtype`` (what it is
    dequantized to), which must be given."""
    if not quant.is_4bit(weight):
        return weight.dtype
    if dtype is None:
        raise ValueError("a 4-bit weight's norms need the dtype it is dequantized to (dtype=)")
    return dtype


def _row_blocks(weight: torch.Tensor, acc: torch.dtype, dtype: torch.dtype | None = None):
    """``(i, j, W[i:j] in acc)`` over blocks of rows of ``weight`` (a 4-bit one decoded to
    ``dtype`` first)."""
    four_bit = quant.is_4bit(weight)
    n, k = quant.base_shape(weight)
    rows = max(1, BLOCK_ELEMS // max(k, 1))
    for i in range(0, n, rows):
        j = min(i + rows, n)
        w = quant.dequantize_rows(weight, i, j, dtype) if four_bit else weight[i:j]
        yield i, j, w.to(acc)


def base_row_norms_sq(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``||W_j||^2`` for each output row of ``weight`` ``(N, K)``, in the accumulation dtype;
    ``dtype``: what a 4-bit ``weight`` is dequantized to (ignored otherwise)."""
    dtype = values_dtype(weight, dtype)
    acc = accumulation_dtype(dtype)
    out = torch.empty(quant.base_shape(weight)[0], dtype=acc, device=weight.device)
    for i, j, w in _row_blocks(weight, acc, dtype):
        out[i:j] = (w * w).sum(dim=1)
    return out


# base_row_norms_sq per base weight, by id: (a weak reference to the weight, the state it was
# computed from, the value); an entry goes when its weight does (see cached_base_sq). NOTE: not
# a WeakKeyDictionary: it compares keys with ==, which on tensors is elementwise.
_BASE_SQ: dict[int, tuple] = {}


@torch.no_grad()
def cached_base_sq(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``base_row_norms_sq(weight, dtype)``, computed once per state of ``weight``: kept beside
    the tensor (weakly: it goes with it) and recomputed when the weight changes in place (its
    version counter: an optimizer step on an unfrozen base, a merge, ``load_state_dict``), or
    its storage, dtype, device or shape (``.to()``, a ZeRO-3 gather), or, for a 4-bit weight,
    the dtype it is dequantized to. ``None`` where nothing can be kept: under
    ``torch.compile`` (the graph computes it), on ``meta``, and for inference-mode tensors (no
    version counter)."""
    if torch.compiler.is_compiling() or weight.device.type == "meta":
        return None
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor
        return None
    dtype = values_dtype(weight, dtype)
    state = (version, weight.data_ptr(), weight.dtype, dtype, weight.device, tuple(weight.shape))
    key = id(weight)
    kept = _BASE_SQ.get(key)
    if kept is not None and kept[0]() is weight and kept[1] == state:
        return kept[2]
    value = base_row_norms_sq(weight, dtype)
    ref = weakref.ref(weight, lambda _, key=key: _BASE_SQ.pop(key, None))
    _BASE_SQ[key] = (ref, state, value)
    return value


@torch.no_grad()
def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    base_sq: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``n`` ``(N,)``: the row norms of ``W + s (A B)^T`` for ``weight`` ``(N, K)``, ``lora_A``
    ``(K, r)``, ``lora_B`` ``(r, N)``, by the factored form, ``W`` read in blocks of rows (no
    ``(N, K)`` temporary). ``base_sq``: :func:`base_row_norms_sq` of ``weight``, when cached.
    ``dtype``: what a 4-bit ``weight`` is dequantized to (its rows decoded block by block).
    In the accumulation dtype, detached (DoRA's norm is a constant in backward); rounding can
    take ``n^2`` a hair below zero where a merged row vanishes: clamped at zero."""
    dtype = values_dtype(weight, dtype)
    acc = accumulation_dtype(torch.promote_types(dtype, lora_A.dtype))
    a, bt = lora_A.to(acc), lora_B.to(acc).t()  # (K, r), (N, r)
    n = quant.base_shape(weight)[0]
    wa = torch.empty(n, a.shape[1], dtype=acc, device=weight.device)  # the one pass over W
    sq = None if base_sq is not None else torch.empty(n, dtype=acc, device=weight.device)
    for i, j, w in _row_blocks(weight, acc, dtype):
        torch.mm(w, a, out=wa[i:j])
        if sq is not None:
            sq[i:j] = (w * w).sum(dim=1)
    base = (base_sq if base_sq is not None else sq).to(acc)
    cross = (wa * bt).sum(dim=1)
    lora_sq = ((bt @ (a.t() @ a)) * bt).sum(dim=1)
    return (base + 2.0 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0).sqrt()
