"""Benchmark one LoRA layer: lora_kernels against the reference, peft and a frozen nn.Linear.

    python benchmarks/bench_fused.py            # measure this device, print, write results/
    python benchmarks/bench_fused.py --predict  # the roofline table for A100 / H100 only
    python benchmarks/bench_fused.py --quick    # tiny shapes, a few repetitions (CI smoke run)
    python benchmarks/bench_fused.py --shape 8192x4096x4096x16 --dtype bfloat16   # chosen rows
    python benchmarks/bench_fused.py --base nf4  # over a bitsandbytes NF4 base (QLoRA), vs peft
    python benchmarks/bench_fused.py --dora      # DoRA: ours and peft's use_dora=True, same weights
    pytest benchmarks/bench_fused.py            # the CPU small shape under pytest-benchmark

Providers share the same weights and inputs: ``lora_kernels`` (``LoRALayer``: Triton kernels on
CUDA, the torch path on CPU), ``reference`` (the seeds' plain PyTorch formula, with
``F.dropout`` on the LoRA branch), ``peft`` (peft's LoRA ``Linear``, when installed) and
``linear`` (the frozen ``nn.Linear`` alone, the floor). With ``--dora`` the LoRA providers are
DoRA layers (``use_dora=True``, peft's magnitudes copied into ours), beside ``lora_kernels_lora``
and ``peft_lora``, the same adapters without DoRA. Modes: forward (autograd recording),
backward, forward+backward; x requires grad, the base weight is frozen; LoRA dropout 0 and 0.1.

Timing: on CUDA, ``triton.testing.do_bench`` (median of CUDA-event timings after warm-up); on
CPU, the providers are interleaved repetition by repetition (order rotating) and each takes its
median, so the machine's drift hits them alike. Compare ratios from one run, not absolute times.
The results JSON is rewritten after every configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # saved_memory, as a script
from saved_memory import saved_bytes  # noqa: E402

from lora_kernels import LoRALayer, roofline  # noqa: E402
from lora_kernels.timing import machine_facts, write_json  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
DROPOUTS = (0.0, 0.1)
# (M tokens, K in, N out, rank)
GPU_SHAPES = [
    (m, k, n, r)
    for m in (2048, 8192)
    for k, n in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
    for r in (8, 16, 64)
]
GPU_DTYPES = (torch.bfloat16, torch.float16)
CPU_SHAPES = [(4096, 1024, 1024, 16), (512, 256, 256, 8)]
QUICK_SHAPES = [(64, 32, 48, 4)]
BENCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The targets, printed beside the measurements (fwd+bwd time ratios).
CPU_TARGETS = {
    ("peft", 0.0): 0.85,
    ("peft", 0.1): 0.85,
    ("linear", 0.0): 1.15,
    ("linear", 0.1): 1.4,
}
# Issue 26's DoRA targets (fwd+bwd, CPU fp32 at the run's largest shape): ours / peft's DoRA at
# dropout 0 and 0.1, ours DoRA / ours LoRA at dropout 0.
DORA_TARGETS = {("peft", 0.0): 0.85, ("peft", 0.1): 0.85, ("lora_kernels_lora", 0.0): 1.15}
# The design's GPU target (roofline.TARGETS): fwd+bwd at the target shape, bf16.
GPU_TARGET = {
    "shape": roofline.TARGET_SHAPE,
    "vs_linear": roofline.TARGETS["tuned_vs_linear"],
    "vs_peft": 1 / roofline.TARGETS["peft_vs_tuned"],
}


class ReferenceLoRA(nn.Module):
    """The seeds' formula in plain PyTorch (``lora_linear_reference``), with ``F.dropout``."""

    def __init__(self, base: nn.Linear, lora_A, lora_B, scaling: float, dropout: float):
        super().__init__()
        self.base, self.scaling, self.dropout = base, scaling, dropout
        self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)

    def forward(self, x):
        x_lora = F.dropout(x, self.dropout, training=True) if self.dropout else x
        return self.base(x) + self.scaling * (x_lora @ self.lora_A @ self.lora_B)


