"""bitsandbytes' 4-bit weights dequantized by a Triton kernel into one transient buffer.

``W[i] = code[q_i] * absmax[i // blocksize]`` in fp32, rounded once to the output dtype
(round-to-nearest-even, as ``Tensor.to``), where ``q_i`` is the high nibble of byte ``i // 2``
for even ``i`` and the low one for odd ``i`` (``lora_kernels.quant`` has the format). The
double-quantized scales are decoded first by ``quant.absmax`` (1/64 of the weight's elements at
bitsandbytes' default blocksize). Each program writes ``BLOCK`` consecutive elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch, to_output

BLOCK = 1024  # elements per program: 512 bytes read, 2 KiB of bf16 written


@triton.jit
def decode(packed_ptr, absmax_ptr, code_ptr, base, offs, mask, BLOCKSIZE: tl.constexpr):
    """fp32 ``code[q] * absmax[block]`` of the elements ``base + offs`` of the flat weight
    (``base`` an int64 scalar, ``offs`` an int32 tile of any shape), 0 where ``mask`` is off.

    NOTE: the tile's offsets stay 32-bit (half the registers of int64 ones, in a K loop whose
    decoding already holds several registers an element); the 64-bit part is split off the
    scalar ``base``: its parity and its offset inside a block join the tile, its byte and block
    indices join the pointers."""
    lead = (base % 2).to(tl.int32) + offs
    byte = tl.load(packed_ptr + base // 2 + lead // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(lead % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + q, mask=mask, other=0.0)
    in_block = (base % BLOCKSIZE).to(tl.int32) + offs
    scale = tl.load(absmax_ptr + base // BLOCKSIZE + in_block // BLOCKSIZE, mask=mask, other=0.0)
    return value * scale


@triton.jit
def dequant_4bit_kernel(
    packed_ptr,  # uint8, (total + 1) // 2
    absmax_ptr,  # fp32, one per block of BLOCKSIZE elements
    code_ptr,  # fp32, the 16-entry table
    out_ptr,  # total elements of the output dtype
    total,
    BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter with a bfloat16 output: to_output rounds to even
):
    # NOTE: int64 offsets: a weight can pass 2**31 elements (a 128k-vocabulary head).
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    inside = base + offs < total
    values = decode(packed_ptr, absmax_ptr, code_ptr, base, offs, inside, BLOCKSIZE)
    out = to_output(values, out_ptr.dtype.element_ty, UPCAST)
    tl.store(out_ptr + base + offs, out, mask=inside)


def launch_dequant(
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
) -> None:
    """Fill ``out`` (contiguous, any shape) from ``packed`` bytes, fp32 ``scales`` per block of
    ``blocksize`` elements and the 16-entry fp32 ``code``: one launch (recorded under
    ``capture_launches``, which ``inspect`` compiles for GPUs)."""
    total = out.numel()
    if not total:
        return
    upcast = out.device.type == "cpu" and out.dtype == torch.bfloat16
    meta = {
        "BLOCKSIZE": blocksize,
        "BLOCK": BLOCK,
        "UPCAST": upcast,
        "num_warps": 4,
        "num_stages": 1,
    }
    args = (packed, scales, code, out, total)
    launch("dequant_4bit", dequant_4bit_kernel, (triton.cdiv(total, BLOCK),), args, meta)
