"""Everything a lent GPU should measure, in one command.

    python -m lora_kernels.gpu_check --out DIR [--budget-s 480] [--dry-run]
    make gpu-check OUT=DIR

Stages, in order; each writes ``DIR/<stage>.json`` as it finishes, and ``DIR/summary.json``
(device, versions, every stage's status and seconds) is rewritten after each one, so a run cut
short keeps what it measured. A stage whose estimated cost would take the run past
``--budget-s`` is skipped with a note.

1. ``correctness``: every launch the layer makes, against the float64 reference, output and
   every gradient, over bfloat16, float16 and float32 with TF32 off and on, dropout 0 and 0.1,
   ranks 8, 16 and 64, and six shapes (odd ones included); two backward runs must be bitwise
   identical. Then over a synthetic NF4 base (``CHECK_4BIT_SHAPES``, 16-bit precisions): our
   dequantization kernel bit-equal to the torch path's, the layer against the reference.
2. ``target``: M=8192, K=N=4096, r=16, bfloat16, forward + backward: the fused kernels on the
   tables, the tuned layer, the torch path, peft and the frozen ``nn.Linear``; times, ratios,
   peak memory, and the targets beside them; and the fused kernels alone on the tables' plan
   (TMA descriptors on Hopper) against the same tiles on the pointer kernels.
3. ``dora``: DoRA (issue 26). Correctness: ``dora_linear`` (fused launches) against the float64
   oracle, output and the gradients of x, A, B and m, bf16 / fp16 / fp32, ranks 16 and 64,
   dropout 0 and 0.1, odd shapes, the first also over a synthetic NF4 base. Then the target shape,
   forward + backward, dropout 0 and 0.1: our DoRA layer, ours without DoRA, peft's DoRA layer
   (same weights and magnitudes), peft's LoRA layer and ``nn.Linear``.
4. ``qlora``: a 4-bit base's two strategies (``QLORA_TOKENS`` from 16 to 4096, K = N = 4096,
   r 16, bf16, forward + backward on a synthetic NF4 weight) beside the 16-bit layer and
   ``nn.Linear``: which strategy the roofline threshold picks and which was faster, per M; the
   tuner's decisions for two 4-bit keys (M 256 and 2048).
5. ``tuner``: ``lora_kernels.tune`` on the LLM shapes of ``benchmarks/bench_fused.py`` (M 2048
   and 8192, (K, N) in (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), r 16): each
   decision and each candidate's time.
6. ``model``: the end-to-end benchmark (``benchmarks/bench_model.py --preset 1b``: a Llama 3.2
   1B-shaped Llama and MiniLM, bf16, dropout 0 and 0.1; ``inject_lora``, peft, peft after
   ``patch_peft`` and the frozen floor), cut after ``MODEL_TIME_CAP_S``.

Tuning decisions of the run go to ``DIR/tune.json``, never the user's cache. Without a CUDA
device the command exits 2 (``--dry-run`` prints the stages and their estimated cost, and exits
0 anywhere).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from . import quant, triton_path, tune
from .function import lora_linear
from .layer import LoRALayer
from .reference import lora_linear_reference, relative_errors
from .roofline import TARGET_SHAPE, TARGETS
from .testing import check_dora_case, dequantize, drawn_mask, peft_layer
from .timing import fwd_bwd_ms, layer_call, machine_facts, peak_bytes, time_ms, write_json

# --- stage 1: correctness ----------------------------------------------------------------------

# (name, dtype, TF32) and the relative error bound against float64 (tests/helpers.py's
# TRITON_TOL; TF32 rounds the dot operands to 10 mantissa bits: ~1e-3 of each product).
PRECISIONS = [
    ("bfloat16", torch.bfloat16, False, 1e-2),
    ("float16", torch.float16, False, 5e-3),
    ("float32", torch.float32, False, 1e-4),
    ("float32-tf32", torch.float32, True, 5e-3),
]
CHECK_RANKS = (8, 16, 64)
CHECK_DROPOUTS = (0.0, 0.1)
# (leading dims, K, N): an LLM projection, and odd ones (one token, sizes off every tile edge,
# 3-D input, a narrow output)
CHECK_SHAPES = [
    ((4096,), 4096, 4096),
    ((1,), 64, 64),
    ((17,), 96, 80),
    ((3, 127), 200, 300),
    ((1000,), 1024, 4096),
    ((2, 257), 4096, 1024),
]
# 4-bit bases (docs/qlora.md): a synthetic NF4 weight (random codes and scales: the GPU machine
# has no bitsandbytes), in each precision, dropout and the first rank, over these shapes, with
# each strategy (decoded in the fused kernels' K loop, and dequantized into a buffer).
CHECK_4BIT_SHAPES = [((17,), 96, 80), ((3, 127), 200, 300), ((1000,), 1024, 4096)]
# Worker processes for the correctness cases: compiling is the cost, and it is CPU work.
CHECK_JOBS = min(8, os.cpu_count() or 1)


def _worst(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(relative_errors(out, ref).max()) if ref.numel() else 0.0


def check_case(
    device,
    dtype,
    tf32: bool,
    rank: int,
    p: float,
    lead,
    k: int,
    n: int,
    base: str = "16bit",
    strategy: str = "",
) -> dict:
    """One layer call on the Triton path against the float64 reference, and its determinism.

    ``base="nf4"``: over a synthetic 4-bit weight, read in the fused kernels' K loop or
    dequantized into a buffer by our kernel as ``strategy`` says (``LORA_KERNELS_4BIT``), the
    reference on the torch path's dequantized weight, which the kernel's must equal bit for bit
    (``dequant_bitwise``); no weight gradient."""
    with _four_bit_strategy(strategy):
        return _check_case(device, dtype, tf32, rank, p, lead, k, n, base)


@contextlib.contextmanager
def _four_bit_strategy(strategy: str):
    """``LORA_KERNELS_4BIT`` set to ``strategy`` inside the block ("": chosen by M), then put
    back as it was."""
    before = os.environ.get(triton_path.ENV_4BIT)
    os.environ[triton_path.ENV_4BIT] = strategy
    try:
        yield
    finally:
        if before is None:
            del os.environ[triton_path.ENV_4BIT]
        else:
            os.environ[triton_path.ENV_4BIT] = before


def _check_case(device, dtype, tf32, rank, p, lead, k, n, base) -> dict:
    key = (
        (dtype, tf32, rank, p, lead, k, n)
        if base == "16bit"
        else (base, dtype, rank, p, lead, k, n)
    )
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))

    def rand(*shape, std=1.0):
        # rounded to dtype here: the reference computes on exactly the kernels' inputs
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device, dtype)

    result = {}
    packed = quant.synthetic_4bit(n, k, device, dtype, gen) if base == "nf4" else None
    inputs = {"x": rand(*lead, k)}
    if packed is None:
        inputs["weight"] = rand(n, k, std=k**-0.5)
    else:
        exact = quant.dequantize(packed, dtype)
        kernel = dequantize(packed, dtype)
        result["dequant_bitwise"] = torch.equal(kernel.view(torch.uint8), exact.view(torch.uint8))
    inputs.update(bias=rand(n), lora_A=rand(k, rank, std=k**-0.5))
    inputs["lora_B"] = rand(rank, n, std=rank**-0.5)
    dy = rand(*lead, n)
    seed, scaling = 1234, 0.5

    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        runs = []
        for _ in range(2):
            leaves = {a: t.clone().requires_grad_(True) for a, t in inputs.items()}
            x, bias, lora_A, lora_B = (leaves[a] for a in ("x", "bias", "lora_A", "lora_B"))
            weight = leaves.get("weight", packed)
            args = (x, weight, bias, lora_A, lora_B, scaling)
            y = lora_linear(*args, dropout_p=p, seed=seed, backend="triton")
            y.backward(dy)
            runs.append((y.detach(), {a: t.grad for a, t in leaves.items()}))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    mask = None
    if p > 0:
        m = math.prod(lead)
        mask = drawn_mask(m, k, p, seed, "triton", device).reshape(*lead, k).double()
    ref = {a: t.double().requires_grad_(True) for a, t in inputs.items()}
    weight = ref["weight"] if packed is None else exact.double()
    x, bias, lora_A, lora_B = (ref[a] for a in ("x", "bias", "lora_A", "lora_B"))
    args = (x, weight, bias, lora_A, lora_B, scaling)
    y_ref = lora_linear_reference(*args, dropout_mask=mask, dropout_p=p)
    y_ref.backward(dy.double())
    (y, grads), (y2, grads2) = runs
    errors = {"y": _worst(y, y_ref)}
    errors.update({f"d{a}": _worst(grads[a], ref[a].grad) for a in inputs})
    deterministic = torch.equal(y, y2) and all(torch.equal(grads[a], grads2[a]) for a in inputs)
    return {"errors": errors, "deterministic": deterministic, **result}


def _checked(device, name, dtype, tf32, tol, rank, p, lead, k, n, base="16bit", strategy=""):
    """``check_case`` as one JSON row; a failure to run is recorded, not raised."""
    case = {"dtype": name, "dropout": p, "rank": rank, "shape": [*lead, k, n], "base": base}
    if strategy:
        case["strategy"] = strategy
    try:
        result = check_case(device, dtype, tf32, rank, p, lead, k, n, base, strategy)
    except Exception as e:  # noqa: BLE001  (recorded: the other cases still run)
        case.update(error=f"{type(e).__name__}: {e}"[:500], passed=False)
    else:
        worst = max(result["errors"].values())
        case.update(result, tolerance=tol, worst=worst)
        case["passed"] = (
            worst <= tol and result["deterministic"] and result.get("dequant_bitwise", True)
        )
    return case


def stage_correctness(
    device,
    shapes=CHECK_SHAPES,
    ranks=CHECK_RANKS,
    dropouts=CHECK_DROPOUTS,
    precisions=PRECISIONS,
    jobs: int = 1,
    time_cap_s: float | None = None,
    four_bit_shapes=CHECK_4BIT_SHAPES,
) -> dict:
    """Every case of the product, then the 4-bit base's cases (16-bit precisions only, the first
    rank, both strategies); ``jobs`` worker processes share them (compiling the kernels of about
    400 specializations is most of the cost, and it runs on the CPU). Cases not started within
    ``time_cap_s`` are recorded as not run."""
    todo = [
        (name, dtype, tf32, tol, rank, p, lead, k, n)
        for name, dtype, tf32, tol in precisions
        for p in dropouts
        for rank in ranks
        for lead, k, n in shapes
    ]
    todo += [
        (name, dtype, tf32, tol, ranks[0], p, lead, k, n, "nf4", strategy)
        for name, dtype, tf32, tol in precisions
        if dtype != torch.float32
        for p in dropouts
        for lead, k, n in four_bit_shapes
        for strategy in ("in_loop", "buffer")
    ]
    deadline = None if time_cap_s is None else time.perf_counter() + time_cap_s
    results: list[dict | None] = [None] * len(todo)
    if jobs <= 1:
        for i, args in enumerate(todo):
            if deadline is not None and time.perf_counter() > deadline:
                break
            results[i] = _checked(device, *args)
    else:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # CUDA can't be used in a forked child
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx)
        futures = [pool.submit(_checked, device, *args) for args in todo]
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        concurrent.futures.wait(futures, timeout=timeout)
        pool.shutdown(wait=True, cancel_futures=True)  # the cases already running finish
        for i, future in enumerate(futures):
            if future.done() and not future.cancelled():
                results[i] = future.result()
    cases = [r for r in results if r is not None]
    not_run = [
        {"dtype": a[0], "dropout": a[5], "rank": a[4], "shape": [*a[6], a[7], a[8]]}
        | ({"base": a[9], "strategy": a[10]} if len(a) > 9 else {"base": "16bit"})
        for a, r in zip(todo, results)
        if r is None
    ]
    failed = [c for c in cases if not c["passed"]]
    return {
        "cases": cases,
        "passed": len(cases) - len(failed),
        "failed": len(failed),
        "not_run": not_run,
    }


# --- stage 2: the target shape ------------------------------------------------------------------


class _Functional(nn.Module):
    """``lora_linear`` on a ``LoRALayer``'s tensors with a fixed ``backend`` (and, where given,
    a 4-bit ``weight`` in place of the layer's own)."""

    def __init__(self, layer, backend: str, weight=None):
        super().__init__()
        self.layer, self.backend, self.weight = layer, backend, weight

    def forward(self, x):
        layer = self.layer
        return lora_linear(
            x,
            layer.linear.weight if self.weight is None else self.weight,
            layer.linear.bias,
            layer.lora_A,
            layer.lora_B,
            layer.scaling,
            backend=self.backend,
        )