BASES = ("16bit", "nf4")
# Token counts of the NF4 predictions: below both GPUs' in-loop thresholds, between them (A100:
# 271, H100: 512), and training-sized (docs/qlora.md).
NF4_TOKENS = (256, 512, 8192)


def quantized_base(linear: nn.Linear, dtype, device) -> nn.Module:
    """``linear`` as bitsandbytes' NF4 ``Linear4bit`` (double quantization, bitsandbytes'
    defaults), computing in ``dtype``: the QLoRA base."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, compute_dtype=dtype, quant_type="nf4"
    )
    layer.load_state_dict({k: v.float() for k, v in linear.state_dict().items()})
    return layer.to(device).requires_grad_(False)  # bitsandbytes quantizes on the move


def build_providers(
    shape, dtype, device, dropout, base_kind="16bit", dora=False
) -> dict[str, nn.Module]:
    """Every provider over the same frozen weight and the same (non-zero) LoRA factors; with
    ``base_kind="nf4"`` the frozen weight is a bitsandbytes NF4 ``Linear4bit`` for all of them
    (``linear`` is bitsandbytes' layer alone, ``peft`` peft's QLoRA layer over it). ``dora``:
    ``lora_kernels`` and ``peft`` are DoRA layers (``dora_providers``)."""
    if dora:
        return dora_providers(shape, dtype, device, dropout, base_kind)
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    if base_kind == "nf4":
        base = quantized_base(base, dtype, device)
    lora_A = (torch.randn(k, r, generator=gen) / math.sqrt(k)).to(device, dtype)
    lora_B = (torch.randn(r, n, generator=gen) / math.sqrt(r)).to(device, dtype)
    alpha = 2 * r
    ours = LoRALayer.from_linear(
        copy.deepcopy(base), rank=r, alpha=alpha, dropout=dropout, adapter_dtype=dtype
    )
    with torch.no_grad():
        ours.lora_A.copy_(lora_A)
        ours.lora_B.copy_(lora_B)
    providers = {
        "lora_kernels": ours,
        "reference": ReferenceLoRA(
            copy.deepcopy(base), lora_A.clone(), lora_B.clone(), alpha / r, dropout
        ),
        "linear": base,
    }
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return providers
    model = nn.Sequential()
    model.add_module("proj", copy.deepcopy(base))
    model.is_loaded_in_4bit = base_kind == "nf4"  # as transformers marks it: peft's bnb layer
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A.t())
        layer.lora_B["default"].weight.copy_(lora_B.t())
    if base_kind == "nf4":  # the adapters only: a 4-bit weight is not cast
        layer.lora_A.to(device, dtype)
        layer.lora_B.to(device, dtype)
        providers["peft"] = peft_model
    else:
        providers["peft"] = peft_model.to(device, dtype)
    return providers


def dora_providers(shape, dtype, device, dropout, base_kind="16bit") -> dict[str, nn.Module]:
    """DoRA: ``lora_kernels`` (``LoRALayer(use_dora=True)``) and ``peft`` (``use_dora=True``)
    with the same adapters and magnitudes, the same LoRA layers without DoRA
    (``lora_kernels_lora``, ``peft_lora``), and the frozen ``linear``; over an NF4 base
    (``base_kind="nf4"``) QDoRA, ours and peft's."""
    lora = build_providers(shape, dtype, device, dropout, base_kind)
    base, ours_lora = lora["linear"], lora["lora_kernels"]
    r = shape[3]
    ours = LoRALayer.from_linear(
        copy.deepcopy(base), rank=r, alpha=2 * r, dropout=dropout, adapter_dtype=dtype,
        use_dora=True,
    )  # fmt: skip
    with torch.no_grad():
        ours.lora_A.copy_(ours_lora.lora_A)
        ours.lora_B.copy_(ours_lora.lora_B)
    providers = {"lora_kernels": ours, "lora_kernels_lora": ours_lora}
    if "peft" in lora:
        from peft import LoraConfig, get_peft_model

        model = nn.Sequential()
        model.add_module("proj", copy.deepcopy(base))
        model.is_loaded_in_4bit = base_kind == "nf4"  # as transformers marks it: peft's bnb layer
        config = LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], use_dora=True
        )
        peft_model = get_peft_model(model, config)
        layer = peft_model.base_model.model.proj
        if base_kind == "nf4":  # the adapters only: a 4-bit weight is not cast
            for module in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                module.to(device, dtype)
        else:
            peft_model.to(device, dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A.t())
            layer.lora_B["default"].weight.copy_(ours.lora_B.t())
            ours.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
        providers.update(peft=peft_model, peft_lora=lora["peft"])
    providers["linear"] = base
    return providers


