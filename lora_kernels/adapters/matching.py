"""The model's tree as peft reads it: matching module names, LoRA layers, modules to save.

peft's rules: ``target_modules`` as a list matches a name equal to an entry or ending in
``"." + entry``, as a string is a regex over the full name; ``rank_pattern`` / ``alpha_pattern``
keys match a name ending in them. Modules trained in full beside the adapters (peft's
``modules_to_save``) are marked on the module itself, not wrapped, so a model's ``state_dict``
keys stay the base model's.
"""

from __future__ import annotations

import contextlib
import re

from torch import nn

from ..layer import LoRALayer

# peft's value of target_modules for every linear layer but the output head.
ALL_LINEAR = "all-linear"


# --- matching modules, as peft does ---------------------------------------------------------


def matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches a name
    equal to an entry or ending in ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(patterns: dict, name: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def under(name: str, roots) -> str | None:
    """The entry of ``roots`` that ``name`` is or lies inside, if any."""
    return next((r for r in roots if name == r or name.startswith(r + ".")), None)


def overlaps(name: str, roots) -> bool:
    """Whether module ``name`` is, holds or lies inside one of the modules ``roots``."""
    return any(name == r or name.startswith(r + ".") or r.startswith(name + ".") for r in roots)


def linear_names(model: nn.Module, exclude=()) -> list[str]:
    """The model's ``nn.Linear`` layers, leaving out those at or under the ``exclude`` names."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n and under(n, exclude) is None
    ]


def read_directly(model: nn.Module) -> dict[str, str]:
    """``{name: why}``: the linear layers whose parent reads their weight itself instead of
    calling them, so that a ``LoRALayer`` in their place would be skipped (its adapters never
    used, never trained)."""
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            found[prefix + "out_proj"] = (
                "nn.MultiheadAttention reads out_proj.weight itself (in F.multi_head_attention_"
                "forward)"
            )
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                found[prefix + child] = (
                    f"nn.TransformerEncoderLayer's eval fast path reads {child}.weight itself"
                )
    return found


def other_names(model: nn.Module, names) -> dict[str, list[str]]:
    """``{name: [its other names]}`` for the modules of ``names`` reachable under more than one
    name (the same module assigned twice)."""
    all_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(module), []).append(name)
    found = {}
    for name in names:
        others = [n for n in all_names[id(model.get_submodule(name))] if n != name]
        if others:
            found[name] = others
    return found


def output_layer_name(model: nn.Module) -> str | None:
    """The output head ``"all-linear"`` leaves out (transformers' ``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def peft_linear_classes() -> tuple[type, ...]:
    """peft's LoRA layers over an ``nn.Linear`` (``peft.tuners.lora.layer.Linear``) and over
    bitsandbytes' 4-bit ``Linear4bit`` (where bitsandbytes is installed): the ones we run."""
    from peft.tuners.lora.layer import Linear

    try:
        import bitsandbytes  # noqa: F401
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return (Linear,)
    return Linear, Linear4bit


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_modules(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        set_submodule(model, name, layer)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every ``LoRALayer`` of ``model`` by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


# --- modules_to_save: modules trained in full beside the adapters -----------------------------

# NOTE: a module to save is marked by this attribute on the module itself rather than wrapped (as
# peft's ModulesToSaveWrapper does), so the model's state_dict keys stay the base model's; the
# mark follows the module through deepcopy, pickling and moves within the model.
SAVE_MARK = "_lora_kernels_module_to_save"


def modules_to_save_in(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` trained in full and saved with its adapter (peft's
    ``modules_to_save``), by full name: those given to ``inject_lora(..., modules_to_save=...)``,
    carried over by ``from_peft`` or loaded by ``load_peft_adapter``."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, SAVE_MARK, False) and under(name, found) is None:
            found[name] = module
    return found


def trained_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters an adapter trains: every ``LoRALayer``'s ``lora_A`` /
    ``lora_B`` (and DoRA's ``magnitude``) and every parameter of the modules to save."""
    ids = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    ids.update(
        id(layer.magnitude) for layer in lora_layers(model).values() if layer.use_dora
    )  # (DoRA's)
    ids.update(id(p) for m in modules_to_save_in(model).values() for p in m.parameters())
    return ids


@contextlib.contextmanager
def frozen_back_on_error(model: nn.Module):
    """Inside, building ``LoRALayer`` s freezes each base linear as it goes; if anything raises,
    every parameter of ``model`` gets its ``requires_grad`` back (a refused call changes
    nothing)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


def freeze_all_but_trained(model: nn.Module) -> None:
    trained = trained_parameters(model)
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)


def check_nothing_unsaved(named_parameters, covered: set[int], what: str) -> None:
    """Refuse when a parameter requiring grad would not be in the adapter file."""
    loose = [n for n, p in named_parameters if p.requires_grad and id(p) not in covered]
    if loose:
        shown = ", ".join(loose[:8]) + (f" and {len(loose) - 8} more" if len(loose) > 8 else "")
        raise ValueError(
            f"{what}: parameters that require grad would not be in the adapter file (only LoRA "
            f"adapters and modules_to_save are): {shown}. Freeze them (requires_grad_(False)) "
            "if they are not trained, or name their modules in modules_to_save"
        )


def resolve_modules_to_save(model: nn.Module, entries, lora_names) -> list[str]:
    """Full names of the modules ``entries`` (peft's list rule) name; ``ValueError`` for an
    entry that matches nothing and for a module that is, holds or lies inside a LoRA layer."""
    if entries is None:
        return []
    if isinstance(entries, str) or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"modules_to_save must be a list of module names, got {entries!r}")
    names = []
    for entry in entries:
        matched = [n for n, _ in model.named_modules() if n and matches(n, [entry])]
        if not matched:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        names += [n for n in matched if n not in names]
    clash = [n for n in names if overlaps(n, lora_names)]
    if clash:
        raise ValueError(
            f"modules_to_save can't hold LoRA layers or lie inside one: {', '.join(clash)}"
        )
    return names


def mark_to_save(model: nn.Module, names) -> None:
    for name in names:
        setattr(model.get_submodule(name), SAVE_MARK, True)
