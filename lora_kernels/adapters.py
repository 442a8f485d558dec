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


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


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


def _freeze_all_but_lora(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("lora_A", "lora_B")))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every ``LoRALayer`` of ``model`` by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "lora",
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` with a ``LoRALayer`` sharing its weight.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        target_modules: module names as peft takes them: a list (a name matches an entry equal
            to it or to its last dotted parts, ``"query"`` matches ``"...attention.self.query"``),
            a regex string matched against full names, or ``"all-linear"`` (every linear but the
            output head).
        rank, alpha, dropout, use_rslora, init, adapter_dtype: as in :class:`LoRALayer`
            (``adapter_dtype=torch.float32`` on a bfloat16 model: float32 adapters, as peft).

    Every other parameter is frozen; only ``lora_A`` / ``lora_B`` train. Raises ``ValueError``
    (listing the model's linear layers) when nothing matches, before changing anything.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    _check_adapter_dtype(adapter_dtype)
    linears = _linear_names(model)
    if target_modules == ALL_LINEAR:
        head = _output_layer_name(model)
        names = [n for n in linears if n != head]
    else:
        if not isinstance(target_modules, (str, list, tuple, set)):
            raise TypeError(
                f"target_modules must be a str or a list of str, got {target_modules!r}"
            )
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        matched = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
        not_linear = [n for n in matched if n not in linears]
        if not_linear:
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in not_linear)
            raise ValueError(f"target_modules matched modules that are not nn.Linear: {kinds}")
        names = matched
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear; the model's linear layers "
            f"are: {', '.join(linears) or '(none)'}"
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
    _freeze_all_but_lora(model)
    return model


# --- peft models -----------------------------------------------------------------------------


def from_peft(peft_model) -> nn.Module:
    """The model under a peft LoRA model, each peft LoRA ``Linear`` replaced by a ``LoRALayer``.

    The base ``nn.Linear`` objects are reused (no copy); adapter weights are copied, transposed
    into our ``(in, r)`` / ``(r, out)`` layout and in their own dtype (peft keeps float32
    adapters on a bfloat16 or float16 model by default; so do we); each layer keeps peft's
    scaling (rsLoRA, rank and alpha patterns included) and dropout probability. Raises
    ``ValueError`` naming the module and the feature for what ``LoRALayer`` doesn't do (DoRA,
    several active adapters, ``lora_bias``, merged adapters, ``fan_in_fan_out``, LoRA on
    non-``Linear`` layers), before changing anything.
    """
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer

    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer):
            continue
        where = f"module {name!r}"
        if not isinstance(module, PeftLinear) or not isinstance(module.base_layer, nn.Linear):
            raise ValueError(
                f"{where}: LoRA on {type(module.get_base_layer()).__name__} is not supported "
                "(only nn.Linear)"
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
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{where}: fan_in_fan_out=True (Conv1D weights) is not supported")
        plan[name] = (module, adapter)
    if not plan:
        raise ValueError("the model has no peft LoRA layer")

    new = {}
    for name, (module, adapter) in plan.items():
        dropout = module.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        layer = _adapted(module.base_layer, A, B, dropout=p, adapter_dtype=A.dtype)
        layer.scaling = float(module.scaling[adapter])  # rsLoRA and patterns included
        layer.alpha = float(module.lora_alpha[adapter])
        layer.use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        new[name] = layer
    _replace(model, new)
    return model


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
    and ``...lora_B.weight`` ``(out, r)``; ``adapter_config.json`` holds ``peft_type``, ``r``,
    ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora``, ``bias``,
    ``rank_pattern`` and ``alpha_pattern`` (per-module values where layers differ). Written
    atomically: the files appear together, or the directory is left as it was.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALayer to save")
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
        "modules_to_save": None,
        "use_dora": False,
    }
    if len({layer.dropout for layer in layers.values()}) > 1:
        raise ValueError("layers have different dropout; peft's config takes one value")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().t().contiguous().cpu()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().t().contiguous().cpu()

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
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    for feature, present in unsupported.items():
        if present:
            raise ValueError(f"{config_path}: {feature}={config.get(feature)!r} is not supported")
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
    ``nn.Linear`` of ``model`` with matching shapes, A and B paired. On any error the model is
    left exactly as it was and the ``ValueError`` names the file and the problem. Then every
    other parameter is frozen, as :func:`inject_lora` does. The adapters take each linear's
    dtype, or ``adapter_dtype`` when given (``torch.float32`` on a bfloat16 model, as peft's
    ``autocast_adapter_dtype`` does). Returns ``model``.
    """
    _check_adapter_dtype(adapter_dtype)
    directory = os.fspath(directory)
    config, tensors, config_path, weights_path = _read_adapter(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights_path}: unexpected key {key!r}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA weights")
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    checked = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"{weights_path}: {name} has no lora_{missing} weight")
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
    _freeze_all_but_lora(model)
    return model
