"""On-device tuning (``lora_kernels.tune``): the candidate space, the cache, the CLI, dispatch
and ``tune_model``. Without a GPU the kernels run in Triton's interpreter, which stands in for
the GPU: the timings mean nothing, the machinery is real."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    KERNEL_DEVICE,
    TRITON_TOL,
    assert_close,
    make_params,
    make_x,
    read_mask,
    reference_with_grads,
    run_with_grads,
    seed_for,
)
from torch import nn

import lora_kernels
from lora_kernels import LoRALayer, lora_linear, timing, torch_path, triton_path, tune, validation
from lora_kernels.kernels import common
from lora_kernels.kernels.common import padded_rank
from lora_kernels.tune import __main__ as tune_cli

DEVICE = torch.device(KERNEL_DEVICE)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test its own cache file, nothing read or decided before it, nothing left after."""
    monkeypatch.setenv(tune.ENV_CACHE, str(tmp_path / "tune.json"))
    monkeypatch.delenv(tune.ENV_TUNE, raising=False)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    tune.reset()
    yield tmp_path / "tune.json"
    tune.reset()


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``backend="auto"`` takes the kernels on CPU tensors too (the interpreter as the GPU)."""
    monkeypatch.setattr(validation, "AUTO_TRITON_DEVICE_TYPES", ("cuda", "cpu"))


def fake_times(monkeypatch, fastest: str):
    """Deterministic timings: ``fastest`` ("torch", "tables" or a candidate name) wins."""
    calls = []

    def timed(fn, device):
        calls.append(fn)
        return 1.0 if len(calls) == 1 + order.index(fastest) else 5.0

    plan = triton_path.plan_for(DEVICE, torch.float32, 16, False)
    order = [name for name, _ in tune.candidates(plan, False)] + ["torch"]
    monkeypatch.setattr(timing, "time_ms", timed)


def decision_for(plan, provider="triton"):
    return {"provider": provider, "plan": dataclasses.asdict(plan), "ms": {}}


def key(m, k, n, rank, dtype=torch.float32, dropout=False):
    return tune.key_of(DEVICE, dtype, tune.m_bucket(m), k, n, padded_rank(rank), dropout)


# --- the candidate space ----------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", [8, 9])
def test_candidates_only_shrink_the_table_configs(arch, dtype, dropout):
    table = triton_path.plan_for(DEVICE, dtype, 16, dropout, arch=arch)
    cands = tune.candidates(table, dropout)
    assert cands[0] == ("tables", table)
    names = [name for name, _ in cands]
    assert len(names) == len(set(names))
    assert any(n.startswith("t_only") for n in names) == dropout
    for name, plan in cands[1:]:
        launch = name.split()[0]
        changed = {
            f
            for f in ("fwd", "t_only", "dx", "grad_dA", "grad_dB")
            if getattr(plan, f) != getattr(table, f)
        }
        assert changed == {launch}, name
        new, old = getattr(plan, launch), getattr(table, launch)
        assert [k for k in new if new[k] != old[k]] and all(new[k] <= old[k] for k in new), name
        assert all(new[k] >= 16 for k in new if k.startswith("BLOCK"))
        assert new["num_stages"] >= tune.MIN_STAGES
    for alt in tune.ALTERNATIVES:  # a table reads as one: every line says why it is there
        assert alt.why and alt.how in ("/2", "-1", "off")


def test_m_bucket_and_key():
    assert [tune.m_bucket(m) for m in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    fields = key(5000, 64, 96, 8, torch.bfloat16, True).split("|")
    assert fields[4:] == ["bfloat16", "8192", "64", "96", "16", "1", "0"]
    assert fields[2] == torch.__version__


# --- every candidate computes the same math ---------------------------------------------------

# (dtype, rank, dropout) groups; make test runs each candidate of a group once, on one odd shape
# per group; the run marked slow takes every group and two shapes.
QUICK_GROUPS = [(torch.bfloat16, 5, 0.0), (torch.float32, 70, 0.25)]
SLOW_GROUPS = [
    (dtype, rank, p)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for rank in (1, 5, 70, 128)
    for p in (0.0, 0.25)
]
SHAPES = [((3, 7), 40, 33), ((129,), 65, 130)]  # odd shapes: 3-D, and tiles' edges


def candidate_cases(groups, shapes, archs):
    cases = []
    for dtype, rank, p in groups:
        for arch in archs:
            table = triton_path.plan_for(DEVICE, dtype, rank, p > 0, arch=arch)
            for name, _ in tune.candidates(table, p > 0):
                for shape in shapes:
                    case_id = f"{dtype}-r{rank}-p{p}-sm{arch}0-{name}-{shape}"
                    cases.append(pytest.param(dtype, rank, p, arch, name, shape, id=case_id))
    return cases


def check_candidate(dtype, rank, p, arch, name, shape):
    """``lora_linear`` through the tuned dispatch with this candidate as the key's decision,
    against the float64 reference: output and every gradient."""
    lead, k, n = shape
    table = triton_path.plan_for(DEVICE, dtype, rank, p > 0, arch=arch)
    plan = dict(tune.candidates(table, p > 0))[name]
    m = int(torch.tensor(lead).prod())
    tune.store(key(m, k, n, rank, dtype, p > 0), decision_for(plan))
    gen = torch.Generator().manual_seed(seed_for(dtype, rank, p, name, shape))
    x = make_x(lead, k, dtype, "contiguous", gen).to(DEVICE)
    params = {
        a: None if t is None else t.to(DEVICE)
        for a, t in make_params(k, n, rank, dtype, True, gen).items()
    }
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    seed = 77
    used = []
    real = triton_path.forward_op

    def spy(*args):
        used.append(args[8])
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_path, "forward_op", spy)
        y, grads = run_with_grads(
            lora_linear, x, params, dy, scaling=0.5, dropout_p=p, seed=seed, backend="triton"
        )
    assert used == [triton_path.plan_to_str(plan)]  # the candidate ran, not the tables
    mask = None
    if p > 0:
        mask = read_mask(m, k, p, seed, "triton").reshape(*lead, k).double()
    y_ref, grads_ref = reference_with_grads(x, params, dy, 0.5, dropout_mask=mask, dropout_p=p)
    tol = TRITON_TOL[dtype]
    assert_close(f"{name} y", y, y_ref, tol)
    for g in grads:
        assert_close(f"{name} d{g}", grads[g], grads_ref[g], tol)


@pytest.mark.parametrize(
    "dtype, rank, p, arch, name, shape", candidate_cases(QUICK_GROUPS, SHAPES[:1], [9])
)
def test_every_candidate_computes_the_same_math(dtype, rank, p, arch, name, shape):
    check_candidate(dtype, rank, p, arch, name, shape)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, rank, p, arch, name, shape", candidate_cases(SLOW_GROUPS, SHAPES, [8, 9])
)
def test_every_candidate_computes_the_same_math_all(dtype, rank, p, arch, name, shape):
    check_candidate(dtype, rank, p, arch, name, shape)


# --- measuring and deciding -------------------------------------------------------------------


def test_tune_measures_every_candidate_and_stores_the_decision(fresh_cache):
    k_, decision = tune.tune(DEVICE, torch.float32, 8, 32, 48, 4)
    names = [c["name"] for c in decision["candidates"]]
    table = triton_path.plan_for(DEVICE, torch.float32, 4, False)
    assert names == [n for n, _ in tune.candidates(table, False)] + ["torch"]
    assert all(c["ms"] > 0 for c in decision["candidates"])
    assert decision["provider"] in ("triton", "torch")
    assert k_ == key(8, 32, 48, 4)
    on_disk = json.loads(fresh_cache.read_text())
    assert on_disk["version"] == tune.CACHE_VERSION and k_ in on_disk["decisions"]
    assert on_disk["lora_kernels"] == lora_kernels.__version__
    tune.reset()  # a new process: read back from the file
    assert tune.lookup(8, 32, 48, 4, dtype=torch.float32, device=DEVICE) == on_disk["decisions"][k_]
    assert tune.lookup(9, 32, 48, 4, dtype=torch.float32, device=DEVICE) is None  # another bucket


@pytest.mark.parametrize("fastest", ["torch", "tables", "dx BLOCK_M/2"])
def test_the_fastest_candidate_wins(monkeypatch, fastest):
    fake_times(monkeypatch, fastest)
    _, decision = tune.tune(DEVICE, torch.float32, 8, 32, 48, 16)
    assert decision["provider"] == ("torch" if fastest == "torch" else "triton")
    table = triton_path.plan_for(DEVICE, torch.float32, 16, False)
    expected = dict(tune.candidates(table, False))["tables" if fastest == "torch" else fastest]
    assert decision["plan"] == dataclasses.asdict(expected)


def test_a_failing_candidate_is_skipped(monkeypatch):
    real = timing.layer_call

    def flaky(plan, *args):
        if (
            plan is not None
            and plan.fwd["BLOCK_N"]
            != triton_path.plan_for(DEVICE, torch.float32, 4, False).fwd["BLOCK_N"]
        ):
            raise RuntimeError("out of resources")
        return real(plan, *args)

    monkeypatch.setattr(timing, "layer_call", flaky)
    _, decision = tune.tune(DEVICE, torch.float32, 8, 32, 48, 4)
    failed = [c for c in decision["candidates"] if "error" in c]
    assert [c["name"] for c in failed] == ["fwd BLOCK_N/2"]
    assert "out of resources" in failed[0]["error"]


# --- the cache --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "Expecting property name"),
        ('{"version": 999, "lora_kernels": "0.1.0", "decisions": {}}', r"\(999, '0.1.0'\)"),
        ('{"version": 1, "lora_kernels": "0.0.1", "decisions": {}}', r"\(1, '0.0.1'\)"),
        (
            '{"version": 1, "lora_kernels": "0.1.0", "decisions": {"k": {"provider": "cuda"}}}',
            "1 malformed decisions.*: k",
        ),
        ('{"version": 1, "lora_kernels": "0.1.0", "decisions": []}', "no valid 'decisions'"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_a_bad_cache_is_ignored_with_one_warning(fresh_cache, content, words, auto_on_cpu):
    fresh_cache.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the cache .*{words}") as record:
        assert tune.lookup(8, 32, 48, 4, device=DEVICE) is None
        assert tune.decisions() == {}
        layer = LoRALayer(32, 48, rank=4)
        layer(torch.randn(8, 32))  # the layer runs on: the tables
    assert len(record) == 1


def test_a_triton_decision_without_its_plan_costs_one_warning(fresh_cache, auto_on_cpu):
    """Parsable, but the decision for this very call lacks its plan: one warning, the tables."""
    content = {"version": tune.CACHE_VERSION, "lora_kernels": lora_kernels.__version__}
    content["decisions"] = {key(8, 32, 48, 4): {"provider": "triton", "ms": 1.0}}
    fresh_cache.write_text(json.dumps(content))
    layer = LoRALayer(32, 48, rank=4)
    with pytest.warns(UserWarning, match="1 malformed decisions") as record:
        for _ in range(2):
            layer(torch.randn(8, 32))
    assert len(record) == 1


def test_an_unreadable_cache_is_ignored(fresh_cache):
    fresh_cache.mkdir()  # a directory where the file should be: open() raises
    with pytest.warns(UserWarning, match="ignoring the cache"):
        assert tune.decisions() == {}


def test_store_keeps_what_another_process_wrote(fresh_cache):
    plan = triton_path.plan_for(DEVICE, torch.float32, 16, False)
    tune.decisions()  # read (nothing yet)
    other = {"version": tune.CACHE_VERSION, "lora_kernels": lora_kernels.__version__}
    other["decisions"] = {"other|key": decision_for(plan)}
    fresh_cache.write_text(json.dumps(other))  # another process, since
    tune.store("mine|key", decision_for(plan, "torch"))
    assert set(json.loads(fresh_cache.read_text())["decisions"]) == {"other|key", "mine|key"}
    assert [p.name for p in fresh_cache.parent.iterdir()] == ["tune.json"]  # no temporary left


# --- dispatch ---------------------------------------------------------------------------------


def calls_of(monkeypatch):
    seen = []
    for module, name in ((torch_path, "forward"), (triton_path, "forward_op")):
        real = getattr(module, name)

        def spy(*args, real=real, name=name, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


def test_auto_runs_the_torch_path_where_the_cache_says_so(monkeypatch, auto_on_cpu):
    plan = triton_path.plan_for(DEVICE, torch.float32, 4, False)
    tune.store(key(8, 32, 48, 4), decision_for(plan, "torch"))
    seen = calls_of(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x, params = torch.randn(8, 32, generator=gen), make_params(32, 48, 4, torch.float32, True, gen)
    dy = torch.randn(8, 48, generator=gen)
    y, grads = run_with_grads(lora_linear, x, params, dy, scaling=0.5)
    assert seen == ["forward"]  # the torch path, forward and backward
    y_ref, grads_ref = reference_with_grads(x, params, dy, 0.5)
    assert_close("y", y, y_ref, 1e-5)
    for g in grads:
        assert_close(g, grads[g], grads_ref[g], 1e-5)
    seen.clear()
    lora_linear(x, *params.values(), backend="triton")  # asked for by name: the kernels
    assert seen == ["forward_op"]
    seen.clear()
    lora_linear(torch.randn(20, 32), *params.values())  # another M bucket: no decision, tables
    assert seen == ["forward_op"]


def test_tuning_on_first_call_is_logged_once_per_key(monkeypatch, caplog, fresh_cache, auto_on_cpu):
    monkeypatch.setenv(tune.ENV_TUNE, "1")
    layer = LoRALayer(32, 48, rank=4)
    with caplog.at_level(logging.WARNING, logger="lora_kernels.tune"):
        for _ in range(3):
            layer(torch.randn(8, 32)).sum().backward()
        layer(torch.randn(3, 32))
    tuning = [r for r in caplog.records if "tuning" in r.getMessage()]
    assert len(tuning) == 2  # M buckets 8 and 4
    assert set(json.loads(fresh_cache.read_text())["decisions"]) == {
        key(8, 32, 48, 4),
        key(3, 32, 48, 4),
    }


def test_tune_model_tunes_every_layer_s_key(fresh_cache, auto_on_cpu):
    model = nn.Sequential(
        LoRALayer(32, 48, rank=4), nn.GELU(), LoRALayer(48, 48, rank=4), LoRALayer(48, 48, rank=4)
    )
    decisions = tune_model_of(model, torch.randn(2, 4, 32))
    assert set(decisions) == {key(8, 32, 48, 4), key(8, 48, 48, 4)}  # two distinct keys
    assert set(json.loads(fresh_cache.read_text())["decisions"]) == set(decisions)
    assert not tune.tuning_enabled()  # only inside tune_model


def tune_model_of(model, inputs):
    return tune.tune_model(model, inputs)


@pytest.mark.inductor
def test_compile_fullgraph_takes_the_decision_as_a_constant_triton_path(auto_on_cpu):
    """With a tuned decision in the cache, compiled (dynamic shapes too) and eager agree."""
    plan = dict(tune.candidates(triton_path.plan_for(DEVICE, torch.float32, 4, False), False))
    tune.store(key(6, 32, 48, 4), decision_for(plan["fwd BLOCK_M/2"]))
    tune.store(key(3, 32, 48, 4), decision_for(plan["tables"], "torch"))
    torch.manual_seed(0)
    layer = LoRALayer(32, 48, rank=4, init="seed")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for m in (6, 3, 5):
        x = torch.randn(m, 32)
        assert_close(f"M={m}", compiled(x), layer(x).double(), 1e-5)


def test_a_decision_stored_before_the_4bit_configs_takes_the_tables_ones():
    """A cached plan without the fields newer releases added (the 4-bit in-loop configs) is
    completed from the tables, not left empty for a 4-bit call to trip on."""
    tables = triton_path.plan_for(DEVICE, torch.float32, 16, False)
    old = dataclasses.asdict(dataclasses.replace(tables, fwd={**tables.fwd, "BLOCK_M": 32}))
    del old["fwd_4bit"], old["dx_4bit"]
    tune.store(key(6, 32, 48, 16), {"provider": "triton", "plan": old, "ms": {}})
    chosen = tune.choose(DEVICE, torch.float32, 6, 32, 48, 16, False, True)
    plan = triton_path.plan_from_str(chosen)
    assert plan.fwd["BLOCK_M"] == 32  # the decision's own
    assert (plan.fwd_4bit, plan.dx_4bit) == (tables.fwd_4bit, tables.dx_4bit)


# --- 4-bit bases ------------------------------------------------------------------------------


def four_bit_call(m, k=32, n=48, rank=4, **kwargs):
    """``lora_linear`` over a synthetic NF4 weight, ``x`` and the adapters requiring grad, one
    forward and backward; returns how many times a buffer was dequantized."""
    from lora_kernels import quant
    from lora_kernels.kernels import dequant

    gen = torch.Generator().manual_seed(m)
    packed = quant.synthetic_4bit(n, k, DEVICE, torch.float32, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE).requires_grad_(True)
    A = torch.randn(k, rank, generator=gen).to(DEVICE).requires_grad_(True)
    B = torch.randn(rank, n, generator=gen).to(DEVICE).requires_grad_(True)
    calls, real = [], dequant.launch_dequant
    dequant.launch_dequant = lambda *args: calls.append(1) or real(*args)
    try:
        lora_linear(x, packed, None, A, B, 0.5, **kwargs).sum().backward()
    finally:
        dequant.launch_dequant = real
    return len(calls)


@pytest.mark.parametrize("fastest", ["in_loop", "buffer", "torch"])
def test_4bit_keys_measure_both_strategies_and_the_torch_path(monkeypatch, fastest, auto_on_cpu):
    """A key over a 4-bit weight (``|nf4``) times the in-loop strategy, the buffer and the torch
    path; a call of that key then runs what measured fastest, whatever the roofline threshold
    says (M = 6 is below it: untuned, it decodes in the K loop)."""
    order = list(tune.FOUR_BIT_CANDIDATES)
    times = iter([1.0 if name == fastest else 5.0 for name in order])
    monkeypatch.setattr(timing, "time_ms", lambda fn, device: fn() or next(times))
    key_, decision = tune.tune(DEVICE, torch.float32, 6, 32, 48, 4, base="nf4")
    assert key_ == key(6, 32, 48, 4) + "|nf4"  # the 16-bit key, marked
    assert [c["name"] for c in decision["candidates"]] == order
    assert decision["provider"] == ("torch" if fastest == "torch" else "triton")
    assert decision["strategy"] == ("in_loop" if fastest == "torch" else fastest)
    assert decision["ms"]["tables"] == (1.0 if fastest == "in_loop" else 5.0)
    strategy = tune.four_bit_strategy(DEVICE, torch.float32, 6, 32, 48, padded_rank(4), False)
    assert strategy == decision["strategy"]
    seen = calls_of(monkeypatch)
    buffers = four_bit_call(6)
    assert seen == (["forward"] if fastest == "torch" else ["forward_op"])
    assert buffers == (2 if fastest == "buffer" else 0)  # torch: its own ops dequantize
    assert four_bit_call(6, backend="triton") == (2 if fastest == "buffer" else 0)


def test_4bit_calls_without_a_decision_follow_the_threshold(auto_on_cpu):
    """No 4-bit decision (a 16-bit one for the same shape does not count): the strategy is the
    roofline threshold's."""
    plan = triton_path.plan_for(DEVICE, torch.float32, 4, False)
    tune.store(key(6, 32, 48, 4), {**decision_for(plan), "strategy": "buffer"})
    assert tune.four_bit_strategy(DEVICE, torch.float32, 6, 32, 48, padded_rank(4), False) == ""
    assert four_bit_call(6) == 0  # M = 6: in the K loop


