"""Whole-model merge and unload, in peft's names: ``merge_lora`` / ``unmerge_lora`` (peft's
``merge_adapter`` / ``unmerge_adapter``), ``merge_and_unload``, ``unload``."""

from __future__ import annotations

from torch import nn

from .matching import SAVE_MARK, lora_layers, modules_to_save_in, replace_modules


def _check_untied(model: nn.Module, layers) -> None:
    """Refuse to merge into a base weight another module of ``model`` holds too (a tied output
    head and embedding): merging would write the update into that module as well."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in layers.items():
        weight = layer.linear.weight
        # (the same linear under another name is the same module, not a tie)
        others = [
            n
            for n in owners.get(id(weight), [])
            if model.get_submodule(n.rpartition(".")[0]) is not layer.linear
        ]
        if others:
            raise RuntimeError(
                f"{name}: its base weight is shared with {', '.join(others)} (tied weights): "
                "merging would change those too. Untie them first (give the linear a weight of "
                "its own: linear.weight = nn.Parameter(linear.weight.detach().clone(), "
                "requires_grad=False)), or keep the adapter unmerged; no layer was changed"
            )


def _check_finite(layers, sign: int) -> None:
    """Compute each layer's new weight once, keeping none, so that a non-finite result raises
    before any layer changes (one weight's worth of memory at a time)."""
    for name, layer in layers.items():
        try:
            layer.merged_weight(sign)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}; no layer was changed") from None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every unmerged ``LoRALayer``'s update into its weight, in place (peft's
    ``merge_adapter``); each then runs as a plain linear. Float32 math; raises ``RuntimeError``,
    changing no layer, if any merged weight would not be finite. Returns ``model``."""
    todo = {n: layer for n, layer in lora_layers(model).items() if not layer.merged}
    _check_untied(model, todo)
    _check_finite(todo, 1)
    for layer in todo.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged ``LoRALayer``'s update again, in place (peft's
    ``unmerge_adapter``); exact up to the weight dtype's rounding. Returns ``model``."""
    todo = {n: layer for n, layer in lora_layers(model).items() if layer.merged}
    _check_untied(model, todo)
    _check_finite(todo, -1)
    for layer in todo.values():
        layer.unmerge()
    return model


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALayer")
    todo = {n: layer for n, layer in layers.items() if layer.merged != merge}
    _check_untied(model, todo)
    _check_finite(todo, 1 if merge else -1)
    for layer in todo.values():
        layer.merge() if merge else layer.unmerge()
    if "" in layers:  # a bare LoRALayer: its linear is the model now
        return model.linear
    replace_modules(model, {name: layer.linear for name, layer in layers.items()})
    for module in modules_to_save_in(model).values():
        delattr(module, SAVE_MARK)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Every ``LoRALayer`` becomes its plain ``nn.Linear`` with the update folded in (peft's
    ``merge_and_unload``), in place; the model's ``state_dict`` keys are the base model's again,
    so ``save_pretrained`` writes a checkpoint any loader reads. Float32 math; raises
    ``RuntimeError``, changing nothing, if any merged weight would not be finite. Modules to save
    keep their trained weights (as in peft). Returns ``model`` (for a bare ``LoRALayer``, its
    ``nn.Linear``)."""
    return _unload(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Every ``LoRALayer`` becomes its plain ``nn.Linear`` without the update (peft's
    ``unload``), in place; a merged layer is unmerged first (exact up to the weight dtype's
    rounding). Modules to save keep their trained weights (as in peft). Returns ``model`` (for a
    bare ``LoRALayer``, its ``nn.Linear``)."""
    return _unload(model, merge=False)
