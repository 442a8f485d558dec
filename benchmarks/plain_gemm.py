"""Our Hopper forward's build against a plain GEMM's, built the same way, for the same tile.

    python benchmarks/plain_gemm.py [--arch sm_90] [--json]

The plain GEMM is ``y = x W^T`` on the same machinery as ``_lora_fwd_tma_kernel``: host TMA
descriptors, a persistent grid in the grouped order, the tile of Hopper's bfloat16 table
(128 x 256 x 64, 8 warps, 3 stages), fp32 accumulation, one cast on store. Both are compiled for
the target with ``lora_kernels.inspect`` (no GPU needed) and their SASS counted: tensor-core
instructions (HGMMA), TMA loads (UTMALDG), barriers (SYNCS / BAR), registers, shared memory,
instructions. What our kernel adds should be the LoRA dot and its epilogue, nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import triton
import triton.language as tl

from lora_kernels import inspect
from lora_kernels.kernels.common import Launch


@triton.jit
def _plain_gemm_tma_kernel(
    x_desc,  # X (M, K), block (BLOCK_M, BLOCK_K)
    w_desc,  # W (N, K), block (BLOCK_N, BLOCK_K): y = X W^T
    out_ptr,  # (M, N)
    M,
    N,
    K,
    NUM_PROGRAMS,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
            acc = tl.dot(x, w, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


OPS = ("HGMMA", "UTMALDG", "SYNCS", "BAR", "LDS", "LDG", "STG", "STS")


def sass_counts(compiled) -> dict:
    """Registers, shared memory, instructions and the counted opcodes of one build."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [inspect._cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    ops = Counter(re.findall(r"\b(" + "|".join(OPS) + r")\b", sass))
    row = inspect.analyse_cubin(compiled.asm["cubin"])
    return {
        "registers": row["registers"],
        "spills": row["spills"],
        "shared_bytes": compiled.metadata.shared,
        "instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/", sass)),
        **{op: ops[op] for op in OPS},
    }


def compare(arch: str = "sm_90") -> dict:
    from triton.tools.tensor_descriptor import TensorDescriptor

    target = inspect.ARCHS[arch]
    plan = inspect.table_plan(arch, torch.bfloat16, 16)
    ours = next(
        launch
        for launch in inspect.captured_launches(arch, torch.bfloat16, 16, 0.0, plan)
        if launch.name == "lora_fwd"
    )
    config = {k: plan.fwd[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    meta = {"device": "meta", "dtype": torch.bfloat16}
    m, k, n = inspect.M, inspect.K, inspect.N
    x, w, out = torch.empty(m, k, **meta), torch.empty(n, k, **meta), torch.empty(m, n, **meta)
    x_desc = TensorDescriptor.from_tensor(x, [config["BLOCK_M"], config["BLOCK_K"]])
    w_desc = TensorDescriptor.from_tensor(w, [config["BLOCK_N"], config["BLOCK_K"]])
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    programs = min(target.sms, tiles)
    kwargs = {**config, "num_warps": plan.fwd["num_warps"], "num_stages": plan.fwd["num_stages"]}
    plain = Launch(
        "plain_gemm",
        _plain_gemm_tma_kernel,
        (programs,),
        (x_desc, w_desc, out, m, n, k, programs, out.stride(0)),
        {**kwargs, "enable_fp_fusion": True},
    )
    rows = {
        "lora_fwd (ours)": sass_counts(inspect.compile_launch(ours, target.capability)),
        "plain GEMM": sass_counts(inspect.compile_launch(plain, target.capability)),
    }
    return {"arch": arch, "tile": kwargs, "triton": triton.__version__, "builds": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=["sm_90", "sm_100"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = compare(args.arch)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    builds = result["builds"]
    cols = ["registers", "spills", "shared_bytes", "instructions", *OPS]
    print(f"{args.arch}, bf16, tile {result['tile']}, Triton {result['triton']}")
    print(f"{'':18}" + "".join(f"{c:>13}" for c in cols))
    for name, row in builds.items():
        print(f"{name:18}" + "".join(f"{row[c]:>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
