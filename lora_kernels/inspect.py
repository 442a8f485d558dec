"""Compile every kernel the package launches for a GPU, without one, and report its machine code.

    python -m lora_kernels.inspect [--arch sm_80|sm_89|sm_90|sm_100|sm_120] [--dtype D] [--rank R]
                                   [--dropout P] [--candidates] [--base nf4|dora] [--json]
                                   [--dump DIR]
                                   [--jobs N]

For each arch, dtype and rank, the real forward and backward of the Triton path run under
``capture_launches`` on ``meta`` tensors of an LLM projection (M=8192, K=N=4096): the launches they
would make (kernel, grid, arguments, configs) are compiled by Triton's own JIT (``warmup``: it
specializes and compiles as a launch would, and launches nothing), to cubins for the target, with
any Triton from 3.2 on (``make compat``; sm_100 and sm_120 need Triton 3.3), and their SASS (read
with the ``cuobjdump`` that Triton ships) tells registers, spills (STL/LDL), tensor-core
instructions (HMMA on sm_80, sm_89 and sm_120, HGMMA on sm_90, UTCHMMA on sm_100) and async copies
(LDGSTS / UTMALDG); the metadata tells shared memory, against the target's per-block limit. Needs
``triton`` and no GPU; not under ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import NamedTuple

import torch

from . import env, quant, triton_path
from .kernels import dequant
from .kernels.common import capture_launches
from .roofline import TARGET_SHAPE
from .tune.space import candidates as tune_candidates

M, K, N, _ = TARGET_SHAPE  # an LLM projection: the design's target shape
M_4BIT = 512  # a 4-bit base's in-loop launches run at small M (triton_path.in_loop)


class Target(NamedTuple):
    """A GPU to build for: what the plan (``triton_path.plan_for``) and the launches depend
    on, and what to expect."""

    capability: int
    sms: int  # of the GPU named
    max_shared_bytes: int  # opt-in shared memory per block (CUDA programming guide)
    mma: str  # the SASS tensor-core instruction its 16-bit dots must use


ARCHS = {
    "sm_80": Target(80, 108, 163 * 1024, "HMMA"),  # A100 (Ampere's tables)
    "sm_89": Target(89, 142, 99 * 1024, "HMMA"),  # L40S (Ampere's tables; also L4, RTX 40xx)
    "sm_90": Target(90, 132, 227 * 1024, "HGMMA"),  # H100: wgmma (Hopper's tables)
    "sm_100": Target(100, 148, 227 * 1024, "UTCHMMA"),  # B200: tcgen05 (Hopper's tables)
    "sm_120": Target(120, 170, 99 * 1024, "HMMA"),  # RTX 5090: mma.sync (Ampere's tables)
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_DTYPES = ("float16", "bfloat16")
RANKS = (4, 16, 64)
DROPOUTS = (0.0, 0.1)  # dropout adds a launch (lora_fwd_t) and changes three kernels' code
SCALING = 2.0


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def table_plan(arch: str, dtype: torch.dtype, rank: int, dropout_p: float = 0.0):
    """The plan the config tables give ``arch`` (its SM count and shared memory)."""
    target = ARCHS[arch]
    table = triton_path.config_arch(target.capability // 10, target.max_shared_bytes)
    return triton_path.plan_for(
        torch.device("meta"),
        dtype,
        rank,
        dropout_p > 0.0,
        arch=table,
        num_sms=target.sms,
        major=target.capability // 10,
    )


def captured_launches(
    arch: str,
    dtype: torch.dtype,
    rank: int,
    dropout_p: float = 0.0,
    plan=None,
    four_bit=False,
    dora=False,
) -> list:
    """The launches one forward + backward (x, lora_A, lora_B requiring grad) would make, with
    ``plan`` (default: the tables'); ``four_bit``: over a 4-bit W (NF4, blocksize 64) read in
    the K loop, at ``M_4BIT`` tokens; ``dora``: DoRA's (the column scale ``c`` in the
    forward's epilogue with ``z`` stored, ``c`` on the dx pass's ``dY`` tiles, the magnitude's
    sum in the dB launch; with dropout the forward's and dx's second base product)."""
    m = M_4BIT if four_bit else M
    meta = {"device": "meta", "dtype": dtype}
    x, dy = torch.empty(m, K, **meta), torch.empty(m, N, **meta)
    weight, bias = torch.empty(N, K, **meta), torch.empty(N, **meta)
    if four_bit:
        weight = _meta_4bit()
    lora_A, lora_B = torch.empty(K, rank, **meta), torch.empty(rank, N, **meta)
    if plan is None:
        plan = table_plan(arch, dtype, rank, dropout_p)
    c = torch.empty(N, device="meta", dtype=torch.float32) if dora else None
    z = torch.empty(m, N, **meta) if dora else None
    with capture_launches() as launches:
        _, T = triton_path.forward(
            x, weight, bias, lora_A, lora_B, SCALING, dropout_p, 0, plan=plan, col_scale=c,
            z_out=z,
        )  # fmt: skip
        needs = (True, False, False, True, True)
        triton_path.backward(
            dy, x, weight, lora_A, lora_B, T, SCALING, dropout_p, 0, needs, plan=plan,
            col_scale=c, z=z,
        )  # fmt: skip
    return launches


class _TargetDriver:
    """The three questions Triton's JIT asks of its active driver, answered for a GPU that isn't
    here. Only compiling reaches it: ``warmup`` never launches, and nothing else is asked."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        # One device per target: the JIT caches its binder and kernels per device.
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def stand_in_driver(stand_in):
    """Triton's active driver replaced by ``stand_in`` inside the block, then put back as it was.

    NOTE: restored field by field: ``reset_active`` would build the default (CUDA) driver, which
    raises where there is no GPU.
    """
    from triton.runtime import driver

    saved = dict(vars(driver))
    driver.set_active(stand_in)
    try:
        yield
    finally:
        vars(driver).clear()
        vars(driver).update(saved)


