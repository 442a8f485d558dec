"""On-device tuning: which provider runs each layer call, measured on the GPU it runs on.

    python -m lora_kernels.tune --shape MxKxNxR [--dtype bfloat16] [--dropout 0.1] [--base nf4]
                                [--json]
    LORA_KERNELS_TUNE=1 python train.py          # tune each new key on its first call
    lora_kernels.tune.tune_model(model, example_inputs)

One decision per key (``tune.cache``: the GPU, the versions, the dtype, the M bucket, K, N, the
padded rank, dropout and TF32 on or off). The decision names the provider of the layer call:
``"triton"``, with a launch config per launch, or ``"torch"`` (the torch path: cuBLAS ``addmm``
+ ``addmm_``) where that measured faster (over a 4-bit weight, keys ending in ``|nf4``: the
decoding strategy, in the K loop or into a buffer, or the torch path). Candidates
(``tune.space``) are measured forward + backward together (``timing``); the fastest wins, so no
GPU we have never seen runs the layer slower than its own cuBLAS path.

Decisions live in the cache (``tune.cache``: ``$LORA_KERNELS_CACHE``, default
``~/.cache/lora_kernels/tune.json``). Without tuning, a call runs the config tables, unless the
cache holds a decision for its key. Under ``torch.compile`` the decision is a constant of the
graph, as the table plan is.

Under ``TRITON_INTERPRET=1`` (no GPU) the whole flow runs on CPU tensors, timed with
``time.perf_counter``: the timings mean nothing there, the machinery is real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time

import torch

from .. import env, quant, timing
from .cache import (  # noqa: F401  (public here: the tuner's keys and cache)
    CACHE_VERSION,
    DEFAULT_CACHE,
    ENV_CACHE,
    cache_path,
    decisions,
    device_fields,
    key_of,
    m_bucket,
    reset,
    store,
)
from .cache import derived as _memo
from .space import (  # noqa: F401  (public here: the candidate space)
    ALTERNATIVES,
    FOUR_BIT_CANDIDATES,
    MIN_STAGES,
    TORCH,
    TRITON,
    Alternative,
    altered,
    candidates,
)

logger = logging.getLogger(__name__)

ENV_TUNE = "LORA_KERNELS_TUNE"
# A key knows dropout on or off, not p: a first-call tuning measures dropout keys at this p
# (the mask costs the same at any p).
TUNE_DROPOUT = 0.1


# --- measuring --------------------------------------------------------------------------------


def measure(device, dtype, m: int, k: int, n: int, rank: int, dropout_p=0.0, base="16bit") -> dict:
    """Measure every candidate of one key (as ``tune``'s arguments) and return the decision (not
    stored).

    Greedy over the launches: each alternative is timed on top of the best plan so far and kept
    where it is faster; then the torch path. A candidate that fails to build or launch (an older
    Triton, a GPU with less shared memory) is recorded with its error and skipped. ``base="nf4"``:
    over a (synthetic) 4-bit weight, ``measure_4bit``.
    """
    from .. import triton_path

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
        return timing.time_ms(lambda: timing.layer_call(plan, *args), device)

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
    from .. import triton_path

    x, packed, bias, lora_A, lora_B, dy = tensors
    table = triton_path.plan_for(device, dtype, lora_A.shape[1], dropout_p > 0.0)

    def weight(strategy):
        if strategy == TORCH:
            return lambda: quant.dequantize(packed, dtype)
        return lambda: triton_path.base_weight(packed, dtype, strategy)

    results = []
    for name in FOUR_BIT_CANDIDATES:
        plan = None if name == TORCH else table
        args = (x, weight(name), bias, lora_A, lora_B, dy, dropout_p)
        try:
            ms = timing.time_ms(lambda: timing.layer_call(plan, *args), device)  # noqa: B023
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
    from ..kernels.common import padded_rank

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
    return _forced > 0 or env.flag(ENV_TUNE)


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
    from ..kernels.common import padded_rank

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
    from ..triton_path import Plan, plan_for, plan_to_str

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


def dispatch(
    device, dtype, m, k, n, rank: int, dropout: bool, auto: bool, four_bit: bool
) -> tuple[str | None, str | None]:
    """What a Triton-bound layer call runs, as ``(plan, strategy)``.

    ``plan``: the launch plan string (the key's tuned decision where the cache has one, else the
    tables': ``triton_path.plan_string``), or ``None`` where the key's decision for
    ``backend="auto"`` (``auto``) is the torch path. ``strategy``: how a 4-bit W (``four_bit``)
    is read, ``"in_loop"`` or ``"buffer"`` (``triton_path.in_loop``: forced, tuned, or by the
    roofline threshold), ``"torch"`` on the torch path; ``None`` for a 16-bit W. ``rank`` is the
    adapters' rank; the rest as in ``choose``."""
    from .. import triton_path
    from ..kernels.common import padded_rank

    padded = padded_rank(rank)  # a constant even when the size is symbolic
    plan = choose(device, dtype, m, k, n, padded, dropout, auto, "nf4" if four_bit else "16bit")
    if plan == TORCH:
        return None, TORCH if four_bit else None
    if plan is None:
        plan = triton_path.plan_string(device, dtype, padded, dropout)
    if not four_bit:
        return plan, None
    tuned = four_bit_strategy(device, dtype, m, k, n, padded, dropout)
    return plan, "in_loop" if triton_path.in_loop(device, dtype, m, tuned) else "buffer"


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
    _memo.clear()  # every key met inside is looked up afresh (and recorded)
    try:
        yield _touched
    finally:
        _forced -= 1
        _touched = previous
        _memo.clear()


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
