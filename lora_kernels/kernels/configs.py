"""Every launch config of the kernels, per GPU generation: one config a line, with its reason.

A table's key is the generation of the config tables a GPU takes (``triton_path.config_arch``):
8 (Ampere's: A100, and every GPU with under 227 KiB of shared memory a block: L4, L40S, RTX 30 /
40 / 50) or 9 (Hopper's: H100, H200, B200). Newer GPUs than the tables know run Hopper's, older
ones Ampere's. What each build costs (registers, spills, shared memory, tensor cores) is what
``python -m lora_kernels.inspect`` reports; docs/kernels.md has the tables' history.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import padded_rank

KNOWN_ARCHS = (8, 9)
# The padded rank from which the large-rank configs apply: a (BLOCK_M x R) fp32 accumulator and
# an (R x BLOCK_N) tile join the registers, so the tiles shrink.
LARGE_RANK = 64


class Tile(NamedTuple):
    """A launch config of the fused kernel (``fused_mm``, ``fused_mm_tma``)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int  # row-blocks sharing each column-block of W in L2 (the grouped order)
    num_warps: int
    num_stages: int


class GradTile(NamedTuple):
    """A launch config of the reductions (``lora_grad``, ``lora_grad_tma``)."""

    BLOCK_M: int  # the reduction step over the M tokens
    BLOCK_D: int  # the width of the output tile
    num_warps: int
    num_stages: int


# fmt: off
# The fused kernel, (kind, arch) -> Tile.
FUSED = {
    # 16-bit inputs
    ("16bit", 8): Tile(128, 128, 32, 8, 8, 4),  # 164 KB fits 4 stages; 8 warps: 64 acc regs
    ("16bit", 9): Tile(128, 256, 64, 8, 8, 3),  # wide N: more x reuse, two warpgroups (wgmma)
    ("16bit_large_rank", 8): Tile(128, 64, 32, 8, 8, 4),  # R >= 64: 128 x 128 spills
    ("16bit_large_rank", 9): Tile(128, 128, 64, 8, 8, 3),  # R >= 64: half of the 256-wide N
    # dx with dropout (16-bit): a second fp32 (BLOCK_M x BLOCK_N) tile holds the masked LoRA term
    ("16bit_dropout_dx", 9): Tile(128, 128, 64, 8, 8, 3),  # the 256-wide tile spilled hundreds
    ("16bit_dropout_dx_large_rank", 9): Tile(128, 64, 64, 8, 8, 3),  # halved again at R >= 64
    # float32 without TF32 (and float64, for gradcheck): FMA dots keep operands in registers
    ("fp32", 8): Tile(128, 64, 16, 8, 8, 3),  # small tiles: the operands live in registers
    ("fp32", 9): Tile(128, 64, 16, 8, 8, 3),  # as Ampere's: no tensor cores to feed
    ("fp32_large_rank", 8): Tile(64, 32, 16, 8, 4, 3),  # 128-wide tiles spill hundreds at R 64
    ("fp32_large_rank", 9): Tile(64, 64, 16, 8, 8, 3),  # the same, with 8 warps
    # a 4-bit W decoded in the K loop (small M, docs/qlora.md): several registers an element
    ("4bit", 8): Tile(64, 64, 32, 8, 4, 3),  # no spills at R 4-64 (8 warps crash Triton 3.2)
    ("4bit", 9): Tile(64, 64, 32, 8, 4, 3),  # BLOCK_K 64 spilled (dx, sm_80; sm_100)
    ("4bit_fp32", 8): Tile(64, 32, 16, 8, 8, 3),  # fp32 tables spill up to 118 with decoding
    ("4bit_fp32", 9): Tile(64, 32, 16, 8, 8, 3),  # one narrow tile for every rank
    # T-only launches (STORE_OUT off): one column of tiles, so BLOCK_M sets the grid; N unused
    ("t_only", 8): Tile(64, 16, 64, 1, 4, 3),  # M / 64 programs, each reading its x rows once
    ("t_only", 9): Tile(64, 16, 64, 1, 4, 3),  # 128 programs at M = 8192: one wave on an H100
    ("t_only_fp32", 8): Tile(64, 16, 32, 1, 4, 3),  # FMA dots: a shorter K step
    ("t_only_fp32", 9): Tile(64, 16, 32, 1, 4, 3),  # as Ampere's
}
# The reductions, (kind, arch) -> GradTile.
GRAD = {
    ("16bit", 8): GradTile(64, 128, 4, 3),  # (BLOCK_D x R) tiles: tensor-core shapes everywhere
    ("16bit", 9): GradTile(64, 128, 4, 4),  # wgmma wants M >= 64 (the D side)
    ("16bit_large_rank", 8): GradTile(32, 128, 8, 3),  # R >= 64: acc + hi/lo U spill at 4 warps
    ("16bit_large_rank", 9): GradTile(64, 128, 8, 4),  # R >= 64: twice the warps
    ("16bit_dropout", 8): GradTile(32, 128, 8, 3),  # dA with dropout: Philox state; 64 spills
    ("fp32", 8): GradTile(32, 64, 4, 3),  # FMA dots, operands in registers
    ("fp32", 9): GradTile(32, 64, 4, 3),  # as Ampere's
}
# fmt: on