# --- the command line ---------------------------------------------------------------------------


def run_cli(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lora_kernels.tune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_tunes_stores_and_prints_json(fresh_cache):
    out = run_cli(
        "--shape",
        "8x32x48x4",
        "--dtype",
        "float32",
        "--dropout",
        "0.1",
        "--json",
        env={"TRITON_INTERPRET": "1"},
    )
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["provider"] in ("triton", "torch")
    assert decision["key"] == key(8, 32, 48, 4, dropout=True)
    assert decision["key"] in json.loads(fresh_cache.read_text())["decisions"]


def test_cli_errors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():
        out = subprocess.run(
            [sys.executable, "-m", "lora_kernels.tune", "--shape", "8x32x48x4"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr
    for bad in (
        ["--shape", "8x32x48"],
        ["--shape", "0x32x48x4"],
        ["--shape", "8x32x48x4", "--dropout", "1"],
    ):
        with pytest.raises(SystemExit) as info:
            tune_cli.main(bad)
        assert info.value.code == 2, bad


def test_an_unwritable_cache_warns_once_and_keeps_the_decision(fresh_cache, monkeypatch):
    monkeypatch.setenv(tune.ENV_CACHE, str(fresh_cache / "sub" / "tune.json"))
    fresh_cache.write_text("")  # a file where the cache's folder should be: makedirs fails
    tune.reset()
    plan = triton_path.plan_for(DEVICE, torch.float32, 16, False)
    with pytest.warns(UserWarning, match="can't write the cache") as record:
        tune.store("a|key", decision_for(plan))
        tune.store("b|key", decision_for(plan))
    assert len(record) == 1
    assert set(tune.decisions()) == {"a|key", "b|key"}
