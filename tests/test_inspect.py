"""``python -m lora_kernels.inspect``: real GPU builds of every kernel, checked without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_kernels import triton_path
from lora_kernels.inspect import ARCHS, table_plan
from lora_kernels.kernels import common

# Builds per group: bfloat16 (the dtype most users train in) at dropout 0 and 0.1. Blackwell is a
# group of its own: Triton 3.2 (torch 2.6's) has no Blackwell target, so `make compat` leaves it
# out for that version.
GROUPS = {
    "ampere_hopper": {"archs": ("sm_80", "sm_90"), "ranks": (16, 64)},
    "ada": {"archs": ("sm_89",), "ranks": (16,)},  # Ampere's tables in 99 KiB a block
    "blackwell": {"archs": ("sm_100", "sm_120"), "ranks": (16,)},
}
KERNELS = ["lora_fwd", "lora_bwd_dx", "lora_bwd_dA", "lora_bwd_dB"]


@pytest.fixture(scope="module", params=sorted(GROUPS))
def built(request, tmp_path_factory):
    group = GROUPS[request.param]
    dump = tmp_path_factory.mktemp(f"cubins_{request.param}")
    # The interpreter replaces the kernels with Python: compiling needs it off.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.inspect", "--json", "--dump", str(dump)]
    cmd += ["--dtype", "bfloat16", "--dropout", "0", "--dropout", "0.1"]
    for arch in group["archs"]:
        cmd += ["--arch", arch]
    for rank in group["ranks"]:
        cmd += ["--rank", str(rank)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return group, json.loads(out.stdout), dump


def test_every_launched_kernel_is_built(built):
    group, rows, dump = built
    expected = [(p, k) for p in (0.0, 0.1) for k in KERNELS] + [(0.1, "lora_fwd_t")]
    got = sorted((r["arch"], r["rank"], r["dropout"], r["kernel"]) for r in rows)
    assert got == sorted(
        (a, r, p, k) for a in group["archs"] for r in group["ranks"] for p, k in expected
    )
    for row in rows:
        assert set(row) >= {"kernel", "arch", "dtype", "rank", "registers", "spills"}
        assert set(row) >= {"shared_bytes", "shared_limit", "mma", "cubin"}
        assert (dump / row["cubin"]).stat().st_size > 0
        assert row["shared_bytes"] > 0 and 0 < row["registers"] <= 255


def test_shared_memory_fits_the_target(built):
    """A build over the GPU's per-block limit would fail at launch (OutOfResources)."""
    _, rows, _ = built
    over = [
        (r["kernel"], r["arch"], r["rank"], r["dropout"], r["shared_bytes"], r["shared_limit"])
        for r in rows
        if r["shared_bytes"] > r["shared_limit"]
    ]
    assert not over


def test_no_spills(built):
    _, rows, _ = built
    spilling = [(r["kernel"], r["arch"], r["rank"], r["spills"]) for r in rows if r["spills"]]
    assert not spilling


def test_tensor_cores(built):
    _, rows, _ = built
    for r in rows:
        if r["kernel"] in ("lora_fwd", "lora_fwd_t", "lora_bwd_dx"):
            # HGMMA: Hopper's wgmma; UTCHMMA: Blackwell's tcgen05; HMMA: mma.sync elsewhere
            assert r["mma_ops"].get(ARCHS[r["arch"]].mma, 0) > 0, r


@pytest.mark.parametrize(
    "gpu, major, max_shared_kib, expected",
    [
        ("A100", 8, 163, 8),
        ("RTX 4090 / L40S / L4 (8.9)", 8, 99, 8),
        ("H100", 9, 227, 9),
        ("B200", 10, 227, 9),
        ("RTX 5090 (12.0)", 12, 99, 8),
        ("a capability-9+ GPU with less shared memory than Hopper", 9, 226, 8),
    ],
)
def test_config_tables_by_shared_memory(gpu, major, max_shared_kib, expected):
    """Hopper's tables (up to 150 KiB of shared memory a build) only where they fit."""
    assert triton_path.config_arch(major, max_shared_kib * 1024) == expected, gpu


