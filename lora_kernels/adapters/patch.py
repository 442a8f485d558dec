"""peft in place: peft's own LoRA layers compute their forward through ``lora_linear``.

    lora_kernels.patch_peft(model)   # the peft LoRA layers of this model
    lora_kernels.patch_peft()        # every peft LoRA layer, present and future

Nothing of peft's changes but the forward of its LoRA ``Linear`` (and, with bitsandbytes, its
4-bit ``Linear4bit``): the module tree, the parameter objects, the state-dict keys and peft's
config stay as they are, so every peft method (``save_pretrained``, ``load_adapter``,
``set_adapter``, ``disable_adapter()``, merging, ``unload``, ...) and the Trainer's
checkpoints work as without us. The fused call reads the adapters as views of peft's own
parameters (``lora_A.weight.t()``), so their gradients land there.

A call our kernels can't serve exactly as peft computes it runs peft's own forward instead,
for that call (``fallback_reason`` says why; each reason is logged once and counted in
``PatchReport.calls``).

With a model, each layer's class is swapped for a subclass whose ``forward`` is ours (as
FSDP2's ``fully_shard`` swaps a module's class; ``isinstance`` still holds, and the class
survives ``copy.deepcopy`` and pickling). Without a model, peft's classes themselves take our
``forward``, so layers built later (``SFTTrainer(peft_config=...)``, ``get_peft_model`` inside
a script) run it too.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch
from torch import nn

from .. import engines, quant
from ..layer import lora_forward
from ..validation import SUPPORTED_DTYPES
from .matching import peft_linear_classes

logger = logging.getLogger("lora_kernels")

# peft's own forward of each class we patch (captured before the global form replaces it).
_PEFT_FORWARD: dict[type, object] = {}
# The peft classes whose forward is ours for every instance (the global form).
_GLOBAL: set[type] = set()
# Calls that ran peft's own forward, by reason, since the process started.
_CALLS: collections.Counter = collections.Counter()
_LOGGED: set[str] = set()


@dataclasses.dataclass
class PatchReport:
    """What ``patch_peft`` found.

    Attributes:
        fused: the patched layers (by name) that run lora_kernels in their present state.
        fallback: ``{reason: [layer names]}``: the peft LoRA layers that run peft's own forward
            in their present state (a layer's state can change: ``disable_adapter()``,
            ``set_adapter``, merging).
        calls: the calls that ran peft's own forward, by reason, since the process started (a
            live count, shared by every report).
        every_layer: ``True`` for the global form (``patch_peft()``), which has no model to list.
    """

    fused: list[str]
    fallback: dict[str, list[str]]
    calls: collections.Counter
    every_layer: bool = False

    def __str__(self) -> str:
        if self.every_layer:
            return "lora_kernels.patch_peft: every peft LoRA Linear runs lora_kernels"
        text = f"lora_kernels.patch_peft: {len(self.fused)} peft LoRA layers run lora_kernels"
        for reason, names in self.fallback.items():
            text += f"; {len(names)} run peft's own forward: {reason}"
        return text


def _peft_forward(module: nn.Module):
    """peft's own forward for ``module``: that of the first class of its MRO we patched."""
    return next(_PEFT_FORWARD[cls] for cls in type(module).__mro__ if cls in _PEFT_FORWARD)


