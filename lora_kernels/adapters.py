"""LoRA on whole models: inject into any model, convert from peft, save / load peft adapters.

Adapters move both ways in peft's own file format (``adapter_config.json`` and
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained`` loads what we save and
``load_peft_adapter`` loads what peft saves.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter

import torch
from torch import nn

from .layer import INITS, LoRALayer, _check_adapter_dtype

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"


# --- matching modules, as peft does ---------------------------------------------------------


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches a name
    equal to an entry or ending in ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, name: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _under(name: str, roots) -> str | None:
    """The entry of ``roots`` that ``name`` is or lies inside, if any."""
    return next((r for r in roots if name == r or name.startswith(r + ".")), None)


def _overlaps(name: str, roots) -> bool:
    """Whether module ``name`` is, holds or lies inside one of the modules ``roots``."""
    return any(name == r or name.startswith(r + ".") or r.startswith(name + ".") for r in roots)


def _linear_names(model: nn.Module, exclude=()) -> list[str]:
    """The model's ``nn.Linear`` layers, leaving out those at or under the ``exclude`` names."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n and _under(n, exclude) is None
    ]


def _output_layer_name(model: nn.Module) -> str | None:
    """The output head ``"all-linear"`` leaves out (transformers' ``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _peft_4bit_linears() -> tuple[type, ...]:
    """peft's LoRA layer over bitsandbytes' ``Linear4bit``, where bitsandbytes is installed."""
    try:
        import bitsandbytes  # noqa: F401
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return ()
    return (Linear4bit,)


def _adapted(linear: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, **kwargs) -> LoRALayer:
    """A ``LoRALayer`` around ``linear`` carrying peft-layout weights ``lora_A`` ``(r, in)`` and
    ``lora_B`` ``(out, r)``, in ``linear``'s train / eval mode."""
    layer = LoRALayer.from_linear(linear, rank=lora_A.shape[0], **kwargs)
    with torch.no_grad():
        layer.lora_A.copy_(lora_A.t())
        layer.lora_B.copy_(lora_B.t())
    return layer.train(linear.training)