@pytest.fixture(scope="module")
def candidate_builds():
    """Every config the tuner may measure (``tune.candidates``), built for sm_80 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.inspect", "--json", "--candidates"]
    cmd += ["--arch", "sm_80", "--arch", "sm_90", "--dtype", "bfloat16", "--rank", "16"]
    cmd += ["--dropout", "0", "--dropout", "0.1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_candidates_build_without_spills_on_tensor_cores(candidate_builds):
    from lora_kernels import tune

    rows = candidate_builds
    for arch in ("sm_80", "sm_90"):
        for p in (0.0, 0.1):
            names = {r["candidate"] for r in rows if r["arch"] == arch and r["dropout"] == p}
            plan = table_plan(arch, torch.bfloat16, 16, p)
            assert names == {n for n, _ in tune.candidates(plan, p > 0)}
    bad = [
        (r["kernel"], r["candidate"], r["arch"], r["dropout"], r["spills"], r["mma"])
        for r in rows
        if r["spills"] or not r["mma"] or r["shared_bytes"] > r["shared_limit"]
    ]
    assert not bad


def test_hopper_builds_load_through_tma(built):
    """Hopper's tables take the descriptor kernels: every such sm_90 build has TMA loads and
    wgmma; the pointer kernels (dx with dropout, and every other GPU) none."""
    group, rows, _ = built
    for r in rows:
        if r["arch"] == "sm_90" and r["descriptors"]:
            assert r["tma"] > 0 and r["mma_ops"].get("HGMMA", 0) > 0, r
        if not r["descriptors"]:
            assert r["tma"] == 0, r
    on_tma = {(r["kernel"], r["dropout"]) for r in rows if r["descriptors"]}
    if common.TensorDescriptor is None:  # Triton 3.2 and 3.3 (make compat)
        assert not on_tma
    elif "sm_90" in group["archs"]:
        assert ("lora_bwd_dx", 0.1) not in on_tma
        assert {("lora_fwd", 0.0), ("lora_bwd_dx", 0.0), ("lora_fwd_t", 0.1)} <= on_tma


def build_base(base: str, *args) -> list[dict]:
    """``inspect --base BASE`` rows for the architectures, dtypes, ranks and dropouts given
    (``nf4``: the 4-bit base's launches; ``dora``: DoRA's, dropout 0)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.inspect", "--json", "--base", base, "--jobs", "2"]
    out = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def check_4bit_rows(rows, groups) -> None:
    """Each group's two launches reading the 4-bit W in their K loop build on the target's
    tensor cores within its shared memory; the dequantization kernel (the buffer strategy) once
    per arch and dtype, without shared memory, one program per 1024 elements."""
    fused = sorted((r["kernel"], r["arch"], r["dtype"], r["rank"], r["dropout"]) for r in rows
                   if r["kernel"] != "dequant_4bit")  # fmt: skip
    assert fused == sorted((kernel, *g) for kernel in ("lora_bwd_dx", "lora_fwd") for g in groups)
    dequant = sorted((r["arch"], r["dtype"]) for r in rows if r["kernel"] == "dequant_4bit")
    assert dequant == sorted({g[:2] for g in groups})
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"], row
        if row["kernel"] == "dequant_4bit":
            assert row["shared_bytes"] == 0 and row["grid"] == [4096 * 4096 // 1024], row
        else:
            assert row["mma_ops"].get(ARCHS[row["arch"]].mma, 0) > 0, row


def test_4bit_builds():
    """A 4-bit base's kernels (docs/qlora.md) build for Ampere and Hopper: with every Triton
    ``make compat`` runs, at one rank; the dequantization kernel without spills."""
    rows = build_base("nf4", "--arch", "sm_80", "--arch", "sm_90", "--dtype", "bfloat16",
                      "--rank", "16", "--dropout", "0")  # fmt: skip
    check_4bit_rows(rows, [(arch, "bfloat16", 16, 0.0) for arch in ("sm_80", "sm_90")])
    assert all(r["spills"] == 0 for r in rows if r["kernel"] == "dequant_4bit")


def test_no_spills_4bit():
    """With the pinned Triton: the launches reading a 4-bit W in their K loop at ranks 16 and
    64, dropout 0 and 0.1, spill nothing on Ampere and Hopper (their tables, CONFIGS_4BIT)."""
    archs, ranks, dropouts = ("sm_80", "sm_90"), (16, 64), (0.0, 0.1)
    groups = [(a, "bfloat16", r, p) for a in archs for r in ranks for p in dropouts]
    args = ["--dtype", "bfloat16", "--arch", "sm_80", "--arch", "sm_90", "--rank", "16", "--rank",
            "64", "--dropout", "0", "--dropout", "0.1"]  # fmt: skip
    rows = build_base("nf4", *args)
    check_4bit_rows(rows, groups)
    spilling = [(r["kernel"], r["arch"], r["rank"], r["dropout"], r["spills"]) for r in rows
                if r["spills"]]  # fmt: skip
    assert not spilling


def test_high_ranks_builds_over_shared_memory_fail_and_run_on_the_torch_path():
    """Ranks 256 and 512 (bfloat16, sm_80 and sm_90) need more shared memory than the GPUs have:
    inspect reports them as failures, naming kernel, arch, rank and both sizes; the layer's
    ``backend="auto"`` never launches them (``validation.KERNEL_MAX_RANK``)."""
    from lora_kernels.validation import KERNEL_MAX_RANK

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.inspect", "--json", "--dtype", "bfloat16"]
    cmd += ["--arch", "sm_80", "--arch", "sm_90", "--rank", "256", "--rank", "512"]
    cmd += ["--dropout", "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stderr
    rows = json.loads(out.stdout)
    over = {(r["arch"], r["rank"]) for r in rows if r["shared_bytes"] > r["shared_limit"]}
    assert over == {("sm_80", 256), ("sm_80", 512), ("sm_90", 256), ("sm_90", 512)}
    assert "over the GPU's 232448" in out.stderr and "rank 512" in out.stderr
    assert KERNEL_MAX_RANK < 256


# Ampere's tables, Hopper's (descriptors), and Blackwell's 99 KiB one (a group of its own: Triton
# 3.2 has no Blackwell target, and `make compat` leaves "blackwell" out for it)
DORA_GROUPS = {"ampere_hopper": ("sm_80", "sm_90"), "blackwell": ("sm_120",)}


@pytest.mark.parametrize("group", sorted(DORA_GROUPS))
def test_dora_builds(group):
    """DoRA's changed launches (the column scale and z's store in the forward's epilogue, c on
    the dx pass's dY tiles, the magnitude's sum beside dB's; with dropout the T-only pass
    storing mask(x), and the forward's and dx's second base product on the same W tile) build
    for each table on tensor cores within shared memory, with every Triton ``make compat``
    runs; Hopper's on descriptors (rank 16) where the Triton has them (dx with dropout on
    pointers, as LoRA's)."""
    archs = DORA_GROUPS[group]
    args = ["--dtype", "bfloat16", "--rank", "16", "--dropout", "0", "--dropout", "0.1"]
    for arch in archs:
        args += ["--arch", arch]
    rows = build_base("dora", *args)
    got = sorted((r["kernel"], r["arch"], r["dropout"]) for r in rows)
    kernels = {(k, p) for k in ("lora_bwd_dB", "lora_bwd_dx", "lora_fwd") for p in (0.0, 0.1)}
    kernels.add(("lora_fwd_t", 0.1))
    assert got == sorted((k, a, p) for k, p in kernels for a in archs)
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"], row
        assert row["mma_ops"].get(ARCHS[row["arch"]].mma, 0) > 0, row
    if "sm_90" in archs:
        hopper = {(r["kernel"], r["dropout"]) for r in rows
                  if r["arch"] == "sm_90" and r["descriptors"]}  # fmt: skip
        # (Triton 3.2 and 3.3, in make compat, have no host descriptors: pointers everywhere;
        # the dx launch with dropout runs the pointer kernel, as LoRA's does)
        expected = kernels - {("lora_bwd_dx", 0.1)}
        assert hopper == (set() if common.TensorDescriptor is None else expected)


def test_no_spills_dora():
    """With the pinned Triton, DoRA's launches spill nothing on any arch, float16 and bfloat16,
    ranks 16 and 64, dropout 0 and 0.1 (Hopper's forward tile narrowed to 128:
    configs.DORA_MAX_BLOCK_N; with dropout the tiles of two base products to 64:
    configs.DORA_DROPOUT_MAX_BLOCK_N; dB with the magnitude's sum on 8 warps:
    configs.DORA_GRAD_MIN_WARPS)."""
    args = ["--dtype", "bfloat16", "--dtype", "float16", "--rank", "16", "--rank", "64"]
    rows = build_base("dora", *args, "--dropout", "0", "--dropout", "0.1")
    assert len(rows) == (3 + 4) * len(ARCHS) * 2 * 2  # (with dropout, the T-only pass too)
    spilling = [(r["kernel"], r["arch"], r["dtype"], r["rank"], r["spills"]) for r in rows
                if r["spills"]]  # fmt: skip
    assert not spilling
