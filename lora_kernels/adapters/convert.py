"""``from_peft``: a peft LoRA model converted in place, each peft LoRA layer a ``LoRALayer``."""

from __future__ import annotations

from torch import nn

from .files import save_peft_adapter
from .inject import adapted
from .matching import (
    check_nothing_unsaved,
    mark_to_save,
    peft_linear_classes,
    replace_modules,
    under,
)


def from_peft(peft_model) -> nn.Module:
    """The model under a peft LoRA model, each peft LoRA ``Linear`` replaced by a ``LoRALayer``.

    The base ``nn.Linear`` objects are reused (no copy); adapter weights are copied, transposed
    into our ``(in, r)`` / ``(r, out)`` layout and in their own dtype (peft keeps float32
    adapters on a bfloat16 or float16 model by default; so do we); each layer keeps peft's
    scaling (rsLoRA, rank and alpha patterns included) and dropout probability. peft's
    ``modules_to_save`` (the classifier of a ``task_type="SEQ_CLS"`` model) carry over: each
    wrapper gives way to its trained copy, which stays trainable and is saved with the adapter.

    peft's DoRA layers (``use_dora=True``, over 4-bit bases too) become DoRA ``LoRALayer``s
    with peft's magnitudes.

    Raises ``ValueError`` naming the module and the feature for what ``LoRALayer`` doesn't do
    (several active adapters, ``lora_bias``, merged or disabled adapters,
    ``fan_in_fan_out``, LoRA on non-``Linear`` layers, trainable tokens, trainable parameters an
    adapter file would not hold such as ``bias="all"``), before changing anything.

    The conversion happens in place, inside ``peft_model``: afterwards the peft wrapper still
    runs the converted model, and its ``save_pretrained`` (the Trainer's checkpoints,
    ``push_to_hub``) writes the converted adapter through :func:`save_peft_adapter` with peft's
    ``task_type`` and ``base_model_name_or_path``; its other adapter methods
    (``merge_and_unload``, ``unload``, ``merge_adapter``, ``disable_adapter``, ...) would not see
    the ``LoRALayer``s and raise a ``RuntimeError`` naming the lora_kernels function to call
    instead (:func:`merge_and_unload`, ...). To keep peft's own model instead, see
    :func:`patch_peft`.
    """
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    linears = peft_linear_classes()
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
        if not isinstance(module, PeftLoraLayer) or under(name, to_save):
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
        covered |= {id(m.weight) for m in _magnitude(module, adapter)}
    check_nothing_unsaved(model.named_parameters(), covered, "from_peft")

    new = {}
    for name, (module, adapter) in plan.items():
        dropout = module.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        m = next((v.weight for v in _magnitude(module, adapter)), None)  # DoRA's
        layer = adapted(module.base_layer, A, B, m, dropout=p, adapter_dtype=A.dtype)
        layer.scaling = float(module.scaling[adapter])  # rsLoRA and patterns included
        layer.alpha = float(module.lora_alpha[adapter])
        layer.use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        layer.lora_A.requires_grad_(A.requires_grad)
        layer.lora_B.requires_grad_(B.requires_grad)
        if m is not None:
            layer.magnitude.requires_grad_(m.requires_grad)
        new[name] = layer
    replace_modules(model, {**new, **to_save})
    mark_to_save(model, to_save)
    for wrapper in wrappers:
        wrapper.__class__ = _converted_class(type(wrapper))
    return model


def _magnitude(module, adapter: str) -> list:
    """peft's DoRA magnitude module of ``adapter`` on ``module`` (``[]`` without DoRA)."""
    if not module.use_dora.get(adapter, False):
        return []
    return [module.lora_magnitude_vector[adapter]]


# What each peft adapter method is after from_peft: its LoRA layers are gone, so peft's own
# method would return the model unmerged, or switch nothing. (save_pretrained writes the
# adapter through save_peft_adapter, and push_to_hub, which calls it, uploads that.)
_AFTER_FROM_PEFT = {
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
    swaps a module's class): forward is untouched, ``save_pretrained`` writes the converted
    model's adapter in peft's format (``_save_pretrained``), the other adapter methods
    refuse."""

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle can't find it by name: rebuild it on load.
        return _new_converted, (type(self).__bases__[1],), self.__dict__.copy()


def _save_pretrained(
    self,
    save_directory,
    safe_serialization=True,
    selected_adapters=None,
    save_embedding_layers="auto",
    is_main_process=True,
    *,
    state_dict=None,
    **kwargs,
):
    """peft's ``save_pretrained`` (what the Trainer's checkpoints and ``push_to_hub`` call):
    the converted model's adapter through :func:`save_peft_adapter`, with this wrapper's
    ``task_type`` and ``base_model_name_or_path``, from ``state_dict`` where one is given (a
    state dict of this wrapper, as the Trainer passes). Only the main process writes; the
    file is always safetensors (peft reads it either way)."""
    adapter = self.active_adapter
    if selected_adapters is not None and list(selected_adapters) != [adapter]:
        raise ValueError(
            f"save_pretrained: the converted model holds the adapter {adapter!r} only, "
            f"not {selected_adapters}"
        )
    model = self.get_base_model()
    if state_dict is not None:
        prefix = next(n for n, m in self.named_modules() if m is model)
        prefix = f"{prefix}." if prefix else ""
        state_dict = {
            k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)
        }
    config = self.peft_config[adapter]
    save_peft_adapter(
        model,
        save_directory,
        config.base_model_name_or_path,
        task_type=config.task_type,
        state_dict=state_dict,
        is_main_process=is_main_process,  # (every rank gathers a partitioned model)
    )


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
        if hasattr(cls, "save_pretrained"):  # PeftModel (LoraModel has none)
            methods["save_pretrained"] = _save_pretrained
        _CONVERTED_CLASSES[cls] = type(cls.__name__, (_ConvertedPeft, cls), methods)
    return _CONVERTED_CLASSES[cls]