def _replace(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        _set_submodule(model, name, layer)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every ``LoRALayer`` of ``model`` by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


# --- modules_to_save: modules trained in full beside the adapters -----------------------------

# NOTE: a module to save is marked by this attribute on the module itself rather than wrapped (as
# peft's ModulesToSaveWrapper does), so the model's state_dict keys stay the base model's; the
# mark follows the module through deepcopy, pickling and moves within the model.
_SAVE_MARK = "_lora_kernels_module_to_save"


def modules_to_save_in(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` trained in full and saved with its adapter (peft's
    ``modules_to_save``), by full name: those given to ``inject_lora(..., modules_to_save=...)``,
    carried over by ``from_peft`` or loaded by ``load_peft_adapter``."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, _SAVE_MARK, False) and _under(name, found) is None:
            found[name] = module
    return found


def _trained_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters an adapter file holds: every ``LoRALayer``'s ``lora_A`` /
    ``lora_B`` and every parameter of the modules to save."""
    ids = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    ids.update(id(p) for m in modules_to_save_in(model).values() for p in m.parameters())
    return ids


def _freeze_all_but_trained(model: nn.Module) -> None:
    trained = _trained_parameters(model)
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)


def _check_nothing_unsaved(named_parameters, covered: set[int], what: str) -> None:
    """Refuse when a parameter requiring grad would not be in the adapter file."""
    loose = [n for n, p in named_parameters if p.requires_grad and id(p) not in covered]
    if loose:
        shown = ", ".join(loose[:8]) + (f" and {len(loose) - 8} more" if len(loose) > 8 else "")
        raise ValueError(
            f"{what}: parameters that require grad would not be in the adapter file (only LoRA "
            f"adapters and modules_to_save are): {shown}. Freeze them (requires_grad_(False)) "
            "if they are not trained, or name their modules in modules_to_save"
        )


def _resolve_modules_to_save(model: nn.Module, entries, lora_names) -> list[str]:
    """Full names of the modules ``entries`` (peft's list rule) name; ``ValueError`` for an
    entry that matches nothing and for a module that is, holds or lies inside a LoRA layer."""
    if entries is None:
        return []
    if isinstance(entries, str) or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"modules_to_save must be a list of module names, got {entries!r}")
    names = []
    for entry in entries:
        matched = [n for n, _ in model.named_modules() if n and _matches(n, [entry])]
        if not matched:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        names += [n for n in matched if n not in names]
    clash = [n for n in names if _overlaps(n, lora_names)]
    if clash:
        raise ValueError(
            f"modules_to_save can't hold LoRA layers or lie inside one: {', '.join(clash)}"
        )
    return names


def _mark_to_save(model: nn.Module, names) -> None:
    for name in names:
        setattr(model.get_submodule(name), _SAVE_MARK, True)


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
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` with a ``LoRALayer`` sharing its weight.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        target_modules: module names as peft takes them: a list (a name matches an entry equal
            to it or to its last dotted parts, ``"query"`` matches ``"...attention.self.query"``),
            a regex string matched against full names, or ``"all-linear"`` (every linear but the
            output head, the modules to save and those that already have LoRA).
        rank, alpha, dropout, use_rslora, init, adapter_dtype: as in :class:`LoRALayer`
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
    _check_adapter_dtype(adapter_dtype)
    existing = list(lora_layers(model))
    to_save = _resolve_modules_to_save(model, modules_to_save, existing)
    saved = list(modules_to_save_in(model)) + to_save
    linears = _linear_names(model, exclude=existing)
    if target_modules == ALL_LINEAR:
        head = _output_layer_name(model)
        names = [n for n in linears if n != head and _under(n, saved) is None]
    else:
        if not isinstance(target_modules, (str, list, tuple, set)):
            raise TypeError(
                f"target_modules must be a str or a list of str, got {target_modules!r}"
            )
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        matched = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
        has_lora = sorted({_under(n, existing) for n in matched} - {None})
        if has_lora:
            raise ValueError(
                f"target_modules={target_modules!r} names modules that already have LoRA: "
                f"{', '.join(has_lora)} (a LoRALayer is never wrapped again)"
            )
        in_saved = [n for n in matched if _under(n, saved)]
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
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear; the model's linear layers "
            f"without LoRA are: {', '.join(linears) or '(none)'}"
            + (f" ({len(existing)} layers already have LoRA)" if existing else "")
        )
    # Build every layer first: a bad rank / alpha / dropout raises before the model changes.
    new = {
        name: LoRALayer.from_linear(
            model.get_submodule(name),
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            init=init,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
        )
        for name in names
    }
    _replace(model, new)
    _mark_to_save(model, to_save)
    _freeze_all_but_trained(model)
    return model


# --- peft models -----------------------------------------------------------------------------


def from_peft(peft_model) -> nn.Module:
    """The model under a peft LoRA model, each peft LoRA ``Linear`` replaced by a ``LoRALayer``.

    The base ``nn.Linear`` objects are reused (no copy); adapter weights are copied, transposed
    into our ``(in, r)`` / ``(r, out)`` layout and in their own dtype (peft keeps float32
    adapters on a bfloat16 or float16 model by default; so do we); each layer keeps peft's
    scaling (rsLoRA, rank and alpha patterns included) and dropout probability. peft's
    ``modules_to_save`` (the classifier of a ``task_type="SEQ_CLS"`` model) carry over: each
    wrapper gives way to its trained copy, which stays trainable and is saved with the adapter.

    Raises ``ValueError`` naming the module and the feature for what ``LoRALayer`` doesn't do
    (DoRA, several active adapters, ``lora_bias``, merged or disabled adapters,
    ``fan_in_fan_out``, LoRA on non-``Linear`` layers, trainable tokens, trainable parameters an
    adapter file would not hold such as ``bias="all"``), before changing anything.

    The conversion happens in place, inside ``peft_model``: afterwards the peft wrapper still
    runs the converted model, but its adapter methods (``save_pretrained``,
    ``merge_and_unload``, ``unload``, ``merge_adapter``, ``disable_adapter``, ...) would not see
    the ``LoRALayer``s and raise a ``RuntimeError`` naming the lora_kernels function to call
    instead (:func:`save_peft_adapter`, :func:`merge_and_unload`, ...).
    """
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    linears = (PeftLinear, *_peft_4bit_linears())
    # Peel peft's wrappers (PeftModel -> LoraModel -> the model); a model with peft layers
    # injected by hand (peft's inject_adapter_in_model) has none.
    model, wrappers = peft_model, []
    while isinstance(model, (PeftModel, BaseTuner)):
        if isinstance(model, _ConvertedPeft):
            raise ValueError(
                "this peft model was converted by from_peft already; its model is "
                "peft_model.get_base_model()"
            )
        wrappers.append(model)
        model = model.base_model if isinstance(model, PeftModel) else model.model
    plan, to_save = {}, {}
    for name, module in model.named_modules():
        where = f"module {name!r}"
        if isinstance(module, AuxiliaryTrainingWrapper):
            if not isinstance(module, ModulesToSaveWrapper):
                raise ValueError(
                    f"{where}: {type(module).__name__} (e.g. trainable_token_indices) is not "
                    "supported"
                )
            if module.disable_adapters or len(module.active_adapters) != 1:
                raise ValueError(
                    f"{where}: modules_to_save needs exactly one active, enabled adapter"
                )
            trained = module.modules_to_save[module.active_adapters[0]]
            if any(isinstance(m, PeftLoraLayer) for m in trained.modules()):
                raise ValueError(f"{where}: LoRA inside modules_to_save is not supported")
            to_save[name] = trained
            continue
        if not isinstance(module, PeftLoraLayer) or _under(name, to_save):
            continue
        if not isinstance(module, linears) or not isinstance(module.base_layer, nn.Linear):
            raise ValueError(
                f"{where}: LoRA on {type(module.get_base_layer()).__name__} is not supported "
                "(only nn.Linear and bitsandbytes' Linear4bit)"
            )
        adapters = list(module.active_adapters)
        if len(adapters) != 1:
            raise ValueError(f"{where}: {len(adapters)} active adapters {adapters}; need exactly 1")
        adapter = adapters[0]
        if module.use_dora.get(adapter, False):
            raise ValueError(f"{where}: DoRA (use_dora=True) is not supported")
        if getattr(module, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"{where}: lora_bias=True is not supported")
        if module.merged:
            raise ValueError(f"{where}: the adapter is merged; unmerge it first")
        if module.disable_adapters:
            raise ValueError(f"{where}: the adapter is disabled; enable it first")
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{where}: fan_in_fan_out=True (Conv1D weights) is not supported")
        plan[name] = (module, adapter)
    if not plan:
        raise ValueError("the model has no peft LoRA layer")
    covered = {id(p) for m in to_save.values() for p in m.parameters()}
    for module, adapter in plan.values():
        covered |= {id(module.lora_A[adapter].weight), id(module.lora_B[adapter].weight)}
    _check_nothing_unsaved(model.named_parameters(), covered, "from_peft")

    new = {}
    for name, (module, adapter) in plan.items():
        dropout = module.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        layer = _adapted(module.base_layer, A, B, dropout=p, adapter_dtype=A.dtype)
        layer.scaling = float(module.scaling[adapter])  # rsLoRA and patterns included
        layer.alpha = float(module.lora_alpha[adapter])
        layer.use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        layer.lora_A.requires_grad_(A.requires_grad)
        layer.lora_B.requires_grad_(B.requires_grad)
        new[name] = layer
    _replace(model, {**new, **to_save})
    _mark_to_save(model, to_save)
    for wrapper in wrappers:
        wrapper.__class__ = _converted_class(type(wrapper))
    return model


# What each peft adapter method is after from_peft: its LoRA layers are gone, so peft's own
# method would write an empty adapter, return the model unmerged, or switch nothing.
_AFTER_FROM_PEFT = {
    "save_pretrained": "lora_kernels.save_peft_adapter(model, directory)",
    "push_to_hub": "lora_kernels.save_peft_adapter(model, directory), then upload directory",
    "merge_and_unload": "lora_kernels.merge_and_unload(model)",
    "unload": "lora_kernels.unload(model)",
    "merge_adapter": "lora_kernels.merge_lora(model)",
    "unmerge_adapter": "lora_kernels.unmerge_lora(model)",
    "disable_adapter": "lora_kernels.unload(model) on a copy, or merge_lora / unmerge_lora",
    "disable_adapter_layers": "lora_kernels.unload(model) on a copy",
    "enable_adapter_layers": "the converted model as it is (its LoRA layers are on)",
    "set_adapter": "from_peft on a peft model with the adapter you want active",
    "add_adapter": "lora_kernels.inject_lora(model, ...)",
    "load_adapter": "lora_kernels.load_peft_adapter(base_model, directory)",
    "delete_adapter": "lora_kernels.unload(model)",
    "add_weighted_adapter": "lora_kernels functions on the converted model",
}


class _ConvertedPeft:
    """Mixed into a peft wrapper's class by :func:`from_peft` (as FSDP2's ``fully_shard``
    swaps a module's class): forward is untouched, adapter methods refuse."""

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle can't find it by name: rebuild it on load.
        return _new_converted, (type(self).__bases__[1],), self.__dict__.copy()


def _new_converted(cls: type):
    return object.__new__(_converted_class(cls))


def _refuse(method: str, instead: str):
    def refuse(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__}.{method}: this peft model was converted by "
            "lora_kernels.from_peft, so its LoRA layers are lora_kernels LoRALayers that peft "
            f"no longer sees. Use {instead} instead, with model = peft_model.get_base_model()"
        )

    refuse.__name__ = method
    return refuse


