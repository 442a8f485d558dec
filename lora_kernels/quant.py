"""bitsandbytes' 4-bit base weights (QLoRA): recognising them, reading their format, dequantizing.

The format (bitsandbytes' ``Params4bit`` with its ``QuantState``; bitsandbytes' code is the
oracle, tests/test_quant.py holds us to it):

- ``weight.data``: the row-major flattened ``W (N, K)``, two 4-bit codes per byte, element ``2i``
  in the high nibble (another ``quant_storage`` dtype reinterprets the same bytes).
- ``quant_state.absmax``: one fp32 scale per block of ``blocksize`` consecutive elements; with
  double quantization (``nested``) uint8 codes of ``state2.code`` (a 256-entry map) in blocks of
  ``state2.blocksize`` (256), scaled by ``state2.absmax`` (fp32), plus ``offset``.
- ``W = code[q] * absmax[block]`` computed in fp32, then rounded once to the compute dtype.

Nothing here imports bitsandbytes: a weight is recognised by its ``quant_state``. Layers and
models check that bitsandbytes is installed before they take one (``require_bitsandbytes``).
"""

from __future__ import annotations

import dataclasses
import math
import types

import torch

# The 4-bit code tables, bitsandbytes' values as float32 (NF4: the normal-float quantiles of
# Dettmers et al. 2023; FP4: sign, 2 exponent bits, 1 mantissa bit, as bitsandbytes maps them).
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4 = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
CODES = {"nf4": NF4, "fp4": FP4}
# Dequantization works through the weight in pieces of this many elements (a multiple of every
# blocksize): its fp32 temporaries stay this small whatever the layer's size.
PIECE_ELEMS = 2**20


def is_4bit(weight: object) -> bool:
    """Whether ``weight`` is a quantized bitsandbytes 4-bit weight (``Params4bit`` after
    quantization): a tensor carrying a ``quant_state`` with a 4-bit ``quant_type``."""
    state = getattr(weight, "quant_state", None)
    return isinstance(weight, torch.Tensor) and getattr(state, "quant_type", None) in CODES


def require_bitsandbytes(what: str) -> None:
    """Raise ``ImportError`` saying how to install bitsandbytes when it is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as missing:
        raise ImportError(
            f"{what} needs bitsandbytes (4-bit bases): pip install 'lora_kernels[qlora]' "
            "(bitsandbytes >= 0.47)"
        ) from missing


def check_base(linear: torch.nn.Module) -> bool:
    """Whether ``linear`` (a layer to wrap) is a quantized bitsandbytes 4-bit linear; refuses,
    naming what is wrong, one that can't be taken (not quantized yet, bitsandbytes missing, a
    format ``check`` refuses)."""
    weight = linear.weight
    if type(weight).__name__ == "Params4bit" and not is_4bit(weight):
        raise ValueError(
            f"{type(linear).__name__}'s 4-bit weight is not quantized yet (bitsandbytes "
            "quantizes it when the layer moves to a device: call .to(device) first)"
        )
    if not is_4bit(weight):
        return False
    require_bitsandbytes("LoRALayer over a 4-bit base")
    check(weight)
    return True


def compute_dtype(linear: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes 4-bit ``linear`` computes in for input ``x``: its
    ``compute_dtype``, set from the first input by bitsandbytes' own rule (``set_compute_type``,
    as ``Linear4bit.forward`` does), else ``x``'s."""
    if not getattr(linear, "compute_type_is_set", True):
        linear.set_compute_type(x)
        linear.compute_type_is_set = True
    return getattr(linear, "compute_dtype", None) or x.dtype


def shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a 4-bit weight, from its ``quant_state``."""
    n, k = weight.quant_state.shape
    return int(n), int(k)


def base_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a base weight: a 16-bit one's own shape, a 4-bit
    one's from its ``quant_state`` (its tensor holds the packed bytes)."""
    return shape(weight) if is_4bit(weight) else tuple(weight.shape)


def check(weight: torch.Tensor) -> None:
    """Refuse, naming what is wrong, 4-bit weights this module can't read."""
    state = weight.quant_state
    if len(state.shape) != 2:
        raise ValueError(f"4-bit weight: quant_state.shape must be 2-D (N, K), got {state.shape}")
    n, k = shape(weight)
    if weight.numel() * weight.element_size() * 2 < n * k:
        raise ValueError(
            f"4-bit weight holds {weight.numel() * weight.element_size()} bytes, fewer than "
            f"N x K / 2 = {(n * k + 1) // 2} for quant_state.shape ({n}, {k})"
        )
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "4-bit weight was repacked in place by bitsandbytes for its CPU inference kernel "
            "(packing_format_for_cpu, after an eval-mode forward without grad on an AVX512-BF16 "
            "CPU); reload or re-quantize the weight"
        )
    if weight.requires_grad:
        raise ValueError("4-bit base weights are frozen: set weight.requires_grad_(False)")