def compile_launch(launch, capability: int):
    """Compile one captured launch for ``sm_<capability>`` with Triton's own JIT.

    ``JITFunction.warmup`` binds, specializes (ints == 1, pointers and ints divisible by 16) and
    compiles exactly as a launch would, without launching; the target comes from a stand-in
    driver. Public API since Triton 3.0, so every Triton ``pyproject.toml`` admits builds this way.
    """
    with stand_in_driver(_TargetDriver(capability)):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)


def analyse_cubin(cubin: bytes) -> dict:
    """Registers, spill and tensor-core / async-copy instruction counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = _cuobjdump()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
        res = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, check=True
        )
    ops = Counter(re.findall(r"\b(STL|LDL|HMMA|HGMMA|UTCHMMA|LDGSTS|UTMA[A-Z]+)\b", sass.stdout))
    mma_ops = {op: ops[op] for op in ("HMMA", "HGMMA", "UTCHMMA") if ops[op]}
    registers = re.search(r"REG:(\d+)", res.stdout)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spills": ops["STL"] + ops["LDL"],
        # tensor-core instructions: HMMA (mma.sync), HGMMA (sm_90 wgmma), UTCHMMA (sm_100 tcgen05)
        "mma": sum(mma_ops.values()),
        "mma_ops": mma_ops,
        "async_copies": ops["LDGSTS"] + ops["UTMALDG"],
        # the tensor-memory accelerator: UTMALDG (loads), UTMASTG (stores), UTMAPF (prefetch)...
        "tma": sum(n for op, n in ops.items() if op.startswith("UTMA")),
    }


def _meta_4bit(blocksize: int = 64):
    """A 4-bit ``(N, K)`` W (``quant.Packed``) of ``meta`` tensors: what the launches see."""
    meta = {"device": "meta"}
    packed = torch.empty(N * K // 2, dtype=torch.uint8, **meta)
    scales = torch.empty(N * K // blocksize, dtype=torch.float32, **meta)
    code = torch.empty(16, dtype=torch.float32, **meta)
    return quant.packed_w(packed, scales, code, blocksize, N, K)


def dequant_launches(dtype: torch.dtype, blocksize: int = 64) -> list:
    """The launch that dequantizes a 4-bit ``(N, K)`` base weight into ``dtype`` (the buffer
    strategy: a QLoRA layer's forward makes one, its backward one more for dx; the fused kernels
    then run as over a 16-bit base)."""
    w = _meta_4bit(blocksize)
    out = torch.empty(N, K, dtype=dtype, device="meta")
    with capture_launches() as launches:
        dequant.launch_dequant(w.data, w.scales, w.code, out, blocksize)
    return launches


def inspect_group(
    arch: str,
    dtype_name: str,
    rank: int,
    dropout_p: float,
    dump: str | None = None,
    candidates: bool = False,
    base: str = "16bit",
    dequant: bool = True,
) -> list[dict]:
    """One row per kernel launched by a forward + backward at ``(arch, dtype, rank, dropout)``;
    with ``candidates``, also one for each of the tuner's alternatives (``tune.space``),
    which change one launch's config each: that launch is built again. With ``base="nf4"``: the
    launches that read a 4-bit W in their K loop (``lora_fwd``, ``lora_bwd_dx``; the others are
    the 16-bit builds), plus, where ``dequant`` says, the dequantization launch of the buffer
    strategy (after which the 16-bit builds run)."""
    dtype = DTYPES[dtype_name]
    if base == "dora":  # the launches DoRA changes (dA's is LoRA's; with dropout also T's)
        changed = ("COL_SCALE", "X_SCALE", "DM", "STORE_XM")
        return [
            _inspect_launch(launch, arch, dtype_name, rank, dropout_p, "dora", dump)
            for launch in captured_launches(arch, dtype, rank, dropout_p, dora=True)
            if any(launch.kwargs.get(flag) for flag in changed)
        ]
    if base == "nf4":
        launches = [
            launch
            for launch in captured_launches(arch, dtype, rank, dropout_p, four_bit=True)
            if launch.kwargs.get("FOUR_BIT")
        ]
        if dequant:
            launches += dequant_launches(dtype)
        return [
            _inspect_launch(launch, arch, dtype_name, rank, dropout_p, "nf4", dump)
            for launch in launches
        ]
    plans = [("tables", None)]
    if candidates:
        plans = tune_candidates(table_plan(arch, dtype, rank, dropout_p), dropout_p > 0.0)
    rows = []
    for name, plan in plans:
        only = None if name == "tables" else triton_path.LAUNCHES[name.split()[0]]
        for launch in captured_launches(arch, dtype, rank, dropout_p, plan):
            if only is None or launch.name == only:
                rows.append(_inspect_launch(launch, arch, dtype_name, rank, dropout_p, name, dump))
    return rows


def _inspect_launch(launch, arch, dtype_name, rank, dropout_p, candidate, dump) -> dict:
    """Compile one captured launch for ``arch`` and describe its build."""
    compiled = compile_launch(launch, ARCHS[arch].capability)
    tag = f"_p{dropout_p:g}" if dropout_p else ""
    alt = "" if candidate == "tables" else "_" + re.sub(r"[^A-Za-z0-9]+", "-", candidate)
    cubin_name = f"{launch.name}_{arch}_{dtype_name}_r{rank}{tag}{alt}.cubin"
    if dump is not None:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, cubin_name), "wb") as f:
            f.write(compiled.asm["cubin"])
    config = {
        k: v
        for k, v in launch.kwargs.items()
        if k.startswith("BLOCK") or k in ("R", "num_warps", "num_stages")
    }
    return {
        "kernel": launch.name,
        "descriptors": launch.kernel.fn.__name__.endswith("_tma_kernel"),
        "candidate": candidate,
        "arch": arch,
        "dtype": dtype_name,
        "rank": rank,
        "dropout": dropout_p,
        **analyse_cubin(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
        "shared_limit": ARCHS[arch].max_shared_bytes,
        "grid": list(launch.grid),
        "config": config,
        "cubin": cubin_name,
    }


def inspect_builds(
    archs,
    dtypes,
    ranks,
    dropouts=(0.0,),
    dump: str | None = None,
    jobs: int = 1,
    candidates: bool = False,
    base: str = "16bit",
) -> list[dict]:
    """Rows for every (arch, dtype, rank, dropout) group, compiled ``jobs`` groups at a time
    (with ``candidates``: the tuner's whole candidate space too; with ``base="nf4"``: the 4-bit
    base's launches instead)."""
    groups = [(a, d, r, p) for a in archs for d in dtypes for r in ranks for p in dropouts]
    # the dequantization launch depends on neither the rank nor the dropout: built once
    dequant = [(r, p) == (ranks[0], dropouts[0]) for _, _, r, p in groups]
    extra = ([dump] * len(groups), [candidates] * len(groups), [base] * len(groups), dequant)
    if jobs <= 1:
        results = [inspect_group(*g, *more) for g, *more in zip(groups, *extra)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(inspect_group, *zip(*groups), *extra))
    return [row for rows in results for row in rows]


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "candidate", "arch", "dtype", "rank", "dropout", "registers", "spills"]
    cols += ["shared_bytes"]
    cols += ["mma_ops"]
    cols += ["async_copies", "tma", "grid", "config"]
    show = {"config": _short, "mma_ops": lambda ops: ",".join(f"{k}:{v}" for k, v in ops.items())}
    cells = [[show.get(c, str)(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _short(config: dict) -> str:
    keys = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_D": "D", "R": "R"}
    tile = "x".join(f"{keys[k]}{v}" for k, v in config.items() if k in keys)
    return f"{tile} w{config['num_warps']} s{config['num_stages']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every kernel for GPUs, report SASS.")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS))
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    parser.add_argument("--rank", action="append", type=int)
    parser.add_argument(
        "--dropout",
        action="append",
        type=float,
        help="LoRA dropout of the captured forward/backward (default: 0 and 0.1)",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="also build every alternative config the tuner measures (lora_kernels.tune)",
    )
    parser.add_argument(
        "--base",
        choices=("16bit", "nf4", "dora"),
        default="16bit",
        help="nf4: build the 4-bit base's kernels instead: the fused ones reading it in their "
        "K loop, and its dequantization kernel (QLoRA; docs/qlora.md); dora: DoRA's forward, "
        "dx and dB launches (docs/dora.md)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--dump", metavar="DIR", help="write every cubin into DIR")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="groups compiled in parallel"
    )
    args = parser.parse_args(argv)
    if env.triton_interpreter_enabled():
        parser.error("TRITON_INTERPRET is set: unset it to compile for GPUs")
    dropouts = args.dropout or DROPOUTS
    rows = inspect_builds(
        args.arch or sorted(ARCHS),
        args.dtype or list(DEFAULT_DTYPES),
        args.rank or RANKS,
        dropouts,
        args.dump,
        args.jobs,
        args.candidates,
        args.base,
    )
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    over = [r for r in rows if r["shared_bytes"] > r["shared_limit"]]
    for r in over:
        print(
            f"inspect: {r['kernel']} for {r['arch']} at rank {r['rank']} ({r['dtype']}, dropout "
            f"{r['dropout']}) needs {r['shared_bytes']} B of shared memory, over the GPU's "
            f"{r['shared_limit']}",
            file=sys.stderr,
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