_CONVERTED_CLASSES: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED_CLASSES:
        methods = {m: _refuse(m, i) for m, i in _AFTER_FROM_PEFT.items() if hasattr(cls, m)}
        _CONVERTED_CLASSES[cls] = type(cls.__name__, (_ConvertedPeft, cls), methods)
    return _CONVERTED_CLASSES[cls]


def _alpha_of(layer: LoRALayer) -> float:
    """The peft ``lora_alpha`` that gives this layer's scaling."""
    return layer.scaling * (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_peft_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> None:
    """Write the model's ``LoRALayer`` adapters as a peft LoRA adapter into ``directory``.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` ``(r, in)``
    and ``...lora_B.weight`` ``(out, r)``, and for each module to save (peft's
    ``modules_to_save``) its whole state dict as ``base_model.model.<module>.<key>``, the keys
    peft writes; ``adapter_config.json`` holds ``peft_type``, ``r``, ``lora_alpha``,
    ``target_modules``, ``lora_dropout``, ``use_rslora``, ``bias``, ``rank_pattern`` and
    ``alpha_pattern`` (per-module values where layers differ) and ``modules_to_save``. Written
    atomically: the files appear together, or the directory is left as it was.

    Refuses (``ValueError``, nothing written) what the files could not hold: merged layers,
    layers that differ in ``use_rslora`` or dropout, and any parameter that requires grad but is
    neither a LoRA adapter nor in a module to save (a save never drops what was trained).
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALayer to save")
    to_save = modules_to_save_in(model)
    _check_nothing_unsaved(model.named_parameters(), _trained_parameters(model), "save")
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("layers mix use_rslora True and False; peft's config takes one value")
    if any(layer.merged for layer in layers.values()):
        merged = [n for n, layer in layers.items() if layer.merged]
        raise ValueError(f"merged layers can't be saved as an adapter: {', '.join(merged)}")
    rank = _most_common([layer.rank for layer in layers.values()])
    alpha = _most_common([_alpha_of(layer) for layer in layers.values()])
    dropout = _most_common([layer.dropout for layer in layers.values()])
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "use_rslora": next(iter(layers.values())).use_rslora,
        "bias": "none",
        "rank_pattern": {n: layer.rank for n, layer in layers.items() if layer.rank != rank},
        "alpha_pattern": {
            n: _alpha_of(layer) for n, layer in layers.items() if _alpha_of(layer) != alpha
        },
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(to_save) or None,
        "use_dora": False,
    }
    if len({layer.dropout for layer in layers.values()}) > 1:
        raise ValueError("layers have different dropout; peft's config takes one value")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().t().contiguous().cpu()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().t().contiguous().cpu()
    for name, module in to_save.items():
        for key, value in module.state_dict().items():
            # clone: safetensors refuses tensors that share storage (a tied weight, a view)
            tensors[f"{KEY_PREFIX}{name}.{key}"] = value.detach().cpu().clone()

    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        _replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(staging: str, directory: str) -> None:
    """Move ``staging``'s files into ``directory`` so they appear together: a fresh directory
    is renamed in one step; an existing one keeps its other files and gets ours by rename."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    # NOTE: both files are renamed into place only after both were written; a crash between the
    # two renames is the one window, narrower than any write.
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))


