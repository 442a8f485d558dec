"""On-device tuning: which provider runs each layer call, measured on the GPU it runs on.

    python -m lora_kernels.tune --shape MxKxNxR [--dtype bfloat16] [--dropout 0.1] [--base nf4]
                                [--json]
    LORA_KERNELS_TUNE=1 python train.py          # tune each new key on its first call
    lora_kernels.tune.tune_model(model, example_inputs)

One decision per key: the GPU (name, compute capability), the torch and Triton versions, the
dtype, the M bucket (the next power of two of the token count), K, N, the padded rank, dropout on
or off and TF32 on or off. The decision names the provider of the layer call: ``"triton"``, with
a launch config per launch, or ``"torch"`` (the torch path: cuBLAS ``addmm`` + ``addmm_``) where
that measured faster (over a 4-bit weight, keys ending in ``|nf4``: the decoding strategy, in
the K loop or into a buffer, or the torch path). Candidates are measured forward + backward
together with ``triton.testing.do_bench``; the fastest wins, so no GPU we have never seen runs
the layer slower than its own cuBLAS path.

Decisions live in a JSON file, ``$LORA_KERNELS_CACHE`` (default
``~/.cache/lora_kernels/tune.json``), read once and written atomically. A corrupt, unreadable or
foreign-version file is ignored with one warning. Without tuning, a call runs the config tables,
unless the cache holds a decision for its key. Under ``torch.compile`` the decision is a constant
of the graph, as the table plan is.

Under ``TRITON_INTERPRET=1`` (no GPU) the whole flow runs on CPU tensors, timed with
``time.perf_counter``: the timings mean nothing there, the machinery is real.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import NamedTuple

import torch

from . import quant
from .function import triton_interpreter_enabled

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
ENV_TUNE = "LORA_KERNELS_TUNE"
ENV_CACHE = "LORA_KERNELS_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "lora_kernels", "tune.json")
TORCH = "torch"
TRITON = "triton"
# do_bench's windows (ms): enough repetitions for a stable median of a ~1 ms layer call, short
# enough that a key's dozen candidates tune in seconds (compiling them is most of the cost).
WARMUP_MS, REP_MS = 10, 50
# The interpreter runs a tiny call in ~0.1-1 s: one timed run each (the numbers mean nothing).
CPU_REPS = 1
# A key knows dropout on or off, not p: a first-call tuning measures dropout keys at this p
# (the mask costs the same at any p).
TUNE_DROPOUT = 0.1
# What a key over a 4-bit weight measures (on the tables' configs): its W decoded in the fused
# kernels' K loop, dequantized into a buffer for each use, and the torch path.
FOUR_BIT_CANDIDATES = ("in_loop", "buffer", TORCH)


# --- the candidate space ----------------------------------------------------------------------


class Alternative(NamedTuple):
    """One launch's table config with one field changed: ``"/2"`` halves it, ``"-1"`` lowers
    it by one, never below ``floor``; ``"off"`` turns a ``TMA`` flag the tables set off (the
    pointer kernel on the same tile). ``inspect --candidates`` checks that each build has no
    spills and uses tensor cores."""

    launch: str  # the Plan field: fwd, t_only, dx, grad_dA, grad_dB
    key: str
    how: str
    why: str
    floor: int = 16  # tl.dot needs 16 in every dimension (stages: see MIN_STAGES)


ALTERNATIVES = (
    # Hopper: each launch on the pointer kernel instead of TMA descriptors (nothing has measured
    # ours yet; Triton's own GEMMs gained 13-20% from them: triton-lang/triton#5461, #5726)
    Alternative("fwd", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("t_only", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("dx", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("grad_dA", "TMA", "off", "the pointer kernel: cp.async loads"),
    Alternative("grad_dB", "TMA", "off", "the pointer kernel: cp.async loads"),
    # the fused forward (y and T) and the dx pass: the same kernel, tiled over (M, N)
    Alternative("fwd", "BLOCK_N", "/2", "twice the tiles: fills the SMs when M x N is small"),
    Alternative("fwd", "BLOCK_M", "/2", "twice the tiles along M: small token counts"),
    Alternative("fwd", "num_stages", "-1", "less shared memory: two programs an SM may fit"),
    Alternative("dx", "BLOCK_N", "/2", "dx's N is the layer's K: narrow inputs (K = 1024)"),
    Alternative("dx", "BLOCK_M", "/2", "twice the tiles along M: small token counts"),
    Alternative("dx", "num_stages", "-1", "less shared memory: two programs an SM may fit"),
    # dropout's T-only pass (one column of tiles: BLOCK_M alone sets the grid)
    Alternative("t_only", "BLOCK_M", "/2", "twice the programs: one wave needs M / 32 >= SMs"),
    Alternative("t_only", "num_stages", "-1", "less shared memory: more programs resident"),
    # the dA / dB reductions over M (BLOCK_D: output tile width, BLOCK_M: reduction step)
    Alternative("grad_dA", "BLOCK_D", "/2", "more programs when K is narrow"),
    # (16-row steps spilled 6 instructions on sm_80 at rank 64: inspect --candidates)
    Alternative("grad_dA", "BLOCK_M", "/2", "a shorter step: more programs resident", floor=32),
    Alternative("grad_dB", "BLOCK_D", "/2", "more programs when N is narrow"),
    Alternative("grad_dB", "BLOCK_M", "/2", "a shorter step: more programs resident", floor=32),
)
# One pipeline stage would leave nothing to overlap.
MIN_STAGES = 2


def altered(config: dict, alternative: Alternative) -> dict | None:
    """``config`` with ``alternative`` applied, or ``None`` where the result is no candidate."""
    if alternative.how == "off":
        return {**config, "TMA": False} if config.get("TMA") else None
    value = config[alternative.key]
    new = value // 2 if alternative.how == "/2" else value - 1
    floor = MIN_STAGES if alternative.key == "num_stages" else alternative.floor
    if new < floor:
        return None
    return {**config, alternative.key: new}


def candidates(plan, dropout: bool) -> list[tuple[str, object]]:
    """``(name, plan)`` for the table plan and each valid alternative of it (``t_only``'s only
    with dropout: the tuned call computes dx, so without dropout no T-only launch runs)."""
    out = [("tables", plan)]
    for alt in ALTERNATIVES:
        if alt.launch == "t_only" and not dropout:
            continue
        config = altered(getattr(plan, alt.launch), alt)
        if config is not None:
            out.append(
                (
                    f"{alt.launch} {alt.key}{alt.how}",
                    dataclasses.replace(plan, **{alt.launch: config}),
                )
            )
    return out


# --- keys -------------------------------------------------------------------------------------


def m_bucket(m: int) -> int:
    """The next power of two >= ``m`` (>= 1). A plain loop: under ``torch.compile`` with dynamic
    shapes each comparison becomes a guard, and the bucket a constant of the graph."""
    bucket = 1
    while bucket < m:
        bucket *= 2
    return bucket


@functools.lru_cache(maxsize=16)
def device_fields(device: torch.device) -> tuple[str, str, str, str]:
    """``(GPU name, compute capability, torch version, Triton version)`` of ``device``."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    else:
        name, capability = "triton-interpreter", "cpu"
    return name, capability, torch.__version__, triton.__version__


