"""A roofline model of one LoRA layer's forward and backward, per provider: predictions, not
measurements.

    python -m lora_kernels.roofline [--gpu H100] [--tokens 8192] [--in 4096] [--out 4096] ...

Every provider is a list of kernels; each kernel is (FLOPs, minimal DRAM bytes) and takes
``max(flops / peak_flops, bytes / bandwidth)``; a provider's time is the sum over its kernels.
Launch overheads, L2 reuse, wave quantisation and epilogue latencies are ignored, so the model
flatters every provider alike; it ranks designs and bounds what a GPU run can show.

Providers (x requires grad; W, b frozen; A, B trainable; dW, db not computed):
- ``linear``: the frozen ``nn.Linear`` alone, the floor a LoRA layer can't beat.
- ``peft``: peft's LoRA ``Linear`` as autograd runs it, one kernel per op: base GEMM, dropout,
  ``lora_A``, ``lora_B``, ``* scaling``, ``+``, and their backward ops. The plain-PyTorch
  reference (the seeds' formula) runs the same sequence.
- ``lora_kernels``: the Triton path's launches (docs/kernels.md), including the ``x A`` dot that
  every column of output tiles repeats (``R / BLOCK_N`` of the base GEMM) and the hi/lo split.
- DoRA (``--dora``; docs/dora.md): ``peft_dora``, peft's ops (the norm of the materialized
  ``W + s B A``, the column scales as separate elementwise ops and their backward, the base
  output reused at dropout 0; with dropout a second GEMM of W over ``dropout(x)`` each way);
  ``lora_kernels_dora``, our launches plus the factored norm's pass over ``W``, ``z``'s store
  and ``z``'s read in the dB launch (the magnitude's sum); with dropout ``mask(x)`` written by
  the T-only pass and read by the output pass, and the second product's FLOPs in the forward
  and dx launches.

On H100 the launches run the Hopper path (docs/kernels.md): TMA descriptors over a persistent
grid, 16-bit inputs, all but dx with dropout. That changes no FLOP and no DRAM byte of the model:
what it buys is the main loop's efficiency, which the model takes at peak for every provider
alike. Triton GEMMs without TMA have run at 51% of cuBLAS on an H100 (triton-lang/triton#2339:
370 against 722 TFLOP/s); the model assumes the descriptor path reaches the peaks here, which
only a GPU run can confirm.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

# The design's target (DESIGN.md): an LLM projection, and what one layer's forward + backward
# there must reach on a GPU (bf16): at most 1.07x the frozen nn.Linear, 1.4x faster than peft, no
# slower than our own torch path (cuBLAS) by more than 2%. The GPU check measures it; the
# benchmark prints its rows beside it; the roofline predicts it.
TARGET_SHAPE = (8192, 4096, 4096, 16)  # M tokens, K in, N out, rank
TARGETS = {"tuned_vs_linear": 1.07, "peft_vs_tuned": 1.4, "tuned_vs_torch": 1.02}

# Peak dense 16-bit tensor-core FLOP/s and DRAM bandwidth. H100: the achievable figures of the
# design (DESIGN.md: 790 TFLOP/s of the 989 datasheet, 3.0 TB/s of 3.35). A100 SXM 80 GB: its
# datasheet scaled by the same 0.8 and 0.9 (312 -> 250 TFLOP/s, 2.04 -> 1.83 TB/s).
GPUS = {
    "H100": {"flops": 790e12, "bandwidth": 3.0e12},
    "A100": {"flops": 250e12, "bandwidth": 1.83e12},
}
# The Triton path's tile widths (kernels/fused_mm.py, 16-bit, R < 64) and padded-rank rule;
# DoRA's with dropout (kernels/configs.py DORA_DROPOUT_MAX_BLOCK_N).
BLOCK_N = {"H100": 256, "A100": 128}
DORA_DROPOUT_BLOCK_N = 64
MIN_DOT_DIM = 16
# 32-bit CUDA-core lane operations per second, where a 4-bit W's decoding runs when it is done in
# the fused kernels' K loop: SMs x FP32 lanes x boost clock (H100 SXM 132 x 128 x 1.83 GHz, A100
# 108 x 64 x 1.41 GHz), at the same 0.8 / 0.9 of the datasheet as the peaks above would give less.
LANE_OPS = {"H100": 30e12, "A100": 9.7e12}
# Lane operations to decode one element in the loop: the nibble's shift and mask, the code-table
# load, the scale's load and multiply (the index arithmetic shared by the tile aside), the cast.
DECODE_OPS = 5
# The in-loop kernels' tiles (kernels/fused_mm.py CONFIGS_4BIT, 16-bit, R < 64).
BLOCK_M_4BIT = 64
BLOCK_N_4BIT = 64


@dataclass
class Shape:
    tokens: int  # M
    in_features: int  # K
    out_features: int  # N
    rank: int  # r
    elem: int = 2  # bytes per element of x, W, y (bf16 / fp16)
    dropout: float = 0.0
    base: str = "16bit"  # or "nf4": bitsandbytes' 4-bit base, dequantized before each use


# A 4-bit base (docs/qlora.md): each use of W (forward's GEMM, backward's dx) first dequantizes it
# into a 16-bit buffer, for every provider (bitsandbytes' matmul_4bit does, and so does our
# Triton path above in_loop_max_tokens): 0.5 byte of codes and 4 / 64 of decoded fp32 scales
# read, the buffer written. Up to in_loop_max_tokens our fused kernels read those 0.5 + 4 / 64
# bytes instead of the buffer's, and decode every tile once per row of output tiles.
NF4_READ_PER_ELEM = 0.5 + 4 / 64


def in_loop_max_tokens(gpu: str, block_m: int = BLOCK_M_4BIT, elem: int = 2) -> int:
    """The number of tokens up to which decoding a 4-bit W inside the fused kernels' K loop
    should beat dequantizing it into a buffer (a prediction; docs/qlora.md).

    What differs between the two per use of W: the buffer costs ``2 elem`` DRAM bytes per
    element (written, read back by the GEMM); the loop costs ``DECODE_OPS`` lane operations per
    element for each of the ``M / block_m`` rows of output tiles. They break even at
    ``M = block_m (2 elem / bandwidth) / (DECODE_OPS / lane rate)``."""
    peak = GPUS[gpu]
    passes = (2 * elem / peak["bandwidth"]) / (DECODE_OPS / LANE_OPS[gpu])
    return int(block_m * passes)


def _gemm(m, n, k, elem, *, a=True, b=True, c_write=True, c_read=False):
    """(flops, bytes) of C (m x n) = A (m x k) B (k x n), operands read once."""
    nbytes = elem * ((m * k if a else 0) + (k * n if b else 0))
    nbytes += elem * m * n * ((1 if c_write else 0) + (1 if c_read else 0))
    return 2 * m * n * k, nbytes


def _elementwise(n_elems, elem, reads, writes):
    return 0, elem * n_elems * (reads + writes)


def kernels(provider: str, shape: Shape, mode: str, gpu: str = "H100") -> list[tuple]:
    """``[(name, flops, bytes[, lane ops]), ...]`` of ``provider`` in ``mode`` ("fwd", "bwd",
    "fwd+bwd"); lane ops where a kernel decodes a 4-bit W on the CUDA cores."""
    if mode == "fwd+bwd":
        return kernels(provider, shape, "fwd", gpu) + kernels(provider, shape, "bwd", gpu)
    m, k, n, r, e = shape.tokens, shape.in_features, shape.out_features, shape.rank, shape.elem
    p = shape.dropout
    out = []
    if provider == "linear":
        if mode == "fwd":
            out.append(("y = x W^T", *_gemm(m, n, k, e)))
        else:
            out.append(("dx = dY W", *_gemm(m, k, n, e)))
    elif provider in ("peft", "reference"):
        if mode == "fwd":
            out.append(("base y = x W^T", *_gemm(m, n, k, e)))
            if p:
                # dropout writes the dropped copy of x and its mask (1 byte / element)
                out.append(("dropout(x)", 0, e * m * k * 2 + m * k))
            out.append(("t = x A", *_gemm(m, r, k, e)))
            out.append(("u = t B", *_gemm(m, n, r, e)))
            out.append(("u * scaling", *_elementwise(m * n, e, 1, 1)))
            out.append(("y + u", *_elementwise(m * n, e, 2, 1)))
        else:
            out.append(("d(u*s)", *_elementwise(m * n, e, 1, 1)))
            out.append(("dB = t^T du", *_gemm(r, n, m, e)))
            out.append(("dt = du B^T", *_gemm(m, r, n, e)))
            out.append(("dA = x^T dt", *_gemm(k, r, m, e)))
            out.append(("dx_l = dt A^T", *_gemm(m, k, r, e)))
            if p:
                out.append(("dropout backward", 0, e * m * k * 2 + m * k))
            out.append(("dx = dY W", *_gemm(m, k, n, e)))
            out.append(("dx += dx_l", *_elementwise(m * k, e, 2, 1)))
    elif provider == "lora_kernels":
        rp = max(MIN_DOT_DIM, 1 << (r - 1).bit_length())
        in_loop = shape.base == "nf4" and m <= in_loop_max_tokens(gpu, elem=e)
        block_n = BLOCK_N_4BIT if in_loop else BLOCK_N[gpu]
        cols = -(-n // block_n)  # columns of output tiles, each repeating the x A dot
        t_bytes = 4 * m * r  # T (M x r) is float32
        lora_epilogue = 2 * 2 * m * rp * n  # (x A) B as hi + lo
        if mode == "fwd":
            if p:
                fl, by = _gemm(m, rp, k, e)
                out.append(("lora_fwd_t: T = s drop(x) A", fl, by - e * m * rp + t_bytes))
                fl, by = _gemm(m, n, k, e)
                out.append(("lora_fwd (reads T)", fl + lora_epilogue, by + t_bytes))
            else:
                fl, by = _gemm(m, n, k, e)
                extra = 2 * m * k * rp * cols + lora_epilogue
                out.append(("lora_fwd: y and T", fl + extra, by + t_bytes + e * (k + n) * r))
        else:
            cols_k = -(-k // block_n)
            fl, by = _gemm(m, k, n, e)
            extra = 2 * m * n * rp * cols_k + 2 * 2 * m * rp * k
            out.append(("lora_bwd_dx: dx and dT", fl + extra, by + t_bytes))
            out.append(("lora_bwd_dA: x^T dT", 2 * 2 * m * k * rp, e * m * k + t_bytes))
            out.append(("lora_bwd_dB: T^T dY", 2 * 2 * m * n * rp, e * m * n + t_bytes))
        if in_loop:  # the GEMM of W reads its codes, and decodes them once per row of tiles
            reads_w = ("lora_fwd:", "lora_fwd (", "lora_bwd_dx")
            gemm = next(i for i, kernel in enumerate(out) if kernel[0].startswith(reads_w))
            name, fl, by = out[gemm]
            decode = DECODE_OPS * n * k * -(-m // BLOCK_M_4BIT)
            by += (NF4_READ_PER_ELEM - e) * n * k
            out[gemm] = (f"{name} (4-bit W)", fl, by, decode)
    elif provider in ("lora_kernels_dora", "peft_dora"):
        return _dora_kernels(provider, shape, mode, gpu)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if shape.base == "nf4" and not (provider == "lora_kernels" and in_loop):
        out.insert(0, ("dequant W (4-bit -> 16-bit)", 0, int(n * k * (NF4_READ_PER_ELEM + e))))
    return out


def _dora_kernels(provider: str, shape: Shape, mode: str, gpu: str) -> list[tuple]:
    """DoRA's kernels over a 16-bit base: ``kernels``' LoRA lists and what DoRA adds; with
    dropout, the second base product over ``mask(x)`` (peft's semantics: two GEMMs of W each
    way, for anyone)."""
    if shape.base != "16bit":
        raise ValueError("the DoRA model is for a 16-bit base")
    m, k, n, r, e = shape.tokens, shape.in_features, shape.out_features, shape.rank, shape.elem
    p = shape.dropout
    mn, nk, mk = m * n, n * k, m * k
    out = []
    if provider == "lora_kernels_dora":
        out = kernels("lora_kernels", shape, mode, gpu)
        if mode == "fwd":
            # the factored norm: one thin pass over W (W A), the base rows' norms cached
            out.insert(0, ("norm: W A (factored)", 2 * nk * r, e * nk + 4 * n * r))
            name, fl, by = out[-1][:3]
            if p:  # mask(x) written by the T-only pass, read beside x by the output pass
                name_t, fl_t, by_t = out[1][:3]
                out[1] = (f"{name_t} + mask(x) stored", fl_t, by_t + e * mk)
                out[-1] = (f"{name} + mask(x) W^T, c, z", fl + 2 * mn * k, by + e * mk + e * mn)
            else:
                out[-1] = (f"{name} + c, z stored", fl, by + e * mn)
        else:  # the magnitude's sum in the dB launch: z read beside its dY tiles
            i = next(i for i, kernel in enumerate(out) if kernel[0].startswith("lora_bwd_dB"))
            name, fl, by = out[i][:3]
            out[i] = (f"{name} + dm = sum(dY z)", fl + 2 * mn, by + e * mn)
            if p:  # dx also takes (dY f) W on each W tile, added under the mask; its tiles
                # DORA_DROPOUT_BLOCK_N wide, each column of them repeating the dY B^T dot
                i = next(i for i, kernel in enumerate(out) if kernel[0].startswith("lora_bwd_dx"))
                name, fl, by = out[i][:3]
                rp = max(MIN_DOT_DIM, 1 << (r - 1).bit_length())
                cols = -(-k // DORA_DROPOUT_BLOCK_N) - -(-k // BLOCK_N[gpu])
                out[i] = (f"{name} + (dY f) W", fl + 2 * mk * n + 2 * mn * rp * cols, by)
        return out
    if mode == "fwd":  # peft's DoRA forward (base result reused at dropout 0)
        out.append(("base y = x W^T", *_gemm(m, n, k, e)))
        if p:  # the dropped copy of x and its mask
            out.append(("dropout(x)", 0, e * mk * 2 + mk))
        out.append(("t = x A", *_gemm(m, r, k, e)))
        out.append(("u = t B", *_gemm(m, n, r, e)))
        out.append(("B A (materialized)", *_gemm(n, k, r, e)))
        out.append(("s * (B A)", *_elementwise(nk, e, 1, 1)))
        out.append(("W + s B A", *_elementwise(nk, e, 2, 1)))
        out.append(("row norms", *_elementwise(nk, e, 1, 0)))
        if p:
            out.append(("base' = dropout(x) W^T", *_gemm(m, n, k, e)))
        out.append(("(c - 1) * base", *_elementwise(mn, e, 1, 1)))
        out.append(("c * u", *_elementwise(mn, e, 1, 1)))
        out.append(("* scaling", *_elementwise(mn, e, 1, 1)))
        out.append(("dora = a + b", *_elementwise(mn, e, 2, 1)))
        out.append(("y + dora", *_elementwise(mn, e, 2, 1)))
    else:
        out.append(("d(* scaling), d(c * u)", *_elementwise(mn, e, 2, 2)))
        out.append(("dc: sum(dY u), sum(dY base)", *_elementwise(mn, e, 4, 0)))
        out.append(("d base = dY + dY (c - 1)", *_elementwise(mn, e, 2, 2)))
        out.append(("dB = t^T du", *_gemm(r, n, m, e)))
        out.append(("dt = du B^T", *_gemm(m, r, n, e)))
        out.append(("dA = x^T dt", *_gemm(k, r, m, e)))
        out.append(("dx_l = dt A^T", *_gemm(m, k, r, e)))
        if p:
            out.append(("dx' = d base' W", *_gemm(m, k, n, e)))
            out.append(("dx' += dx_l", *_elementwise(mk, e, 2, 1)))
            out.append(("dropout backward", 0, e * mk * 2 + mk))
        out.append(("dx = dY' W", *_gemm(m, k, n, e)))
        out.append(("dx += dx_l", *_elementwise(mk, e, 2, 1)))
    return out


def dora_table(shape: Shape, gpus=("A100", "H100"), modes=("fwd", "bwd", "fwd+bwd")) -> list:
    """``table``'s rows for DoRA at dropout 0: linear, ours and peft's DoRA, ``vs_peft``
    against peft's DoRA."""
    rows = []
    for gpu in gpus:
        for mode in modes:
            preds = {p: predict(p, shape, mode, gpu) for p in DORA_PROVIDERS}
            for prov, pr in preds.items():
                rows.append(
                    {
                        "gpu": gpu, "M": shape.tokens, "K": shape.in_features,
                        "N": shape.out_features, "r": shape.rank, "dropout": shape.dropout,
                        "base": shape.base, "mode": mode, "provider": prov,
                        "time_ms": pr["time"] * 1e3,
                        "vs_linear": pr["time"] / preds["linear"]["time"],
                        "vs_peft": pr["time"] / preds["peft_dora"]["time"],
                        "kernels": pr["kernels"],
                    }
                )  # fmt: skip
    return rows