def stage_target(device, shape=TARGET_SHAPE, dtype=torch.bfloat16) -> dict:
    m, k, n, r = shape
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    layer = LoRALayer.from_linear(base, rank=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(std=r**-0.5)  # a trained-looking adapter
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    providers = {
        "fused_tables": _Functional(layer, "triton"),  # before this key is tuned
        "torch_path": _Functional(layer, "torch"),
        "linear": base,
    }
    peft_model = peft_layer(base, layer, r)
    if peft_model is not None:
        providers["peft"] = peft_model
    results = {}
    for name, module in providers.items():
        results[name] = {"ms": fwd_bwd_ms(module, x, dy), "peak_bytes": peak_bytes(module, x, dy)}
    # The fused kernels alone, forward + backward without autograd: the tables' plan (TMA
    # descriptors on Hopper) against the same tiles on the pointer kernels.
    tables = triton_path.plan_for(device, dtype, r, False)
    pointer = dataclasses.replace(
        tables, **{f: {**getattr(tables, f), "TMA": False} for f in triton_path.LAUNCHES}
    )
    raw = (x.detach(), base.weight, base.bias, layer.lora_A.detach(), layer.lora_B.detach())
    kernels_ms = {
        "tables": time_ms(lambda: layer_call(tables, *raw, dy, 0.0), device),
        "pointer": time_ms(lambda: layer_call(pointer, *raw, dy, 0.0), device),
        "uses_descriptors": any(getattr(tables, f).get("TMA") for f in triton_path.LAUNCHES),
    }
    key, decision = tune.tune(device, dtype, m, k, n, r)
    tuned = _Functional(layer, "auto")  # the decision just stored: the tuned plan, or torch
    results["tuned"] = {"ms": fwd_bwd_ms(tuned, x, dy), "peak_bytes": peak_bytes(tuned, x, dy)}
    ms = {name: v["ms"] for name, v in results.items()}
    ratios = {
        "descriptors_vs_pointer": kernels_ms["tables"] / kernels_ms["pointer"],
        "tuned_vs_linear": ms["tuned"] / ms["linear"],
        "fused_tables_vs_linear": ms["fused_tables"] / ms["linear"],
        "tuned_vs_torch": ms["tuned"] / ms["torch_path"],
    }
    if "peft" in ms:
        ratios["peft_vs_tuned"] = ms["peft"] / ms["tuned"]
    met = {
        "tuned_vs_linear": ratios["tuned_vs_linear"] <= TARGETS["tuned_vs_linear"],
        "tuned_vs_torch": ratios["tuned_vs_torch"] <= TARGETS["tuned_vs_torch"],
    }
    if "peft_vs_tuned" in ratios:
        met["peft_vs_tuned"] = ratios["peft_vs_tuned"] >= TARGETS["peft_vs_tuned"]
    return {
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "providers": results,
        "fused_kernels_ms": kernels_ms,
        "ratios": ratios,
        "targets": TARGETS,
        "met": met,
        "decision": {"key": key, "provider": decision["provider"], "ms": decision["ms"]},
    }


# --- stage 3: DoRA --------------------------------------------------------------------------------

DORA_SHAPES = [((4096,), 4096, 4096), ((17,), 96, 80), ((2, 3), 33, 17)]
DORA_RANKS = (16, 64)
DORA_DROPOUTS = (0.0, 0.1)


def stage_dora(
    device,
    shape=TARGET_SHAPE,
    dtype=torch.bfloat16,
    check_shapes=DORA_SHAPES,
    ranks=DORA_RANKS,
    dropouts=DORA_DROPOUTS,
    precisions=None,
) -> dict:
    """DoRA's correctness cases, then its target-shape timings (module docstring)."""
    # (bounds: LoRA's x 2, with dropout x 3 in 16 bits: PyTorch ops round three terms apart);
    first = ((precisions or PRECISIONS)[0][0], ranks[0], check_shapes[0])  # also over NF4
    cases = [
        {"precision": name, **check_dora_case(device, dt, bound, rank, p, *case, nf4)}
        for name, dt, tf32, tol in precisions or PRECISIONS
        if not tf32
        for rank in ranks
        for p in dropouts
        for bound in [tol * (3.0 if p and dt != torch.float32 else 2.0)]
        for case in check_shapes
        for nf4 in ((False, True) if (name, rank, case) == first else (False,))
    ]
    m, k, n, r = shape
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    timings = {}
    for p in dropouts:
        ours = LoRALayer.from_linear(base, rank=r, alpha=2 * r, dropout=p, use_dora=True)
        lora = LoRALayer.from_linear(base, rank=r, alpha=2 * r, dropout=p)
        with torch.no_grad():
            ours.lora_B.normal_(std=r**-0.5)
            lora.lora_A.copy_(ours.lora_A)
            lora.lora_B.copy_(ours.lora_B)
        providers = {"lora_kernels_dora": ours, "lora_kernels_lora": lora, "linear": base}
        peft_dora = peft_layer(base, ours, r, dropout=p)
        if peft_dora is not None:
            providers["peft_dora"] = peft_dora.train()
            providers["peft_lora"] = peft_layer(base, lora, r, dropout=p).train()
        row = {
            name: {"ms": fwd_bwd_ms(module, x, dy), "peak_bytes": peak_bytes(module, x, dy)}
            for name, module in providers.items()
        }
        ms = {name: v["ms"] for name, v in row.items()}
        ratios = {"dora_vs_lora": ms["lora_kernels_dora"] / ms["lora_kernels_lora"]}
        ratios["dora_vs_linear"] = ms["lora_kernels_dora"] / ms["linear"]
        if "peft_dora" in ms:
            ratios["dora_vs_peft_dora"] = ms["lora_kernels_dora"] / ms["peft_dora"]
        timings[str(p)] = {"providers": row, "ratios": ratios}
    return {
        "cases": cases,
        "passed": sum(c["passed"] for c in cases),
        "failed": sum(not c["passed"] for c in cases),
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "timings": timings,
    }


# --- stage 4: a 4-bit base's two strategies over M ----------------------------------------------

QLORA_SHAPE = (4096, 4096, 16)  # K, N, r
QLORA_TOKENS = (16, 64, 256, 512, 1024, 4096)  # around the roofline's threshold (512 on H100)


def stage_qlora(
    device, shape=QLORA_SHAPE, tokens=QLORA_TOKENS, dtype=torch.bfloat16, tuned_tokens=(256, 2048)
) -> dict:
    """Forward + backward over a synthetic NF4 base, x requiring grad, per number of tokens:
    the fused kernels reading the codes in their K loop, and our dequant kernel into a buffer
    then the fused kernels (``LORA_KERNELS_4BIT``), beside the same layer over the 16-bit
    weight and that weight's frozen ``nn.Linear``. Which strategy the threshold picks, and
    which was faster, per M; then the tuner's decisions for 4-bit keys at ``tuned_tokens``."""
    k, n, r = shape
    gen = torch.Generator().manual_seed(0)
    packed = quant.synthetic_4bit(n, k, device, dtype, gen)
    base = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(quant.dequantize(packed, dtype))
    layer = LoRALayer.from_linear(base, rank=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(std=r**-0.5)
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        ms = {}
        for strategy in ("in_loop", "buffer"):
            with _four_bit_strategy(strategy):
                ms[strategy] = fwd_bwd_ms(_Functional(layer, "triton", packed), x, dy)
        ms["16bit_fused"] = fwd_bwd_ms(_Functional(layer, "triton"), x, dy)
        ms["16bit_linear"] = fwd_bwd_ms(base, x, dy)
        with _four_bit_strategy(""):
            chosen = "in_loop" if triton_path.in_loop(device, dtype, m) else "buffer"
        faster = min(("in_loop", "buffer"), key=ms.get)
        rows.append(
            {
                "M": m,
                "ms": ms,
                "chosen": chosen,
                "faster": faster,
                "in_loop_vs_buffer": ms["in_loop"] / ms["buffer"],
            }
        )
    tuned = []
    for m in tuned_tokens:
        key, decision = tune.tune(device, dtype, m, k, n, r, base="nf4")
        tuned.append(
            {
                "M": m,
                "key": key,
                "provider": decision["provider"],
                "strategy": decision["strategy"],
                "ms": decision["ms"],
            }
        )
    return {
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "in_loop_max_m": triton_path.in_loop_max_m(device, dtype),
        "rows": rows,
        "threshold_right": sum(row["chosen"] == row["faster"] for row in rows),
        "tuned": tuned,
    }


# --- stage 5: the tuner on LLM shapes -----------------------------------------------------------

TUNER_SHAPES = [
    (m, k, n, 16)
    for m in (2048, 8192)
    for k, n in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
]


def stage_tuner(device, shapes=TUNER_SHAPES, dtype=torch.bfloat16) -> dict:
    keys = []
    for m, k, n, r in shapes:
        key, decision = tune.tune(device, dtype, m, k, n, r)
        ms = decision["ms"]
        keys.append(
            {
                "shape": [m, k, n, r],
                "key": key,
                "provider": decision["provider"],
                "ms": ms,
                "chosen_vs_torch": min(ms["best_triton"], ms["torch"]) / ms["torch"],
                "tuned_vs_tables": ms["best_triton"] / ms["tables"] if ms["tables"] else None,
                "candidates": decision["candidates"],
                "tune_s": decision["tune_s"],
            }
        )
    return {"dtype": str(dtype).removeprefix("torch."), "keys": keys}


# --- stage 6: the end-to-end model benchmark ----------------------------------------------------

BENCH_MODEL = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_model.py"


MODEL_TIME_CAP_S = 300  # the benchmark rewrites its JSON after each (model, dropout): kept if cut


def stage_model(device, out_dir: pathlib.Path, time_cap_s: float = MODEL_TIME_CAP_S) -> dict:
    cmd = [sys.executable, str(BENCH_MODEL), "--preset", "1b", "--out", str(out_dir)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=time_cap_s)
    except subprocess.TimeoutExpired as cut:
        tail = (cut.stdout or b"")[-4000:]
        return {
            "command": cmd,
            "timed_out_after_s": time_cap_s,
            "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        }
    return {
        "command": cmd,
        "returncode": run.returncode,
        "output_tail": run.stdout[-4000:],
        "stderr_tail": run.stderr[-4000:],
    }


# --- the run --------------------------------------------------------------------------------------


class Stage(NamedTuple):
    name: str
    estimate_s: float  # a guess for an H100 / H200, compiles included: what the budget counts
    run: Callable
    needs: Callable[[], str | None] = lambda: None  # why it can't run here, or None


STAGES = [
    Stage(
        "correctness",
        150,
        lambda device, out: stage_correctness(device, jobs=CHECK_JOBS, time_cap_s=240),
    ),
    Stage("target", 60, lambda device, out: stage_target(device)),
    Stage("dora", 45, lambda device, out: stage_dora(device)),
    Stage("qlora", 30, lambda device, out: stage_qlora(device)),
    Stage("tuner", 120, lambda device, out: stage_tuner(device)),
    Stage(
        "model",
        120,
        stage_model,
        lambda: None if BENCH_MODEL.exists() else f"{BENCH_MODEL.name} does not exist yet",
    ),
]


def run(out_dir: pathlib.Path, budget_s: float, device, stages=STAGES, log=print) -> dict:
    """Run ``stages`` into ``out_dir`` within ``budget_s``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "tune.json"
    cache.unlink(missing_ok=True)  # this run's own decisions: the target measures the tables first
    os.environ[tune.ENV_CACHE] = str(cache)
    tune.reset()
    summary = {**machine_facts(device), "budget_s": budget_s, "stages": {}}
    start = time.perf_counter()
    for stage in stages:
        elapsed = time.perf_counter() - start
        why_not = stage.needs()
        if why_not is None and elapsed + stage.estimate_s > budget_s:
            why_not = f"would pass the budget: {elapsed:.0f} s spent + ~{stage.estimate_s} s"
        if why_not is not None:
            summary["stages"][stage.name] = {"status": "skipped", "note": why_not}
            log(f"gpu_check: {stage.name}: skipped ({why_not})")
        else:
            log(f"gpu_check: {stage.name} (~{stage.estimate_s} s) ...")
            began = time.perf_counter()
            try:
                result = stage.run(device, out_dir)
            except Exception as e:  # noqa: BLE001  (recorded; the next stages still run)
                status = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
            else:
                write_json(out_dir / f"{stage.name}.json", {**machine_facts(device), **result})
                status = {"status": "done", "file": f"{stage.name}.json"}
            status["seconds"] = round(time.perf_counter() - began, 1)
            summary["stages"][stage.name] = status
            log(f"gpu_check: {stage.name}: {status['status']} in {status['seconds']} s")
        write_json(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_kernels.gpu_check",
        description="Everything a lent GPU should measure, in one command.",
    )
    parser.add_argument("--out", type=pathlib.Path, required=True, help="directory of the JSON")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="stop starting stages past this many seconds (default 480)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        total = 0.0
        for stage in STAGES:
            why_not = stage.needs()
            total += 0 if why_not else stage.estimate_s
            state = f"skipped: {why_not}" if why_not else f"~{stage.estimate_s:.0f} s"
            print(f"{stage.name:12} {state}")
        print(f"{'total':12} ~{total:.0f} s of a {args.budget_s:.0f} s budget -> {args.out}")
        return 0
    if not torch.cuda.is_available():
        print("lora_kernels.gpu_check needs a CUDA GPU (try --dry-run)", file=sys.stderr)
        return 2
    summary = run(args.out, args.budget_s, torch.device("cuda", torch.cuda.current_device()))
    print(json.dumps(summary["stages"], indent=1))
    return 0 if all(s["status"] != "error" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