def known_arch(arch: int) -> int:
    """``arch`` clamped to the generations the tables know."""
    return min(max(arch, KNOWN_ARCHS[0]), KNOWN_ARCHS[-1])


def _sixteen_bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def fused_mm_config(
    arch: int, dtype: torch.dtype, rank: int, dropout_out: bool = False, four_bit: bool = False
) -> dict:
    """The fused kernel's config for tables ``arch``, input ``dtype`` and ``rank``;
    ``dropout_out`` for the dx launch with dropout, ``four_bit`` for a 4-bit W dequantized in
    the K loop."""
    arch = known_arch(arch)
    large = "_large_rank" if padded_rank(rank) >= LARGE_RANK else ""
    sixteen_bit = _sixteen_bit(dtype)
    if four_bit:
        kind = "4bit" if sixteen_bit else "4bit_fp32"
    elif dropout_out and sixteen_bit and ("16bit_dropout_dx" + large, arch) in FUSED:
        kind = "16bit_dropout_dx" + large
    else:
        kind = ("16bit" if sixteen_bit else "fp32") + large
    return FUSED[kind, arch]._asdict()


# DoRA's forward (COL_SCALE with z stored, issue 26) holds a second, 16-bit copy of the output
# tile for z's store: on Hopper's 128 x 256 tile that spilled (8 instructions fp16, 18 bf16, sm_90
# rank 16, descriptor kernel); at most 128 wide it builds without (python -m lora_kernels.inspect
# --base dora).
DORA_MAX_BLOCK_N = 128


def dora_fwd_config(config: dict) -> dict:
    """The forward's config (``fused_mm_config``'s, or a tuned one) as DoRA's forward runs it:
    its tile at most ``DORA_MAX_BLOCK_N`` wide."""
    return {**config, "BLOCK_N": min(config["BLOCK_N"], DORA_MAX_BLOCK_N)}


# DoRA with dropout (issue 26): the forward's output pass reads mask(x) (stored by the T-only pass)
# beside x, and dx takes (dY f) W beside dY W: a second fp32 (BLOCK_M x BLOCK_N) accumulator in
# both. Their tiles at most this wide: at 128 the forward spilled 2 to 38 instructions (every
# arch, ranks 4-64) and dx's sm_120 build failed register allocation; at 64 nothing spills
# (python -m lora_kernels.inspect --base dora --dropout 0.1).
DORA_DROPOUT_MAX_BLOCK_N = 64


def dora_dropout_config(config: dict) -> dict:
    """A forward or dx config as DoRA's dropout launches run it: at most
    ``DORA_DROPOUT_MAX_BLOCK_N`` wide."""
    return {**config, "BLOCK_N": min(config["BLOCK_N"], DORA_DROPOUT_MAX_BLOCK_N)}


# DoRA's dB launch also reads z's tiles and sums dY z (DM): at Hopper's 4 warps that spilled 4
# instructions on sm_100 (float16 rank 16, bfloat16 rank 4); with 8 warps it builds without.
DORA_GRAD_MIN_WARPS = 8


def dora_grad_config(config: dict) -> dict:
    """dB's config (``grad_config``'s, or a tuned one) as DoRA's dB launch runs it: at least
    ``DORA_GRAD_MIN_WARPS`` warps."""
    return {**config, "num_warps": max(config["num_warps"], DORA_GRAD_MIN_WARPS)}


def fused_mm_t_config(arch: int, dtype: torch.dtype) -> dict:
    """The config of T-only (``store_out=False``) launches."""
    return FUSED["t_only" if _sixteen_bit(dtype) else "t_only_fp32", known_arch(arch)]._asdict()


def grad_config(arch: int, dtype: torch.dtype, rank: int, dropout: bool = False) -> dict:
    """The reductions' config for tables ``arch``; ``dropout`` for the dA launch with dropout."""
    arch = known_arch(arch)
    if not _sixteen_bit(dtype):
        kind = "fp32"
    elif dropout and ("16bit_dropout", arch) in GRAD:
        kind = "16bit_dropout"
    elif padded_rank(rank) >= LARGE_RANK:
        kind = "16bit_large_rank"
    else:
        kind = "16bit"
    return GRAD[kind, arch]._asdict()
