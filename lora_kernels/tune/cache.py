"""The tuner's keys and its cache of decisions.

A key is every fact a decision depends on: the GPU (name, compute capability), the torch and
Triton versions, the dtype, the M bucket (the next power of two of the token count), K, N, the
padded rank, dropout on or off and TF32 on or off (and ``|nf4`` over a 4-bit weight).

Decisions live in a JSON file, ``$LORA_KERNELS_CACHE`` (default
``~/.cache/lora_kernels/tune.json``), read once and written atomically. A corrupt, unreadable or
foreign-version file is ignored with one warning; a cache that can't be written costs one
warning, and the decision then lives in this process only.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import torch

from .._version import __version__
from ..timing import write_json

CACHE_VERSION = 1
ENV_CACHE = "LORA_KERNELS_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "lora_kernels", "tune.json")
PROVIDERS = ("torch", "triton")


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


def cache_path() -> str:
    return os.path.expanduser(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


_decisions: dict[str, dict] | None = None  # the cache as read, plus what this process tuned
_warned: set = set()  # the paths (and failed writes) already warned about
# Answers derived from the decisions (the tuner's look-ups on the layer's hot path), forgotten
# whenever a decision is stored. A dict, not functools.lru_cache: dynamo traces through
# lru_cache's wrapper, which would hide assume_constant_result.
derived: dict[tuple, object] = {}


def reset() -> None:
    """Forget what was read and decided in this process: the next look-up reads the file."""
    global _decisions
    _decisions = None
    _warned.clear()
    derived.clear()


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
        if found != (CACHE_VERSION, __version__):
            raise ValueError(
                f"written by another version: (format, lora_kernels) = {found}, this is "
                f"{(CACHE_VERSION, __version__)} (decisions measured on other code)"
            )
        decisions = data.get("decisions")
        if not isinstance(decisions, dict):
            raise ValueError("no valid 'decisions' object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"lora_kernels.tune: ignoring the cache {path}: {e}", stacklevel=3)
        return {}
    bad = sorted(key for key, d in decisions.items() if not _valid(d))
    if bad:
        if path not in _warned:
            _warned.add(path)
            warnings.warn(
                f"lora_kernels.tune: ignoring the cache {path}'s {len(bad)} malformed decisions "
                f"(each needs a provider of {PROVIDERS}, and a 'plan' object for 'triton'): "
                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}",
                stacklevel=3,
            )
        decisions = {k: d for k, d in decisions.items() if k not in bad}
    return decisions


def _valid(decision: object) -> bool:
    """Whether a stored decision can be used: a known provider; a Triton one with its plan
    (launch configs by name; a field missing takes the tables' value)."""
    if not isinstance(decision, dict) or decision.get("provider") not in PROVIDERS:
        return False
    plan = decision.get("plan")
    if decision["provider"] == "torch":
        return plan is None or isinstance(plan, dict)
    return isinstance(plan, dict) and all(isinstance(k, str) for k in plan)


def decisions() -> dict[str, dict]:
    """Every decision known to this process (the cache file, read once, and new ones)."""
    global _decisions
    if _decisions is None:
        _decisions = _read(cache_path())
    return _decisions


def store(key: str, decision: dict) -> None:
    """Record ``decision`` and rewrite the cache atomically, keeping what other processes wrote
    since it was read. A cache that can't be written (a read-only home) costs one warning: the
    decision then lives in this process only."""
    decisions()[key] = decision
    derived.clear()
    path = cache_path()
    try:
        merged = {**_read(path), **decisions()}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = {"version": CACHE_VERSION, "lora_kernels": __version__, "decisions": merged}
        write_json(path, data)
    except OSError as e:
        if ("write", path) not in _warned:
            _warned.add(("write", path))
            warnings.warn(
                f"lora_kernels.tune: can't write the cache {path} ({e}); decisions are kept "
                "for this process only",
                stacklevel=2,
            )
