"""``python -m lora_kernels.inspect``: real GPU builds of every kernel, checked without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    dump = tmp_path_factory.mktemp("cubins")
    # The interpreter replaces the kernels with Python: compiling needs it off.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.inspect", "--json", "--dump", str(dump)]
    cmd += ["--arch", "sm_80", "--arch", "sm_90", "--dtype", "bfloat16", "--rank", "16"]
    cmd += ["--rank", "64", "--dropout", "0", "--dropout", "0.1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), dump


def test_every_launched_kernel_is_built(rows):
    rows, dump = rows
    kernels = ["lora_fwd", "lora_bwd_dx", "lora_bwd_dA", "lora_bwd_dB"]
    expected = [(p, k) for p in (0.0, 0.1) for k in kernels] + [(0.1, "lora_fwd_t")]
    built = sorted((r["arch"], r["rank"], r["dropout"], r["kernel"]) for r in rows)
    assert built == sorted(
        (a, r, p, k) for a in ("sm_80", "sm_90") for r in (16, 64) for p, k in expected
    )
    for row in rows:
        assert set(row) >= {"kernel", "arch", "dtype", "rank", "registers", "spills"}
        assert set(row) >= {"shared_bytes", "mma", "cubin"}
        assert (dump / row["cubin"]).stat().st_size > 0
        assert row["shared_bytes"] > 0 and 0 < row["registers"] <= 255
    assert all("fwd" in r["kernel"] for r in rows if r["kernel"].startswith("lora_fwd"))


def test_no_spills(rows):
    rows, _ = rows
    spilling = [(r["kernel"], r["arch"], r["rank"], r["spills"]) for r in rows if r["spills"]]
    assert not spilling


def test_tensor_cores(rows):
    rows, _ = rows
    for r in rows:
        if r["kernel"] in ("lora_fwd", "lora_fwd_t", "lora_bwd_dx"):
            assert r["mma"] > 0, r
            if r["arch"] == "sm_90":
                assert r["mma_ops"].get("HGMMA", 0) > 0, r  # wgmma, Hopper's tensor cores
            else:
                assert r["mma_ops"].get("HMMA", 0) > 0, r