def _remember(cls: type) -> None:
    if cls not in _PEFT_FORWARD:
        _PEFT_FORWARD[cls] = cls.__dict__["forward"]


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook (a forward hook, a pre-hook, a backward
    hook) that a fused call, reading its weight without calling it, must not skip: any but
    DeepSpeed ZeRO-3's, which only gather and release (``engines.engine_hook``)."""
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    return any(not engines.engine_hook(h) for found in hooks for h in found.values())


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s (bitsandbytes' 8-bit and other
    quantized linears subclass it with forwards of their own)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def fallback_reason(layer: nn.Module, x=None, args=(), kwargs=None) -> str | None:
    """Why this call of a peft LoRA ``layer`` (input ``x``, peft's extra ``args`` / ``kwargs``)
    runs peft's own forward, or ``None`` when lora_kernels computes exactly what peft would.
    With ``x`` ``None``: what the layer's present state alone says."""
    kwargs = kwargs or {}
    if kwargs.get("adapter_names") is not None:
        return "adapter_names (a mixed batch of adapters)"
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra arguments for the base layer or a LoRA variant"
    if layer.disable_adapters:
        return "adapters disabled (peft runs the base layer alone)"
    if layer.merged:
        return "merged adapter (peft runs the merged base layer)"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return "no active adapter on this layer (peft runs the base layer alone)"
    if len(active) > 1:
        return "several active adapters"
    adapter = active[0]
    dora = _dora(layer, adapter)
    if adapter in getattr(layer, "lora_variant", {}) and dora is None:
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (a Conv1D base)"
    base = layer.base_layer  # (a nested adapter layer is neither kind below)
    if engines.fsdp_unit(base):
        return "base layer is an FSDP unit of its own (peft's forward calls it: it unshards)"
    four_bit = quant.is_4bit(getattr(base, "weight", None))
    if not (_plain_linear(base) or (four_bit and type(base).__name__ == "Linear4bit")):
        return f"base layer {type(base).__name__} (neither nn.Linear nor a 4-bit Linear4bit)"
    if four_bit and getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return "4-bit weight repacked for bitsandbytes' CPU kernel"
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if not (_plain_linear(lora_A) and _plain_linear(lora_B)):
        return f"adapter modules {type(lora_A).__name__} / {type(lora_B).__name__}"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout {type(dropout).__name__}"
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)) or _global_hooks():
        return "hooks on the base layer or the adapters (e.g. accelerate's offload)"
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        return f"input of type {getattr(x, 'dtype', type(x).__name__)}"
    if (
        not getattr(layer, "cast_input_dtype_enabled", True)
        and x.dtype != lora_A.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    return None


def _fallback(reason: str) -> None:
    _CALLS[reason] += 1
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.warning(
            "lora_kernels.patch_peft: a call runs peft's own forward: %s (logged once per "
            "reason; counted in PatchReport.calls)",
            reason,
        )


def _forward(layer, x, *args, **kwargs):
    """The forward of a patched peft LoRA layer: lora_linear where it computes what peft
    would, peft's own forward for the call otherwise."""
    reason = fallback_reason(layer, x, args, kwargs)
    if reason is not None:
        _fallback(reason)
        return _peft_forward(layer)(layer, x, *args, **kwargs)
    adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dora = _dora(layer, adapter)
    magnitude = None if dora is None else dora.weight
    engines.gather_with(layer, (lora_A, lora_B, magnitude))  # (the base's: lora_forward)
    scaling = float(layer.scaling[adapter])
    return lora_forward(
        layer.base_layer, x, lora_A.t(), lora_B.t(), scaling, p, owner=layer, magnitude=magnitude
    )


def _dora(layer, adapter: str):
    """peft's DoRA module of ``adapter`` on a LoRA ``Linear`` (its ``weight`` is the
    magnitude), or ``None`` where the adapter is not DoRA (or a DoRA we don't run)."""
    if not getattr(layer, "use_dora", {}).get(adapter, False):
        return None
    vectors = getattr(layer, "lora_magnitude_vector", {})
    module = vectors[adapter] if adapter in vectors else None
    if type(module).__name__ != "DoraLinearLayer" or module.fan_in_fan_out:
        return None
    return module


class PatchedLoRA:
    """Mixed into a peft LoRA layer's class by ``patch_peft(model)``: ``forward`` is ours."""

    forward = _forward

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle can't find it by name: rebuild it on load
        # (copy.deepcopy goes through here too).
        return _new_patched, (_peft_class(self),), self.__dict__.copy()


def _peft_class(layer: nn.Module) -> type:
    """The peft class under a patched layer's class."""
    return next(c for c in type(layer).__mro__ if c in _PEFT_FORWARD)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _remember(cls)
        names = {"__module__": __name__, "__qualname__": cls.__name__}
        _PATCHED_CLASSES[cls] = type(cls.__name__, (PatchedLoRA, cls), names)
    return _PATCHED_CLASSES[cls]


def _new_patched(cls: type):
    return object.__new__(_patched_class(cls))


def _require_peft(what: str) -> None:
    try:
        import peft  # noqa: F401
    except ImportError as missing:
        raise ImportError(f"{what} needs peft: pip install 'lora_kernels[peft]'") from missing


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def patch_peft(model: nn.Module | None = None) -> PatchReport:
    """Make peft's LoRA layers compute through lora_kernels, changing nothing else.

    Args:
        model: a ``PeftModel``, or any module holding peft LoRA layers: each peft LoRA ``Linear``
            in it (and each bitsandbytes 4-bit LoRA ``Linear4bit``) runs lora_kernels from now
            on. ``None``: every peft LoRA layer, present and future, the form for code that
            builds its peft model itself (TRL's ``SFTTrainer(peft_config=...)``, axolotl).

    Returns:
        a :class:`PatchReport`: the layers that run fused, those that run peft's own forward
        and why, and (live) the calls that fell back. Calling it twice is harmless.

    A call falls back to peft's own forward, for that call, where ours would compute something
    else: several active adapters, ``adapter_names``, merged or disabled adapters, LoRA variants
    other than DoRA, ``lora_bias``, ``fan_in_fan_out``, a base layer that is neither an
    ``nn.Linear`` nor a 4-bit ``Linear4bit``, hooks on the base layer or the adapters. peft's
    DoRA layers (over 4-bit bases too) run :func:`lora_kernels.function.dora_linear`.
    Raises ``ValueError`` (changing nothing) when ``model`` holds no peft LoRA layer.
    """
    _require_peft("patch_peft")
    classes = peft_linear_classes()
    if model is None:
        for cls in classes:
            _remember(cls)
            cls.forward = _forward
            _GLOBAL.add(cls)
        return PatchReport([], {}, _CALLS, every_layer=True)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"patch_peft: {type(model).__name__} holds no peft LoRA layer (lora_kernels "
            "LoRALayers, from inject_lora or from_peft, run lora_kernels already)"
        )
    fused, fallback = [], collections.defaultdict(list)
    for name, layer in layers.items():
        if not isinstance(layer, classes):
            fallback[f"peft {type(layer).__name__} layers are not fused"].append(name)
            continue
        if not isinstance(layer, PatchedLoRA):
            layer.__class__ = _patched_class(type(layer))
        reason = fallback_reason(layer)
        (fallback[reason].append(name) if reason else fused.append(name))
    return PatchReport(fused, dict(fallback), _CALLS)


def unpatch_peft(model: nn.Module | None = None) -> int:
    """Undo :func:`patch_peft`: the layers of ``model`` patched by ``patch_peft(model)`` get
    peft's own class back; without a model, peft's classes get their own forward back (the
    global form ends). Returns how many layers (or classes) were restored. Layers patched one
    model at a time stay patched when the global form ends, and the global form, while on,
    runs every peft LoRA layer through lora_kernels, unpatched or not."""
    if model is None:
        for cls in _GLOBAL:
            cls.forward = _PEFT_FORWARD[cls]
        restored, _ = len(_GLOBAL), _GLOBAL.clear()
        return restored
    restored = 0
    for module in model.modules():
        if isinstance(module, PatchedLoRA):
            module.__class__ = _peft_class(module)
            restored += 1
    if _GLOBAL:
        logger.warning(
            "lora_kernels.unpatch_peft(model): the global form (patch_peft()) is still on, so "
            "these layers keep running lora_kernels; unpatch_peft() ends it"
        )
    return restored
