"""What the sharding engines need from a layer that reads its base weight without calling the
base module (the fused call reads ``W`` and the adapters as operands of one kernel).

- **DeepSpeed ZeRO-3** partitions every parameter to a ``(0,)`` placeholder and gathers those of
  a module in that module's forward pre-hook. A parameter read by another module's forward is
  that module's *external parameter* (``deepspeed.zero.register_external_parameter``): then the
  owner's hooks fetch (and, after the first step, prefetch) it with the owner's own.
  :func:`gather_with` registers what a layer reads; DeepSpeed's hooks on the modules the fused
  call does not run (the base linear, peft's ``lora_A`` / ``lora_B``) fetch and release nothing
  else (:func:`engine_hook`).
- **FSDP** (1 and 2) unshards a unit's parameters in the unit's own forward. A base linear
  wrapped as a unit of its own is not called by the fused path, so its weight would stay a shard:
  :func:`fsdp_unit` says when the base must be called instead.
- **Saving** reads whole tensors: :func:`gathered` gathers what is partitioned, on every rank.

Nothing here imports DeepSpeed: a tensor carrying ZeRO-3's attributes means it is imported.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

# The modules whose hooks only gather and release parameters (DeepSpeed ZeRO-3's).
_ZERO3_HOOKS = "deepspeed.runtime.zero."


def zero3_param(t: object) -> bool:
    """Whether ``t`` is a parameter DeepSpeed ZeRO-3 partitions."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


def gather_with(owner: nn.Module, tensors) -> None:
    """Register each ZeRO-3 parameter of ``tensors`` that ``owner``'s forward reads without
    calling its module as an external parameter of ``owner``, so ZeRO-3 gathers (and, after
    the first step, prefetches) it with ``owner``'s own. One not yet gathered for this call (the
    first call, outside the engine's forward: ``model.generate``, evaluation loops) is gathered
    now, and released with ``owner``'s after its forward. Idempotent; nothing happens without
    ZeRO-3."""
    for t in tensors:
        if zero3_param(t) and id(t) not in getattr(owner, "_external_params", {}):
            import deepspeed

            deepspeed.zero.register_external_parameter(owner, t)
            if t.ds_status.name == "NOT_AVAILABLE":
                t.all_gather()


def _origins(fn: object, depth: int = 3):
    """The modules of ``fn`` and of the functions it wraps (``__wrapped__``, closures)."""
    yield getattr(fn, "__module__", None) or ""
    if depth == 0:
        return
    inner = [getattr(fn, "__wrapped__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    for f in inner:
        if callable(f) and not isinstance(f, type):
            yield from _origins(f, depth - 1)


def engine_hook(hook: object) -> bool:
    """Whether a module hook is one of DeepSpeed ZeRO-3's (behind DeepSpeed's own wrappers),
    which gather and release the module's parameters and do nothing else: skipping the module's
    call skips nothing the fused call needs once :func:`gather_with` registered what it reads."""
    origins = list(_origins(hook))
    return origins[0].startswith("deepspeed.") and any(o.startswith(_ZERO3_HOOKS) for o in origins)


def fsdp1_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP1 unit (``FullyShardedDataParallel``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    unit = getattr(fsdp, "FullyShardedDataParallel", None)
    return unit is not None and isinstance(module, unit)


def fsdp_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP unit of its own, FSDP1's (``FullyShardedDataParallel``) or
    FSDP2's (``fully_shard``: an ``FSDPModule``): its parameters are whole only inside its own
    forward."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    unit = getattr(fsdp, "FSDPModule", None)
    return fsdp1_unit(module) or (unit is not None and isinstance(module, unit))


def check_whole(weight: torch.Tensor, what: str) -> None:
    """Raise a ``RuntimeError`` that names the engine when the base ``weight`` a fused call is
    about to read is still a shard: ZeRO-3's ``(0,)`` placeholder, FSDP1's flat 1-D shard, or
    FSDP2's ``DTensor``."""
    if _dtensor(weight):
        raise RuntimeError(
            f"{what}: the base weight is a DTensor (placements {weight.placements}), as FSDP2 "
            "leaves a parameter outside its unit's forward: apply fully_shard to the LoRA layer "
            "or a module above it (a frozen linear with a fully_shard of its own is called, "
            "which unshards it), or call the model inside its root's forward"
        )
    if weight.dim() == 2 and weight.numel() > 0:
        return
    shape = tuple(weight.shape)
    if zero3_param(weight):
        raise RuntimeError(
            f"{what}: the base weight is DeepSpeed ZeRO-3's partition (shape {shape}), not "
            f"gathered for this call. Run the model through the DeepSpeed engine (its hooks "
            "gather the weight with the layer: lora_kernels registers it as the layer's external "
            "parameter), or gather it first with deepspeed.zero.GatheredParameters"
        )
    if weight.dim() == 1:
        raise RuntimeError(
            f"{what}: the base weight is a flat shard (shape {shape}), as FSDP leaves a "
            "parameter outside its unit's forward. Wrap the LoRA layer (or a module above it) "
            "as the FSDP unit, not the linear inside it, or call the model inside "
            "FullyShardedDataParallel.summon_full_params"
        )


def _dtensor(t: object) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP2 ``DTensor`` shard gathered (a collective: every rank calls it)."""
    return t.full_tensor() if _dtensor(t) else t


@contextlib.contextmanager
def gathered(model: nn.Module, reads: set[int]):
    """Inside, the parameters of ``model`` whose ids are in ``reads`` read whole: ZeRO-3's
    through ``deepspeed.zero.GatheredParameters`` (those alone: the frozen base stays
    partitioned), FSDP1 units' through ``FullyShardedDataParallel.summon_full_params`` (all of
    them: FSDP1 unshards a unit's parameters together; offloaded to CPU from a GPU); FSDP2's
    ``DTensor`` s are gathered one at a time by :func:`whole`. Nothing is written back. A
    collective where anything is partitioned: every rank must enter it."""
    with contextlib.ExitStack() as stack:
        zero3 = [p for p in model.parameters() if id(p) in reads and zero3_param(p)]
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        if any(fsdp1_unit(m) for m in model.modules()):
            from torch.distributed.fsdp import FullyShardedDataParallel

            # NOTE: offloading from CPU to CPU breaks (torch 2.13: a storage of size 0), and
            # only GPU memory needs sparing; the GPU branch is not run on our machines.
            on_gpu = any(p.device.type != "cpu" for p in model.parameters())
            stack.enter_context(
                FullyShardedDataParallel.summon_full_params(
                    model, writeback=False, offload_to_cpu=on_gpu
                )
            )
        yield


# The name parts FSDP1, activation checkpointing and torch.compile insert into module names.
_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def clean_name(name: str) -> str:
    """A module name without the wrappers' parts (FSDP1's ``_fsdp_wrapped_module``, activation
    checkpointing's, torch.compile's), as their state dicts write it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