def stand_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zero-stride ``(N, K)`` tensor of ``dtype`` on the 4-bit ``weight``'s device: what a
    backward that does not read W (no ``dx``) is given of it (its shape, dtype and device),
    without the memory of a dequantized copy."""
    n, k = shape(weight)
    return torch.zeros((), dtype=dtype, device=weight.device).expand(n, k)


def absmax(state) -> torch.Tensor:
    """The fp32 scale of every block, double quantization decoded as bitsandbytes does:
    ``state2.code[absmax] * state2.absmax[i // state2.blocksize]``, then ``+ offset``."""
    if not getattr(state, "nested", False):
        return state.absmax.float()
    inner = state.state2
    codes = inner.code.to(device=state.absmax.device, dtype=torch.float32)
    decoded = codes[state.absmax.long()]
    scales = inner.absmax.float().repeat_interleave(inner.blocksize)[: decoded.numel()]
    return decoded.mul_(scales).add_(state.offset)


def synthetic_4bit(n: int, k: int, device, dtype, gen, blocksize: int = 64) -> torch.Tensor:
    """A packed NF4 ``(n, k)`` weight in bitsandbytes' format (random codes, fp32 scales, no
    double quantization), carrying the ``quant_state`` fields this module reads: what the tuner
    and the GPU check measure on, where bitsandbytes may not be installed."""
    packed = torch.randint(0, 256, ((n * k + 1) // 2,), generator=gen, dtype=torch.uint8)
    scales = torch.rand(-(-n * k // blocksize), generator=gen) * 0.1 / math.sqrt(k) + 1e-3
    packed = packed.to(device)
    packed.quant_state = types.SimpleNamespace(
        shape=torch.Size([n, k]), blocksize=blocksize, quant_type="nf4",
        absmax=scales.to(device), nested=False, dtype=dtype,
    )  # fmt: skip
    return packed


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 values of ``quant_type``'s codes, on ``device``."""
    return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


@dataclasses.dataclass(frozen=True)
class Packed:
    """A 4-bit weight as the fused kernels read it, tile by tile in their K loop: the flat codes
    (``data``, uint8) seen as a matrix of ``shape`` with ``strides`` in elements (``(N, K)`` and
    ``(K, 1)`` for W; ``t()`` gives W^T), the decoded fp32 ``scales`` and the 16-entry ``code``.
    Nothing is dequantized: ``scales`` are 1 / ``blocksize`` of the elements."""

    data: torch.Tensor
    scales: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    strides: tuple[int, int]

    def stride(self, dim: int) -> int:
        return self.strides[dim]

    def t(self) -> Packed:
        return dataclasses.replace(self, shape=self.shape[::-1], strides=self.strides[::-1])


def packed_w(data, scales, code, blocksize: int, n: int, k: int) -> Packed:
    """``Packed`` W ``(N, K)``, row-major, from its parts."""
    return Packed(data, scales, code, blocksize, (n, k), (k, 1))


def packed(weight: torch.Tensor) -> Packed:
    """``weight`` (a 4-bit ``Params4bit``) as ``Packed`` W: its bytes, its scales decoded."""
    state = weight.quant_state
    data = weight.detach().reshape(-1).view(torch.uint8)
    code = code_table(state.quant_type, data.device)
    return packed_w(data, absmax(state).contiguous(), code, int(state.blocksize), *shape(weight))


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """``(256,)`` int64: the two fp32 elements each byte encodes (high nibble first), as the
    bits of one 64-bit word, so one gather per byte decodes both: ``index_select`` of 64-bit
    words measured 0.54 ms per 2**19 bytes on our CPU, of ``(256, 2)`` fp32 rows 1.37 ms."""
    code = code_table(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack((code[byte >> 4], code[byte & 15]), dim=1).view(torch.int64).view(-1)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W (N, K)`` in ``dtype``: ``code[q] * absmax[block]`` in fp32, rounded once.

    A new tensor each call, built in pieces of ``PIECE_ELEMS`` elements: the only temporaries
    are one piece's fp32 values.
    """
    n, k = shape(weight)
    return _decode(weight, 0, n * k, dtype).view(n, k)


def dequantize_rows(weight: torch.Tensor, start: int, end: int, dtype: torch.dtype):
    """Rows ``start:end`` of ``W`` in ``dtype``, decoded as :func:`dequantize` decodes them
    (the same values), the rest of the weight untouched: ``(end - start, K)``."""
    k = shape(weight)[1]
    return _decode(weight, start * k, end * k, dtype).view(end - start, k)


def _decode(weight: torch.Tensor, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat elements ``first:last`` of the 4-bit ``weight`` in ``dtype``, in pieces of
    ``PIECE_ELEMS``, each starting at a block's first element (a blocksize is even: a byte's)."""
    state = weight.quant_state
    block = int(state.blocksize)
    packed = weight.detach().reshape(-1).view(torch.uint8)
    table = _pair_table(state.quant_type, packed.device)
    scales = absmax(state)
    out = torch.empty(last - first, dtype=dtype, device=packed.device)
    piece = max(block, PIECE_ELEMS // block * block)
    for start in range(first - first % block, last, piece):
        end = min(start + piece, last)
        count = end - start
        pairs = table.index_select(0, packed[start // 2 : (end + 1) // 2].int())
        values = pairs.view(torch.float32)
        blocks = -(-count // block)
        if values.numel() < blocks * block:  # the last piece: pad to whole blocks
            values = torch.nn.functional.pad(values, (0, blocks * block - values.numel()))
        head = start // block
        values = values[: blocks * block].view(blocks, block)
        values.mul_(scales[head : head + blocks, None])
        skip = max(first - start, 0)  # (the first piece starts at its block's start)
        out[start + skip - first : end - first].copy_(values.view(-1)[skip:count])
    return out