def _read_adapter(directory: str):
    """Parse and check the files of an adapter directory; raise ``ValueError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such adapter directory")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"{path}: missing (a peft LoRA adapter has {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "lora_bias": bool(config.get("lora_bias")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    for feature, present in unsupported.items():
        if present:
            raise ValueError(f"{config_path}: {feature}={config.get(feature)!r} is not supported")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"{config_path}: modules_to_save must be a list of module names")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise ValueError(f"{config_path}: {field} must be a number, got {config.get(field)!r}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
    return config, tensors, config_path, weights_path


def load_peft_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Inject ``LoRALayer``s carrying a peft LoRA adapter's weights and config into ``model``.

    Everything is read and checked first: both files present and parseable, a supported config,
    every key of the form ``base_model.model.<module>.lora_{A,B}.weight`` naming an
    ``nn.Linear`` of ``model`` without LoRA, with matching shapes, A and B paired, and every
    other key the whole state dict of a module the config's ``modules_to_save`` names. On any
    error the model is left exactly as it was and the ``ValueError`` names the file and the
    problem. Then the modules to save get their saved weights and stay trainable, and every
    other parameter is frozen, as :func:`inject_lora` does. The adapters take each linear's
    dtype, or ``adapter_dtype`` when given (``torch.float32`` on a bfloat16 model, as peft's
    ``autocast_adapter_dtype`` does). Returns ``model``.
    """
    _check_adapter_dtype(adapter_dtype)
    directory = os.fspath(directory)
    config, tensors, config_path, weights_path = _read_adapter(directory)
    existing = list(lora_layers(model))
    # The model's modules the config names to save (peft matches them by name suffix; an
    # entry naming no module of this model, as a SEQ_CLS config's "score" on BERT, is skipped).
    saved_names = [
        n
        for n, _ in model.named_modules()
        if n and _matches(n, config.get("modules_to_save") or [])
    ]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    to_save: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is not None:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        rest = key.removeprefix(KEY_PREFIX)
        owner = max((n for n in saved_names if rest.startswith(n + ".")), key=len, default=None)
        if not key.startswith(KEY_PREFIX) or owner is None:
            raise ValueError(
                f"{weights_path}: unexpected key {key!r} (neither a LoRA weight nor in a module "
                f"of modules_to_save {config.get('modules_to_save')!r})"
            )
        to_save.setdefault(owner, {})[rest[len(owner) + 1 :]] = value
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA weights")
    for name in saved_names:
        if not _overlaps(name, to_save):
            raise ValueError(f"{weights_path}: no weights for {name!r}, a module to save")
    for name, state in to_save.items():
        module = model.get_submodule(name)
        if _overlaps(name, existing):
            raise ValueError(f"{weights_path}: {name}, a module to save, has LoRA already")
        expected = module.state_dict()
        if state.keys() != expected.keys():
            raise ValueError(
                f"{weights_path}: {name} (a module to save) has keys {sorted(state)} in the "
                f"file, the model's {type(module).__name__} has {sorted(expected)}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{weights_path}: {name}.{key} has shape {tuple(value.shape)} in the file, "
                    f"{tuple(expected[key].shape)} in the model"
                )
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    checked = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"{weights_path}: {name} has no lora_{missing} weight")
        if _under(name, existing):
            raise ValueError(f"{weights_path}: {_under(name, existing)} has LoRA already")
        if _under(name, to_save):
            raise ValueError(f"{weights_path}: {name} is in a module to save and has LoRA")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no module {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{weights_path}: {name} is a {type(module).__name__}, not an nn.Linear"
            )
        A, B = ab["A"], ab["B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
            raise ValueError(
                f"{weights_path}: {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                f"don't fit nn.Linear({module.in_features}, {module.out_features}) at one rank"
            )
        expected_r = _pattern_value(rank_pattern, name, config["r"])
        if r != expected_r:
            raise ValueError(
                f"{config_path}: {name} has rank {r} in the weights, {expected_r} in the config"
            )
        alpha = float(_pattern_value(alpha_pattern, name, config["lora_alpha"]))
        checked.append((name, module, A, B, alpha))

    kwargs = {"use_rslora": use_rslora, "adapter_dtype": adapter_dtype}
    new = {
        name: _adapted(module, A, B, alpha=alpha, dropout=dropout, **kwargs)
        for name, module, A, B, alpha in checked
    }
    _replace(model, new)
    for name, state in to_save.items():
        model.get_submodule(name).load_state_dict(state)
    _mark_to_save(model, to_save)
    _freeze_all_but_trained(model)
    return model


# --- whole-model merge and unload (peft's names) ---------------------------------------------


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
    _check_finite(todo, 1)
    for layer in todo.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged ``LoRALayer``'s update again, in place (peft's
    ``unmerge_adapter``); exact up to the weight dtype's rounding. Returns ``model``."""
    todo = {n: layer for n, layer in lora_layers(model).items() if layer.merged}
    _check_finite(todo, -1)
    for layer in todo.values():
        layer.unmerge()
    return model


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALayer")
    todo = {n: layer for n, layer in layers.items() if layer.merged != merge}
    _check_finite(todo, 1 if merge else -1)
    for layer in todo.values():
        layer.merge() if merge else layer.unmerge()
    _replace(model, {name: layer.linear for name, layer in layers.items()})
    for module in modules_to_save_in(model).values():
        delattr(module, _SAVE_MARK)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Every ``LoRALayer`` becomes its plain ``nn.Linear`` with the update folded in (peft's
    ``merge_and_unload``), in place; the model's ``state_dict`` keys are the base model's again,
    so ``save_pretrained`` writes a checkpoint any loader reads. Float32 math; raises
    ``RuntimeError``, changing nothing, if any merged weight would not be finite. Modules to save
    keep their trained weights (as in peft). Returns ``model``."""
    return _unload(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Every ``LoRALayer`` becomes its plain ``nn.Linear`` without the update (peft's
    ``unload``), in place; a merged layer is unmerged first (exact up to the weight dtype's
    rounding). Modules to save keep their trained weights (as in peft). Returns ``model``."""
    return _unload(model, merge=False)