def _zero_grads(module, x):
    x.grad = None
    for p in module.parameters():
        p.grad = None


def time_cpu(providers, mode, x, dy, reps, warmup) -> dict[str, float]:
    """Median seconds per call, providers interleaved and their order rotated every rep."""
    names = list(providers)
    samples = {name: [] for name in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            module = providers[name]
            if mode == "bwd":
                y = module(x)
            start = time.perf_counter()
            if mode == "fwd":
                module(x)
            elif mode == "bwd":
                y.backward(dy)
            else:
                module(x).backward(dy)
            elapsed = time.perf_counter() - start
            _zero_grads(module, x)
            if rep >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(v) for name, v in samples.items()}


def _cuda_step(module, mode, xs, dy):
    """The callable ``do_bench`` times: one call of ``mode``, cycling through the inputs."""
    calls = iter(range(10**12))
    if mode == "bwd":
        y = module(xs[0])
        return lambda: y.backward(dy, retain_graph=True)
    if mode == "fwd":
        return lambda: module(xs[next(calls) % len(xs)])
    return lambda: module(xs[next(calls) % len(xs)]).backward(dy)


def time_cuda(providers, mode, xs, dy, reps) -> dict[str, float]:
    """Median seconds per call (CUDA events, ``triton.testing.do_bench``), inputs rotating."""
    from triton.testing import do_bench

    out = {}
    for name, module in providers.items():
        params = [p for p in module.parameters() if p.requires_grad]
        step = _cuda_step(module, mode, xs, dy)
        ms = do_bench(step, rep=reps, grad_to_none=[*xs, *params], return_mode="median")
        out[name] = ms * 1e-3
    return out


