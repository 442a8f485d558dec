"""``inject_lora``: LoRA on any model, each matching ``nn.Linear`` wrapped in a ``LoRALayer``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..layer import INITS, LoRALayer
from ..validation import check_adapter_dtype
from .matching import (
    ALL_LINEAR,
    freeze_all_but_trained,
    frozen_back_on_error,
    linear_names,
    lora_layers,
    mark_to_save,
    matches,
    modules_to_save_in,
    other_names,
    output_layer_name,
    read_directly,
    replace_modules,
    resolve_modules_to_save,
    under,
)


def adapted(
    linear: nn.Linear,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor | None = None,
    **kwargs,
) -> LoRALayer:
    """A ``LoRALayer`` around ``linear`` carrying peft-layout weights ``lora_A`` ``(r, in)`` and
    ``lora_B`` ``(out, r)`` (and DoRA's ``magnitude`` ``(out,)``: then a DoRA layer), in
    ``linear``'s train / eval mode."""
    use_dora = magnitude is not None
    layer = LoRALayer.from_linear(linear, rank=lora_A.shape[0], use_dora=use_dora, **kwargs)
    with torch.no_grad():
        layer.lora_A.copy_(lora_A.t())
        layer.lora_B.copy_(lora_B.t())
        if use_dora:
            layer.magnitude.copy_(magnitude)
    return layer.train(linear.training)


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "lora",
    adapter_dtype: torch.dtype | None = None,
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` with a ``LoRALayer`` sharing its weight.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        target_modules: module names as peft takes them: a list (a name matches an entry equal
            to it or to its last dotted parts, ``"query"`` matches ``"...attention.self.query"``),
            a regex string matched against full names, or ``"all-linear"`` (every linear but the
            output head, the modules to save and those that already have LoRA).
        rank, alpha, dropout, use_rslora, init, adapter_dtype, use_dora: as in
            :class:`LoRALayer`
            (``adapter_dtype=torch.float32`` on a bfloat16 model: float32 adapters, as peft).
        modules_to_save: modules trained in full beside the adapters and saved with them
            (peft's ``modules_to_save``, e.g. ``["classifier"]``), matched by the list rule.

    Every other parameter is frozen; only ``lora_A`` / ``lora_B`` (and the modules to save)
    train. Raises ``ValueError``, before changing anything, when nothing matches (listing the
    model's linear layers), when a target already has LoRA (a ``LoRALayer`` is never wrapped
    again) or is a module to save, and when a ``modules_to_save`` entry matches nothing.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    check_adapter_dtype(adapter_dtype)
    existing = list(lora_layers(model))
    to_save = resolve_modules_to_save(model, modules_to_save, existing)
    saved = list(modules_to_save_in(model)) + to_save
    linears = linear_names(model, exclude=existing)
    if target_modules == ALL_LINEAR:
        head = output_layer_name(model)
        names = [n for n in linears if n != head and under(n, saved) is None]
    else:
        if not isinstance(target_modules, (str, list, tuple, set)):
            raise TypeError(
                f"target_modules must be a str or a list of str, got {target_modules!r}"
            )
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        if not isinstance(targets, str) and not all(isinstance(t, str) for t in targets):
            wrong = next(t for t in targets if not isinstance(t, str))
            raise TypeError(
                f"target_modules entries must be module names (str), got {wrong!r} "
                f"({type(wrong).__name__})"
            )
        matched = [n for n, _ in model.named_modules() if n and matches(n, targets)]
        has_lora = sorted({under(n, existing) for n in matched} - {None})
        if has_lora:
            raise ValueError(
                f"target_modules={target_modules!r} names modules that already have LoRA: "
                f"{', '.join(has_lora)} (a LoRALayer is never wrapped again)"
            )
        in_saved = [n for n in matched if under(n, saved)]
        if in_saved:
            raise ValueError(
                f"target_modules matched modules to save (trained in full, not with LoRA): "
                f"{', '.join(in_saved)}"
            )
        not_linear = [n for n in matched if n not in linears]
        if not_linear:
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in not_linear)
            raise ValueError(f"target_modules matched modules that are not nn.Linear: {kinds}")
        names = matched
    direct = read_directly(model)
    if target_modules == ALL_LINEAR:
        skipped = [n for n in names if n in direct]
        if skipped:
            warnings.warn(
                "inject_lora('all-linear') leaves out linear layers whose parent reads their "
                f"weight itself (LoRA there would never run): {', '.join(skipped)}",
                stacklevel=2,
            )
        names = [n for n in names if n not in direct]
    refused = [f"{n}: {direct[n]}" for n in names if n in direct]
    if refused:
        raise ValueError(
            "target_modules matched linear layers whose parent reads their weight itself, so "
            f"LoRA there would never run: {'; '.join(refused)}"
        )
    twice = other_names(model, names)
    if twice:
        shown = "; ".join(f"{n} (also {', '.join(o)})" for n, o in twice.items())
        raise ValueError(
            "target_modules matched a linear layer reachable under more than one name, which "
            f"LoRA would replace under one name only: {shown}"
        )
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear; the model's linear layers "
            f"without LoRA are: {', '.join(linears) or '(none)'}"
            + (f" ({len(existing)} layers already have LoRA)" if existing else "")
        )
    # Build every layer first: a bad rank / alpha / dropout or base raises before the model
    # changes (the bases frozen on the way get their requires_grad back).
    with frozen_back_on_error(model):
        new = {
            name: LoRALayer.from_linear(
                model.get_submodule(name),
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                init=init,
                use_rslora=use_rslora,
                adapter_dtype=adapter_dtype,
                use_dora=use_dora,
            )
            for name in names
        }
    replace_modules(model, new)
    mark_to_save(model, to_save)
    freeze_all_but_trained(model)
    return model