def key_of(
    device: torch.device,
    dtype: torch.dtype,
    bucket: int,
    k: int,
    n: int,
    rank: int,
    dropout: bool,
    tf32: bool | None = None,
    base: str = "16bit",
) -> str:
    """The cache key: every fact a decision depends on, ``|``-separated. ``tf32``: PyTorch's
    ``allow_tf32`` for matmuls by default (it only counts for float32). ``base="nf4"``: over a
    4-bit weight, the key ends in ``|nf4`` (16-bit keys are as they always were)."""
    if tf32 is None:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    tf32 = dtype == torch.float32 and tf32
    fields = (*device_fields(device), str(dtype).removeprefix("torch."), bucket, k, n, rank)
    fields = (*fields, int(dropout), int(tf32), *((base,) if base != "16bit" else ()))
    return "|".join(str(f) for f in fields)


# --- the cache --------------------------------------------------------------------------------


def _package_version() -> str:
    import lora_kernels

    return lora_kernels.__version__


def cache_path() -> str:
    return os.path.expanduser(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


_decisions: dict[str, dict] | None = None  # the cache as read, plus what this process tuned
_warned: set = set()  # the paths (and failed writes) already warned about


def reset() -> None:
    """Forget what was read and decided in this process: the next look-up reads the file."""
    global _decisions
    _decisions = None
    _warned.clear()
    _forget_choices()


# choose()'s answers by their arguments (the layer's hot path), forgotten whenever a decision
# is stored. A dict, not functools.lru_cache: dynamo traces through lru_cache's wrapper, which
# would hide assume_constant_result.
_memo: dict[tuple, object] = {}


def _forget_choices() -> None:
    _memo.clear()


def _read(path: str) -> dict[str, dict]:
    """The decisions in ``path``; ``{}``, with one warning, if it is unusable."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        found = (data.get("version"), data.get("lora_kernels"))
        if found != (CACHE_VERSION, _package_version()):
            raise ValueError(
                f"written by another version: (format, lora_kernels) = {found}, this is "
                f"{(CACHE_VERSION, _package_version())} (decisions measured on other code)"
            )
        decisions = data.get("decisions")
        if not isinstance(decisions, dict) or not all(
            isinstance(d, dict) and d.get("provider") in (TORCH, TRITON) for d in decisions.values()
        ):
            raise ValueError("no valid 'decisions' object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"lora_kernels.tune: ignoring the cache {path}: {e}", stacklevel=3)
        return {}
    return decisions


def decisions() -> dict[str, dict]:
    """Every decision known to this process (the cache file, read once, and new ones)."""
    global _decisions
    if _decisions is None:
        _decisions = _read(cache_path())
    return _decisions


def store(key: str, decision: dict) -> None:
    """Record ``decision`` and rewrite the cache atomically, keeping what other processes wrote
    since it was read (a temporary file beside it, then ``os.replace``). A cache that can't be
    written (a read-only home) costs one warning: the decision then lives in this process only."""
    decisions()[key] = decision
    _forget_choices()
    path = cache_path()
    try:
        merged = {**_read(path), **decisions()}
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                data = {"version": CACHE_VERSION, "lora_kernels": _package_version()}
                json.dump({**data, "decisions": merged}, f, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        if ("write", path) not in _warned:
            _warned.add(("write", path))
            warnings.warn(
                f"lora_kernels.tune: can't write the cache {path} ({e}); decisions are kept "
                "for this process only",
                stacklevel=2,
            )


# --- measuring --------------------------------------------------------------------------------


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    fn()  # compile / warm
    samples = []
    for _ in range(CPU_REPS):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _layer_call(plan, x, weight, bias, lora_A, lora_B, dy, dropout_p):
    """One forward + backward of the layer (x and the adapters requiring grad, as in training),
    on the Triton path with ``plan``, or on the torch path when ``plan`` is ``None``. ``weight``:
    a tensor, or a function giving the weight for each use (a 4-bit base's strategy)."""
    from . import torch_path, triton_path

    def w():
        return weight() if callable(weight) else weight

    needs = (True, False, False, True, True)
    scaling, seed = 2.0, 1234
    if plan is None:
        _, S = torch_path.forward(x, w(), bias, lora_A, lora_B, scaling, dropout_p, seed)
        torch_path.backward(dy, x, w(), lora_A, lora_B, S, scaling, dropout_p, seed, needs)
    else:
        _, T = triton_path.forward(
            x, w(), bias, lora_A, lora_B, scaling, dropout_p, seed, plan=plan
        )
        triton_path.backward(
            dy, x, w(), lora_A, lora_B, T, scaling, dropout_p, seed, needs, plan=plan
        )


def measure(
    device: torch.device,
    dtype: torch.dtype,
    m: int,
    k: int,
    n: int,
    rank: int,
    dropout_p: float = 0.0,
    base: str = "16bit",
) -> dict:
    """Measure every candidate of one key and return the decision (not stored).

    Greedy over the launches: each alternative is timed on top of the best plan so far and kept
    where it is faster; then the torch path. A candidate that fails to build or launch (an older
    Triton, a GPU with less shared memory) is recorded with its error and skipped. ``base="nf4"``:
    over a (synthetic) 4-bit weight, ``measure_4bit``.
    """
    from . import triton_path

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    x, dy = rand(m, k), rand(m, n)
    four_bit = base == "nf4"
    weight = quant.synthetic_4bit(n, k, device, dtype, gen) if four_bit else rand(n, k, std=k**-0.5)
    bias = rand(n)
    lora_A, lora_B = rand(k, rank, std=k**-0.5), rand(rank, n, std=rank**-0.5)
    if four_bit:
        return measure_4bit(device, dtype, (x, weight, bias, lora_A, lora_B, dy), dropout_p)
    args = (x, weight, bias, lora_A, lora_B, dy, dropout_p)

    def timed(plan) -> float:
        return _time_ms(lambda: _layer_call(plan, *args), device)

    table = triton_path.plan_for(device, dtype, rank, dropout_p > 0.0)
    results = []
    best_plan, best_ms = table, None
    for name, plan in candidates(table, dropout_p > 0.0):
        if name != "tables":  # the alternative on top of the best so far
            launch = name.split()[0]
            plan = dataclasses.replace(best_plan, **{launch: getattr(plan, launch)})
        try:
            ms = timed(plan)
        except Exception as e:  # noqa: BLE001  (any build or launch failure: skip the candidate)
            results.append({"name": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        results.append({"name": name, "ms": ms})
        if best_ms is None or ms < best_ms:
            best_plan, best_ms = plan, ms
    torch_ms = timed(None)
    results.append({"name": TORCH, "ms": torch_ms})
    if best_ms is None:
        raise RuntimeError(f"no Triton candidate ran: {results}")
    tables_ms = next((r.get("ms") for r in results if r["name"] == "tables"), None)
    return {
        "provider": TORCH if torch_ms < best_ms else TRITON,
        "plan": dataclasses.asdict(best_plan),
        "ms": {"tables": tables_ms, "best_triton": best_ms, TORCH: torch_ms},
        "shape": [m, k, n, rank],
        "dropout_p": dropout_p,
        "candidates": results,
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_4bit(device: torch.device, dtype: torch.dtype, tensors, dropout_p: float) -> dict:
    """The decision for a key over a 4-bit weight (``tensors``: ``x``, the packed weight, the
    bias, the adapters, ``dy``): the two strategies on the tables' configs (decoded in the K
    loop, dequantized into a buffer for each use), then the torch path (dequantized by PyTorch
    ops). ``"strategy"`` names the faster strategy; ``ms["tables"]`` is the one the roofline
    threshold picks (what runs untuned)."""
    from . import triton_path

    x, packed, bias, lora_A, lora_B, dy = tensors
    table = triton_path.plan_for(device, dtype, lora_A.shape[1], dropout_p > 0.0)

    def weight(strategy):
        if strategy == TORCH:
            return lambda: quant.dequantize(packed, dtype)
        w = quant.packed(packed)
        if strategy == "in_loop":
            return lambda: w
        return lambda: triton_path.dequantize_op(
            w.data, w.scales, w.code, *w.shape, w.blocksize, dtype
        )

    results = []
    for name in FOUR_BIT_CANDIDATES:
        plan = None if name == TORCH else table
        args = (x, weight(name), bias, lora_A, lora_B, dy, dropout_p)
        try:
            ms = _time_ms(lambda: _layer_call(plan, *args), device)  # noqa: B023  (called here)
        except Exception as e:  # noqa: BLE001  (a build or launch failure: skip the candidate)
            results.append({"name": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        results.append({"name": name, "ms": ms})
    times = {r["name"]: r["ms"] for r in results if "ms" in r}
    strategies = [s for s in FOUR_BIT_CANDIDATES if s != TORCH and s in times]
    if not strategies or TORCH not in times:
        raise RuntimeError(f"a 4-bit candidate failed: {results}")
    strategy = min(strategies, key=times.get)
    untuned = "in_loop" if triton_path.in_loop(device, dtype, x.shape[0]) else "buffer"
    return {
        "provider": TORCH if times[TORCH] < times[strategy] else TRITON,
        "strategy": strategy,
        "plan": dataclasses.asdict(table),
        "ms": {"tables": times.get(untuned), "best_triton": times[strategy], TORCH: times[TORCH]},
        "shape": [x.shape[0], x.shape[1], dy.shape[1], lora_A.shape[1]],
        "dropout_p": dropout_p,
        "base": "nf4",
        "candidates": results,
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def tune(
    device: torch.device,
    dtype: torch.dtype,
    m: int,
    k: int,
    n: int,
    rank: int,
    dropout_p: float = 0.0,
    base: str = "16bit",
) -> tuple[str, dict]:
    """Measure the key of ``(device, dtype, m, k, n, rank, dropout)`` at ``M = m`` (``base="nf4"``:
    over a 4-bit weight), store the decision in the cache and return ``(key, decision)``."""
    from .kernels.common import padded_rank

    key = key_of(device, dtype, m_bucket(m), k, n, padded_rank(rank), dropout_p > 0.0, base=base)
    start = time.perf_counter()
    decision = measure(device, dtype, m, k, n, rank, dropout_p, base)
    decision["tune_s"] = round(time.perf_counter() - start, 3)
    store(key, decision)
    logger.info("lora_kernels.tune: %s -> %s (%s)", key, decision["provider"], decision["ms"])
    return key, decision


# --- looking decisions up (the layer's hot path) ------------------------------------------------

_forced = 0  # tune_model's context: tune whatever is missing, LORA_KERNELS_TUNE or not
_touched: list[str] | None = None


def tuning_enabled() -> bool:
    return _forced > 0 or os.environ.get(ENV_TUNE, "").strip().lower() in ("1", "true", "on", "yes")


@torch.compiler.assume_constant_result
def _active(device: torch.device, enabled: bool) -> bool:
    """Whether ``choose`` has anything to do on ``device``: tuning is on, or the cache holds a
    decision for this GPU and these versions."""
    memo = ("active", device, enabled)
    if memo not in _memo:
        prefix = "|".join(device_fields(device)) + "|"
        _memo[memo] = enabled or any(k.startswith(prefix) for k in decisions())
    return _memo[memo]


def lookup(
    m: int,
    k: int,
    n: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    dropout: float = 0.0,
    device: torch.device | str | None = None,
) -> dict | None:
    """The cached decision for a layer call of ``m`` tokens, ``nn.Linear(k, n)`` and ``rank``
    (``device``: the current CUDA device by default), or ``None``. Tunes nothing."""
    from .kernels.common import padded_rank

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = key_of(torch.device(device), dtype, m_bucket(m), k, n, padded_rank(rank), dropout > 0)
    return decisions().get(key)


@torch.compiler.assume_constant_result
def _choice(device, dtype, bucket, k, n, rank, dropout, tf32, auto, enabled, base) -> str:
    """``choose``'s answer for one key: ``""``, ``"torch"`` or a plan string."""
    memo = (device, dtype, bucket, k, n, rank, dropout, tf32, auto, enabled, base)
    if memo not in _memo:
        _memo[memo] = _decide(*memo)
    return _memo[memo]


def _decide(device, dtype, bucket, k, n, rank, dropout, tf32, auto, enabled, base) -> str:
    from .triton_path import Plan, plan_for, plan_to_str

    key = key_of(device, dtype, bucket, k, n, rank, dropout, tf32, base)
    decision = decisions().get(key)
    if decision is None and enabled:
        logger.warning(
            "lora_kernels.tune: tuning %s on its first call (once per key; cached in %s)",
            key,
            cache_path(),
        )
        p = TUNE_DROPOUT if dropout else 0.0
        _, decision = tune(device, dtype, bucket, k, n, rank, p, base)
    if _touched is not None:
        _touched.append(key)
    if decision is None:
        return ""
    if auto and decision["provider"] == TORCH:
        return TORCH
    # A decision stored before a Plan field existed takes the tables' value of that field.
    tables = dataclasses.asdict(plan_for(device, dtype, rank, dropout))
    return plan_to_str(Plan(**{**tables, **decision["plan"]}))


def choose(
    device, dtype, m, k, n, rank: int, dropout: bool, auto: bool, base: str = "16bit"
) -> str | None:
    """What a Triton-bound call runs: ``None`` (the table plan), ``"torch"`` (only for
    ``backend="auto"``, where the key's decision says the torch path is faster) or a tuned plan
    string. ``rank`` is the padded rank; ``base="nf4"`` for a 4-bit weight (then
    ``four_bit_strategy`` gives the decision's strategy). Tunes the key first when tuning is on
    and it has no decision."""
    enabled = tuning_enabled()
    if not _active(device, enabled):
        return None
    bucket = m_bucket(m)  # batches within a bucket share a compiled graph
    tf32 = torch.backends.cuda.matmul.allow_tf32
    k, n = _exact(k), _exact(n)
    choice = _choice(device, dtype, bucket, k, n, rank, dropout, tf32, auto, enabled, base)
    return choice or None


def four_bit_strategy(device, dtype, m, k, n, rank: int, dropout: bool) -> str:
    """The tuned strategy (``"in_loop"`` or ``"buffer"``) of a 4-bit call's key, or ``""``
    (none tuned: the roofline threshold decides). Looks up only: ``choose`` tunes."""
    if not _active(device, tuning_enabled()):
        return ""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return _strategy(device, dtype, m_bucket(m), _exact(k), _exact(n), rank, dropout, tf32)


@torch.compiler.assume_constant_result
def _strategy(device, dtype, bucket, k, n, rank, dropout, tf32) -> str:
    memo = ("strategy", device, dtype, bucket, k, n, rank, dropout, tf32)
    if memo not in _memo:
        key = key_of(device, dtype, bucket, k, n, rank, dropout, tf32, "nf4")
        _memo[memo] = (decisions().get(key) or {}).get("strategy", "")
    return _memo[memo]


def _exact(size) -> int:
    """``size`` as a Python int. Under ``torch.compile(dynamic=True)`` a weight's sizes may be
    symbolic, and an ``assume_constant_result`` function takes no symbolic argument: a binary
    search by comparisons, each a guard, specializes it (a layer's K and N never change)."""
    if isinstance(size, int):
        return size
    hi = 1
    while hi <= size:
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size >= mid else (lo, mid)
    return lo


@contextlib.contextmanager
def _tuning():
    global _forced, _touched
    _forced += 1
    previous, _touched = _touched, []
    _forget_choices()  # every key met inside is looked up afresh (and recorded)
    try:
        yield _touched
    finally:
        _forced -= 1
        _touched = previous
        _forget_choices()


def tune_model(model: torch.nn.Module, example_inputs) -> dict[str, dict]:
    """Tune every key one forward of ``model`` meets (backward runs its forward's plan, so this
    tunes the whole step), whether or not ``LORA_KERNELS_TUNE`` is set; returns ``{key:
    decision}`` for those keys. ``example_inputs``: a tensor, a tuple of positional inputs or a
    dict of keyword inputs, shaped as in training (the M bucket is part of the key). Keep the
    model in the mode it will run in: ``train()`` tunes the dropout keys."""
    with _tuning() as touched, torch.no_grad():
        if isinstance(example_inputs, dict):
            model(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            model(*example_inputs)
        else:
            model(example_inputs)
    return {key: decisions()[key] for key in dict.fromkeys(touched) if key in decisions()}


# --- the command line ---------------------------------------------------------------------------

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if match is None or 0 in (dims := tuple(int(g) for g in match.groups())):
        raise argparse.ArgumentTypeError(f"expected MxKxNxR of positive ints, got {text!r}")
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_kernels.tune",
        description="Tune LoRA layer calls on this GPU and store the decisions in the cache.",
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        required=True,
        metavar="MxKxNxR",
        help="tokens x in x out x rank (repeatable)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0 or > 0)")
    parser.add_argument(
        "--base",
        choices=("16bit", "nf4"),
        default="16bit",
        help="nf4: over a 4-bit base (a synthetic NF4 weight): its two strategies and torch",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per shape")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif triton_interpreter_enabled():
        device = torch.device("cpu")
    else:
        print("lora_kernels.tune needs a CUDA GPU (or TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    for m, k, n, r in args.shape:
        key, decision = tune(device, DTYPES[args.dtype], m, k, n, r, args.dropout, args.base)
        if args.json:
            print(json.dumps({"key": key, **decision}))
        else:
            ms = decision["ms"]
            print(
                f"{m}x{k}x{n}x{r} {args.dtype} dropout={args.dropout:g}: {decision['provider']}"
                + (f" ({decision['strategy']})" if "strategy" in decision else "")
                + " "
                f"(tables {ms['tables']:.4g} ms, best Triton {ms['best_triton']:.4g} ms, "
                f"torch {ms[TORCH]:.4g} ms) -> {cache_path()}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