def predict(provider: str, shape: Shape, mode: str, gpu: str = "H100") -> dict:
    """Predicted time (s), FLOPs and bytes of ``provider``; the time sums per-kernel rooflines."""
    peak = GPUS[gpu]
    ks = kernels(provider, shape, mode, gpu)
    time = sum(
        max(f / peak["flops"], b / peak["bandwidth"], sum(ops) / LANE_OPS[gpu])
        for _, f, b, *ops in ks
    )
    return {
        "time": time,
        "flops": sum(k[1] for k in ks),
        "bytes": sum(k[2] for k in ks),
        "kernels": len(ks),
    }


PROVIDERS = ("linear", "lora_kernels", "peft")
DORA_PROVIDERS = ("linear", "lora_kernels_dora", "peft_dora")


def table(shapes, gpus=("A100", "H100"), modes=("fwd", "bwd", "fwd+bwd")) -> list[dict]:
    rows = []
    for gpu in gpus:
        for shape in shapes:
            for mode in modes:
                preds = {prov: predict(prov, shape, mode, gpu) for prov in PROVIDERS}
                for prov, pr in preds.items():
                    rows.append(
                        {
                            "gpu": gpu,
                            "M": shape.tokens,
                            "K": shape.in_features,
                            "N": shape.out_features,
                            "r": shape.rank,
                            "dropout": shape.dropout,
                            "base": shape.base,
                            "mode": mode,
                            "provider": prov,
                            "time_ms": pr["time"] * 1e3,
                            "vs_linear": pr["time"] / preds["linear"]["time"],
                            "vs_peft": pr["time"] / preds["peft"]["time"],
                            "kernels": pr["kernels"],
                        }
                    )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'gpu':5} {'M':>5} {'K':>6} {'N':>6} {'r':>3} {'drop':>4} {'mode':8} {'provider':17}"
    head += f" {'ms (pred.)':>10} {'vs linear':>9} {'vs peft':>8}"
    if any(r.get("base", "16bit") != "16bit" for r in rows):
        head += "  base"
    lines = [head]
    for r in rows:
        base = "" if r.get("base", "16bit") == "16bit" else f"  {r['base']}"
        lines.append(
            f"{r['gpu']:5} {r['M']:5d} {r['K']:6d} {r['N']:6d} {r['r']:3d} {r['dropout']:4.1f} "
            f"{r['mode']:8} {r['provider']:17} {r['time_ms']:10.3f} {r['vs_linear']:8.2f}x "
            f"{r['vs_peft']:7.2f}x{base}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Roofline predictions (not measurements).")
    parser.add_argument("--gpu", action="append", choices=sorted(GPUS))
    m, k, n, r = TARGET_SHAPE
    parser.add_argument("--tokens", type=int, default=m)
    parser.add_argument("--in", dest="k", type=int, default=k)
    parser.add_argument("--out", dest="n", type=int, default=n)
    parser.add_argument("--rank", type=int, default=r)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--base", choices=("16bit", "nf4"), default="16bit")
    parser.add_argument("--dora", action="store_true", help="DoRA (vs peft's DoRA)")
    args = parser.parse_args(argv)
    shape = Shape(args.tokens, args.k, args.n, args.rank, dropout=args.dropout, base=args.base)
    print("PREDICTION (roofline model, not a measurement): bf16, x requires grad, W frozen")
    if args.dora:
        print(format_rows(dora_table(shape, args.gpu or ("A100", "H100"))))
        return 0
    print(format_rows(table([shape], args.gpu or ("A100", "H100"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
