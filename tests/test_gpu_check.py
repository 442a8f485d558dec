"""``python -m lora_kernels.gpu_check``: the dry run, the refusal without a GPU, and every stage
run for real on tiny shapes (the kernels in Triton's interpreter here, standing in for the GPU),
so the one command a lent GPU runs has run before it gets there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import KERNEL_DEVICE

from lora_kernels import gpu_check, tune, validation

DEVICE = torch.device(KERNEL_DEVICE)


def run_module(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "lora_kernels.gpu_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dry_run_prints_the_stages_and_exits_0(tmp_path):
    out = run_module("--out", str(tmp_path / "x"), "--dry-run")
    assert out.returncode == 0, out.stderr
    for stage in gpu_check.STAGES:
        assert stage.name in out.stdout
    assert "does not exist yet" not in out.stdout  # the model benchmark is there: it runs
    assert "of a 480 s budget" in out.stdout
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_it_exits_2(tmp_path):
    out = run_module("--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr


TINY_STAGES = [
    gpu_check.Stage(
        "correctness",
        1,
        lambda device, out: gpu_check.stage_correctness(
            device,
            shapes=[((5,), 24, 40), ((2, 3), 33, 17)],
            ranks=(8,),
            dropouts=(0.0, 0.1),
            precisions=[gpu_check.PRECISIONS[0], gpu_check.PRECISIONS[2]],
            four_bit_shapes=[((3,), 24, 40)],
        ),
    ),
    gpu_check.Stage(
        "target", 1, lambda device, out: gpu_check.stage_target(device, (16, 32, 48, 4))
    ),
    gpu_check.Stage(
        "dora",
        1,
        lambda device, out: gpu_check.stage_dora(
            device,
            (16, 32, 48, 4),
            check_shapes=[((5,), 24, 40), ((2, 3), 33, 17)],
            ranks=(8,),
            precisions=[gpu_check.PRECISIONS[0], gpu_check.PRECISIONS[2]],
        ),
    ),
    gpu_check.Stage(
        "qlora",
        1,
        lambda device, out: gpu_check.stage_qlora(device, (32, 48, 4), (3, 600), tuned_tokens=(3,)),
    ),
    gpu_check.Stage(
        "tuner", 1, lambda device, out: gpu_check.stage_tuner(device, [(8, 32, 16, 4)])
    ),
    gpu_check.Stage("model", 1, gpu_check.stage_model, lambda: "not in this test"),
]


def test_the_model_stage_is_cut_at_its_time_cap(tmp_path):
    """A model benchmark running past its cap is stopped, and the stage says so (the JSON it
    rewrote after each finished configuration stays in the folder)."""
    result = gpu_check.stage_model(DEVICE, tmp_path, time_cap_s=1)
    assert result["timed_out_after_s"] == 1 and "--preset" in result["command"]


def test_every_stage_runs_and_writes_its_json(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "AUTO_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv(tune.ENV_CACHE, str(tmp_path / "user-cache.json"))  # put back afterwards
    summary = gpu_check.run(tmp_path / "out", 600, DEVICE, TINY_STAGES, log=lambda *_: None)
    tune.reset()
    status = {name: s["status"] for name, s in summary["stages"].items()}
    assert status == {
        "correctness": "done", "target": "done", "dora": "done", "qlora": "done", "tuner": "done",
        "model": "skipped",
    }  # fmt: skip
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {
        "summary.json", "correctness.json", "target.json", "dora.json", "qlora.json",
        "tuner.json", "tune.json",
    }  # fmt: skip
    assert not (tmp_path / "user-cache.json").exists()  # the run's decisions stay in its folder
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["stages"] == summary["stages"] and on_disk["torch"] == torch.__version__

    correctness = json.loads((tmp_path / "out" / "correctness.json").read_text())
    # 8 cases over 16-bit bases, 4 over a 4-bit one (bfloat16 only: 4-bit bases compute in 16
    # bits; each dropout with each strategy)
    assert correctness["failed"] == 0 and correctness["passed"] == 12
    for case in correctness["cases"]:
        assert case["deterministic"] and case["worst"] <= case["tolerance"]
        grads = {"dx", "dbias", "dlora_A", "dlora_B"} | (
            {"dweight"} if case["base"] == "16bit" else set()
        )
        assert set(case["errors"]) == {"y"} | grads
    four_bit = [c for c in correctness["cases"] if c["base"] == "nf4"]
    assert all(c["dequant_bitwise"] for c in four_bit)
    assert sorted(c["strategy"] for c in four_bit) == ["buffer", "buffer", "in_loop", "in_loop"]

    qlora = json.loads((tmp_path / "out" / "qlora.json").read_text())
    assert [row["M"] for row in qlora["rows"]] == [3, 600]  # either side of the threshold
    assert [row["chosen"] for row in qlora["rows"]] == ["in_loop", "buffer"]
    assert qlora["in_loop_max_m"] == 512
    for row in qlora["rows"]:
        assert set(row["ms"]) == {"in_loop", "buffer", "16bit_fused", "16bit_linear"}
        assert all(ms > 0 for ms in row["ms"].values())
    (tuned,) = qlora["tuned"]
    assert tuned["key"].endswith("|nf4") and tuned["strategy"] in ("in_loop", "buffer")

    target = json.loads((tmp_path / "out" / "target.json").read_text())
    assert set(target["providers"]) >= {"fused_tables", "tuned", "torch_path", "linear", "peft"}
    assert set(target["ratios"]) >= {"tuned_vs_linear", "tuned_vs_torch", "peft_vs_tuned"}
    assert target["decision"]["provider"] in ("triton", "torch")
    assert target["fused_kernels_ms"]["tables"] > 0 and target["fused_kernels_ms"]["pointer"] > 0
    assert target["fused_kernels_ms"]["uses_descriptors"]  # the interpreter runs Hopper's tables
    assert "descriptors_vs_pointer" in target["ratios"]

    dora = json.loads((tmp_path / "out" / "dora.json").read_text())
    # bf16 and fp32, dropout 0 and 0.1, two shapes, one rank; bf16's first shape over NF4 too
    assert dora["failed"] == 0 and dora["passed"] == 10, dora["cases"]
    assert sum(case["base"] == "nf4" for case in dora["cases"]) == 2
    for case in dora["cases"]:
        assert set(case["errors"]) == {"y", "dx", "dlora_A", "dlora_B", "dmagnitude"}
    for p in ("0.0", "0.1"):
        row = dora["timings"][p]
        assert set(row["providers"]) == {
            "lora_kernels_dora", "lora_kernels_lora", "linear", "peft_dora", "peft_lora"
        }  # fmt: skip
        assert set(row["ratios"]) == {"dora_vs_lora", "dora_vs_linear", "dora_vs_peft_dora"}

    tuner = json.loads((tmp_path / "out" / "tuner.json").read_text())
    (only,) = tuner["keys"]
    assert only["shape"] == [8, 32, 16, 4] and only["candidates"]


def test_a_failing_case_is_recorded_not_fatal(monkeypatch):
    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(gpu_check, "check_case", broken)
    result = gpu_check.stage_correctness(
        DEVICE,
        shapes=[((2,), 16, 16)],
        ranks=(8,),
        dropouts=(0.0,),
        precisions=gpu_check.PRECISIONS[:1],
        four_bit_shapes=[],
    )
    assert result["failed"] == 1 and "launch failed" in result["cases"][0]["error"]


def test_stages_past_the_budget_are_skipped_with_a_note(tmp_path):
    ran = []
    stages = [
        gpu_check.Stage("a", 10, lambda device, out: ran.append("a") or {}),
        gpu_check.Stage("b", 1000, lambda device, out: ran.append("b") or {}),
        gpu_check.Stage("c", 1, lambda device, out: 1 / 0),
    ]
    summary = gpu_check.run(tmp_path, 100, DEVICE, stages, log=lambda *_: None)
    tune.reset()
    assert ran == ["a"]
    assert summary["stages"]["b"]["status"] == "skipped"
    assert "would pass the budget" in summary["stages"]["b"]["note"]
    assert summary["stages"]["c"]["status"] == "error"  # recorded; the run goes on
    assert "ZeroDivisionError" in summary["stages"]["c"]["error"]


def test_correctness_cases_in_worker_processes_and_the_time_cap():
    kwargs = {
        "shapes": [((5,), 24, 40), ((1,), 16, 16)],
        "ranks": (8,),
        "dropouts": (0.0, 0.1),
        "precisions": gpu_check.PRECISIONS[:1],
        "four_bit_shapes": [],
    }
    pooled = gpu_check.stage_correctness(DEVICE, jobs=2, **kwargs)  # spawned, as on the GPU
    alone = gpu_check.stage_correctness(DEVICE, **kwargs)
    assert pooled["failed"] == 0 and pooled["passed"] == 4 and not pooled["not_run"]
    assert [c["shape"] for c in pooled["cases"]] == [c["shape"] for c in alone["cases"]]
    assert [c["errors"] for c in pooled["cases"]] == [c["errors"] for c in alone["cases"]]
    capped = gpu_check.stage_correctness(DEVICE, time_cap_s=0, **kwargs)
    assert capped["cases"] == [] and len(capped["not_run"]) == 4