def run_config(
    shape, dtype, device, dropout, reps, warmup, base_kind="16bit", dora=False
) -> list[dict]:
    m, k, n, r = shape
    providers = build_providers(shape, dtype, device, dropout, base_kind, dora)
    gen = torch.Generator().manual_seed(1)
    xs = [
        torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_(True)
        for _ in range(3 if device.type == "cuda" else 1)
    ]
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    roof = roofline.Shape(m, k, n, r, elem=torch.finfo(dtype).bits // 8, dropout=dropout)
    x_bytes = m * k * xs[0].element_size()
    s_bytes = m * r * xs[0].element_size()

    memory = {}
    for name, module in providers.items():
        saved = saved_bytes(lambda module=module: module(xs[0]), list(module.parameters()))
        memory[name] = {"saved_bytes": saved["activations"]}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            module(xs[0]).backward(dy)
            torch.cuda.synchronize()
            memory[name]["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - before
            _zero_grads(module, xs[0])

    rows = []
    for mode in MODES:
        if device.type == "cuda":
            times = time_cuda(providers, mode, xs, dy, reps)
        else:
            times = time_cpu(providers, mode, xs[0], dy, reps, warmup)
        for name, seconds in times.items():
            # FLOPs: the math each provider must do (LoRA providers all count the unfused LoRA
            # math, peft's op list); bytes: the provider's own minimal DRAM traffic model.
            flops_of = "linear" if name == "linear" else "peft"
            model = {"lora_kernels": "lora_kernels", "linear": "linear"}.get(name, "peft")
            if device.type != "cuda" and name == "lora_kernels":
                model = "peft"  # the CPU torch path runs the unfused op sequence too
            flops = sum(f for _, f, _ in roofline.kernels(flops_of, roof, mode))
            nbytes = sum(b for _, _, b in roofline.kernels(model, roof, mode))
            if dora:  # (the roofline models LoRA's work only)
                flops = nbytes = None
            rows.append(
                {
                    "M": m,
                    "K": k,
                    "N": n,
                    "r": r,
                    "dtype": str(dtype).replace("torch.", ""),
                    "base": base_kind,
                    "dora": dora,
                    "dropout": dropout,
                    "mode": mode,
                    "provider": name,
                    "median_ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12 if flops is not None else None,
                    # the roofline's byte model is for 16-bit and fp32 weights only
                    "gbps": nbytes / seconds / 1e9
                    if base_kind == "16bit" and nbytes is not None
                    else None,
                    "vs_linear": seconds / times["linear"],
                    "vs_peft": seconds / times["peft"] if "peft" in times else None,
                    "saved_bytes": memory[name]["saved_bytes"],
                    "saved_beyond_x": memory[name]["saved_bytes"] - x_bytes,
                    "S_bytes": s_bytes,
                    "peak_cuda_bytes": memory[name].get("peak_cuda_bytes"),
                }
            )
    return rows


def format_rows(rows) -> str:
    head = f"{'M':>5} {'K':>5} {'N':>5} {'r':>3} {'dtype':8} {'drop':>4} {'mode':8} "
    head += f"{'provider':17} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'vs linear':>9} "
    head += f"{'vs peft':>8} {'saved MiB':>9} {'beyond x':>9}"
    lines = [head]
    for r in rows:
        vs_peft = f"{r['vs_peft']:7.2f}x" if r["vs_peft"] is not None else f"{'-':>8}"
        gbps = f"{r['gbps']:7.1f}" if r.get("gbps") is not None else f"{'-':>7}"
        tflops = f"{r['tflops']:8.3f}" if r.get("tflops") is not None else f"{'-':>8}"
        dtype = r["dtype"] if r.get("base", "16bit") == "16bit" else f"{r['base']}/{r['dtype']}"
        lines.append(
            f"{r['M']:5d} {r['K']:5d} {r['N']:5d} {r['r']:3d} {dtype:8} {r['dropout']:4.1f} "
            f"{r['mode']:8} {r['provider']:17} {r['median_ms']:9.3f} {tflops} "
            f"{gbps} {r['vs_linear']:8.2f}x {vs_peft} "
            f"{r['saved_bytes'] / 2**20:9.2f} {r['saved_beyond_x'] / 2**20:9.2f}"
        )
    return "\n".join(lines)


def check_targets(rows, device, device_name: str = "") -> list[str]:
    """The issue's targets beside what this run measured: on CPU at the run's largest shape, on
    GPU at the target shape in bf16 (when the run includes it); memory on every row."""
    lines = []
    ours = [r for r in rows if r["provider"] == "lora_kernels" and r["mode"] == "fwd+bwd"]
    if any(r.get("dora") for r in ours):  # (DoRA's targets, per base: QDoRA's too)
        for base in sorted({r.get("base", "16bit") for r in ours}):
            on_base = [r for r in rows if r.get("base", "16bit") == base]
            lines += dora_targets(on_base, [r for r in ours if r in on_base], base)
        return lines
    ours = [r for r in ours if r.get("base", "16bit") == "16bit"]  # the targets' base
    if not ours:
        return lines
    if device.type == "cpu":
        biggest = max((r["M"] * r["K"] * r["N"], r["M"]) for r in ours)[1]
        for (other, p), bound in CPU_TARGETS.items():
            for r in ours:
                if r["M"] != biggest or r["dropout"] != p:
                    continue
                ratio = r["vs_peft"] if other == "peft" else r["vs_linear"]
                if ratio is None:
                    lines.append(f"target vs {other} at dropout {p}: <= {bound}x: peft missing")
                    continue
                verdict = "met" if ratio <= bound else "MISSED"
                lines.append(
                    f"target: fwd+bwd lora_kernels / {other} at dropout {p} <= {bound}x "
                    f"(M={r['M']}): measured {ratio:.2f}x, {verdict}"
                )
    else:  # the GPU target is stated for H100, bf16, one shape: printed for any GPU that ran it
        for r in ours:
            if (r["M"], r["K"], r["N"], r["r"]) != GPU_TARGET["shape"] or r["dtype"] != "bfloat16":
                continue
            faster = 1 / r["vs_peft"] if r["vs_peft"] else None
            met_linear = "met" if r["vs_linear"] <= GPU_TARGET["vs_linear"] else "MISSED"
            met_peft = "met" if faster and r["vs_peft"] <= GPU_TARGET["vs_peft"] else "MISSED"
            lines.append(
                f"target (stated for H100; this GPU: {device_name or 'unknown'}), bf16, dropout "
                f"{r['dropout']}: fwd+bwd <= {GPU_TARGET['vs_linear']}x linear: measured "
                f"{r['vs_linear']:.2f}x, {met_linear}; >= 1.4x faster than peft: measured "
                + (f"{faster:.2f}x, {met_peft}" if faster else "peft missing")
            )
    for r in ours:
        verdict = "met" if r["saved_beyond_x"] <= r["S_bytes"] else "MISSED"
        lines.append(
            f"target: saved beyond x <= S ({r['S_bytes']} B) at M={r['M']} dropout {r['dropout']}:"
            f" {r['saved_beyond_x']} B, {verdict}"
        )
    return lines


def dora_targets(rows, ours, base: str = "16bit") -> list[str]:
    """Issue 26's DoRA targets beside this run's fwd+bwd ratios at its largest shape, and the
    bytes each DoRA layer saves for backward; ``rows`` and ``ours`` are one ``base``'s."""
    lines = []
    over = "" if base == "16bit" else f", {base} base"
    biggest = max((r["M"] * r["K"] * r["N"], r["M"]) for r in ours)[1]
    times = {
        (r["provider"], r["dropout"]): r["median_ms"]
        for r in rows
        if r["M"] == biggest and r["mode"] == "fwd+bwd"
    }
    for (other, p), bound in DORA_TARGETS.items():
        if (other, p) not in times:
            lines.append(f"DoRA target vs {other} at dropout {p}: <= {bound}x: {other} missing")
            continue
        ratio = times[("lora_kernels", p)] / times[(other, p)]
        verdict = "met" if ratio <= bound else "MISSED"
        lines.append(
            f"DoRA target: fwd+bwd lora_kernels DoRA / {other} at dropout {p} <= {bound}x "
            f"(M={biggest}{over}): measured {ratio:.2f}x, {verdict}"
        )
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["provider"] in ("lora_kernels", "peft"):
            lines.append(
                f"saved for backward, {r['provider']} DoRA{over}, M={r['M']} dropout "
                f"{r['dropout']}: "
                f"{r['saved_bytes']} B ({r['saved_beyond_x']} B beyond x)"
            )
    return lines


def predictions() -> str:
    m, k, n, r = GPU_TARGET["shape"]
    shapes = [roofline.Shape(m, k, n, r, dropout=p) for p in DROPOUTS]
    rows = roofline.table(shapes, modes=("fwd+bwd",))
    out = ["PREDICTION (roofline model, not a measurement): bf16, H100 and A100"]
    out.append(roofline.format_rows(rows))
    for row in rows:
        if row["gpu"] == "H100" and row["provider"] == "lora_kernels":
            out.append(
                f"target (H100, dropout {row['dropout']}): <= {GPU_TARGET['vs_linear']}x linear,"
                f" >= 1.4x faster than peft: predicted {row['vs_linear']:.2f}x linear, "
                f"{1 / row['vs_peft']:.2f}x faster than peft"
            )
    nf4 = [roofline.Shape(t, k, n, r, dropout=p, base="nf4") for t in NF4_TOKENS for p in DROPOUTS]
    out.append(
        "PREDICTION, over a bitsandbytes NF4 base (bitsandbytes and peft dequantize each use of W;"
        " ours decodes it in the K loop up to the roofline threshold, into a buffer above):"
    )
    out.append(roofline.format_rows(roofline.table(nf4, modes=("fwd+bwd",))))
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["mode"] == "fwd+bwd"]
    groups = sorted({(r["M"], r["K"], r["N"], r["r"], r["dtype"], r["dropout"]) for r in data})
    providers = [
        p
        for p in ("linear", "lora_kernels", "peft", "reference")
        if p in {r["provider"] for r in data}
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        values = []
        for g in groups:
            match = [
                r
                for r in data
                if r["provider"] == prov
                and (r["M"], r["K"], r["N"], r["r"], r["dtype"], r["dropout"]) == g
            ]
            values.append(match[0]["vs_linear"] if match else 0)
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=prov)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(
        [f"M{g[0]} K{g[1]} N{g[2]}\nr{g[3]} {g[4]} p={g[5]}" for g in groups], fontsize=8
    )
    ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    ax.set_title("LoRA layer, forward + backward (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"MxKxNxR"`` (tokens, in, out, rank), e.g. ``8192x4096x4096x16``, for ``--shape``."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: expected four positive integers MxKxNxR, e.g. 8192x4096x4096x16"
        )
    return tuple(int(p) for p in parts)


def parse_dtype(text: str) -> torch.dtype:
    """``bfloat16``, ``float16`` or ``float32`` (torch names) as a dtype, for ``--dtype``."""
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or dtype not in BENCH_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in BENCH_DTYPES)
        raise argparse.ArgumentTypeError(f"dtype {text!r}: expected one of {names}")
    return dtype


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", action="store_true", help="print the roofline table only")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        help="MxKxNxR to measure instead of the device's default set (repeatable)",
    )
    parser.add_argument(
        "--dtype",
        type=parse_dtype,
        action="append",
        help="bfloat16, float16 or float32 instead of the device's default (repeatable)",
    )
    parser.add_argument(
        "--base",
        choices=BASES,
        action="append",
        help="the frozen base: 16bit (nn.Linear, the default) or nf4 (bitsandbytes' Linear4bit, "
        "the QLoRA base; needs bitsandbytes); repeatable",
    )
    parser.add_argument(
        "--dora",
        action="store_true",
        help="DoRA layers (use_dora=True): ours and peft's, beside the same LoRA layers",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    parser.add_argument("--name", default=None, help="file stem of the JSON / PNG results")
    args = parser.parse_args(argv)
    if args.predict:
        print(predictions())
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        shapes, dtypes, reps, warmup = QUICK_SHAPES, (torch.float32,), args.reps or 3, 1
    elif device.type == "cuda":
        shapes, dtypes, reps, warmup = GPU_SHAPES, GPU_DTYPES, args.reps or 100, 0
    else:
        shapes, dtypes, reps, warmup = CPU_SHAPES, (torch.float32,), args.reps or 25, 3
    shapes, dtypes = args.shape or shapes, args.dtype or dtypes
    env = machine_facts(device)
    print(f"device: {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU threads), "
          f"torch {env['torch']}, triton {env['triton']}, peft {env['peft']}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"bench_{device.type}" + ("_dora" if args.dora else "")
    rows = []
    for base_kind in args.base or ("16bit",):
        for shape in shapes:
            for dtype in dtypes:
                for dropout in DROPOUTS:
                    rows += run_config(
                        shape, dtype, device, dropout, reps, warmup, base_kind, args.dora
                    )
                    write_json(args.out / f"{stem}.json", {"environment": env, "rows": rows})
    print(format_rows(rows))
    print("\n".join(check_targets(rows, device, env["device_name"])))
    print()
    print(predictions())

    plot(rows, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


# --- pytest-benchmark: `pytest benchmarks/bench_fused.py` (small CPU shape, fwd+bwd) ---------

try:
    import pytest
except ImportError:  # running as a script without pytest installed
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("dropout", DROPOUTS)
    @pytest.mark.parametrize("provider", ["lora_kernels", "reference", "peft", "linear"])
    def test_fwd_bwd(benchmark, provider, dropout):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape = CPU_SHAPES[-1]
        providers = build_providers(shape, torch.float32, device, dropout)
        if provider not in providers:
            pytest.skip(f"{provider} is not installed")
        module = providers[provider]
        x = torch.randn(shape[0], shape[1], device=device, requires_grad=True)
        dy = torch.randn(shape[0], shape[2], device=device)
        benchmark.extra_info.update(machine_facts(device))

        def step():
            module(x).backward(dy)
            _zero_grads(module, x)

        benchmark(step)


if __name__ == "__main__":
    sys.exit(main())
