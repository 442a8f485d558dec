"""peft's adapter files, both ways: ``save_peft_adapter`` writes what
``peft.PeftModel.from_pretrained`` loads, ``load_peft_adapter`` loads what peft saves
(``adapter_config.json`` and ``adapter_model.safetensors``)."""

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

from .. import engines
from ..layer import LoRALayer
from ..validation import check_adapter_dtype
from .inject import adapted
from .matching import (
    check_nothing_unsaved,
    freeze_all_but_trained,
    frozen_back_on_error,
    lora_layers,
    mark_to_save,
    matches,
    modules_to_save_in,
    overlaps,
    pattern_value,
    read_directly,
    replace_modules,
    trained_parameters,
    under,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _alpha_of(layer: LoRALayer) -> float:
    """The peft ``lora_alpha`` that gives this layer's scaling."""
    return layer.scaling * (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)


def _exactly(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key matching module ``name`` alone under peft's
    suffix rule."""
    return f"^{re.escape(name)}$"


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _tensor(state_dict, key: str, live: torch.Tensor) -> torch.Tensor:
    """``state_dict[key]`` where a state dict is given (it must hold the key), else ``live``."""
    if state_dict is None:
        return live
    if key not in state_dict:
        raise ValueError(f"save: the state_dict given has no {key!r}")
    return state_dict[key]


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None = None,
    *,
    task_type: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool | None = None,
) -> None:
    """Write the model's ``LoRALayer`` adapters as a peft LoRA adapter into ``directory``.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` ``(r, in)``
    and ``...lora_B.weight`` ``(out, r)``, and for each module to save (peft's
    ``modules_to_save``) its whole state dict as ``base_model.model.<module>.<key>``, the keys
    peft writes; ``adapter_config.json`` holds ``peft_type``, ``task_type``,
    ``base_model_name_or_path``, ``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``,
    ``use_rslora``, ``bias``, ``rank_pattern`` and ``alpha_pattern`` (per-module values where
    layers differ) and ``modules_to_save``. Written atomically: the files appear together, or the
    directory is left as it was.

    Sharded models save whole: parameters partitioned by DeepSpeed ZeRO-3 are gathered
    (``deepspeed.zero.GatheredParameters``), FSDP1 units' through ``summon_full_params`` and
    FSDP2's ``DTensor`` s through ``full_tensor()``; module names are written without FSDP1's
    and activation checkpointing's wrapper parts. Gathering is a collective: **call it on every
    rank**; only the main process writes.

    Args:
        model: the model holding the ``LoRALayer`` s.
        directory: where to write (created if missing; other files in it are kept).
        base_model_name_or_path: the base model's name or path (a ``str`` or ``os.PathLike``),
            which ``AutoPeftModel*`` classes load the base from.
        task_type: peft's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), which
            ``AutoPeftModelForCausalLM`` and friends need.
        state_dict: a state dict of ``model`` (its own keys: ``<module>.lora_A``, ...) whose
            tensors are written instead of the live parameters, as the Trainer and accelerate
            pass a gathered one.
        is_main_process: whether this process writes the files (peft's argument). ``None``:
            rank 0 of ``torch.distributed`` when it is initialized, else ``True``.

    Refuses (``ValueError``, nothing written) what the files could not hold: merged layers,
    layers that differ in ``use_rslora`` or dropout, any parameter that requires grad but is
    neither a LoRA adapter nor in a module to save (a save never drops what was trained), and
    any adapter tensor whose shape is not its layer's ``(in, r)`` / ``(r, out)`` (a shard that
    could not be gathered, say).
    """
    if is_main_process is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        is_main_process = not distributed or torch.distributed.get_rank() == 0
    with engines.gathered(model, trained_parameters(model)):
        config, tensors = _adapter_files(model, base_model_name_or_path, task_type, state_dict)
    if is_main_process:
        _write_adapter(config, tensors, directory)


def _adapter_files(model, base_model_name_or_path, task_type, state_dict):
    """``(config, tensors)`` of ``save_peft_adapter``, read from a model whose parameters are
    whole (gathered)."""
    layers = {engines.clean_name(n): layer for n, layer in lora_layers(model).items()}
    if not layers:
        raise ValueError("the model has no LoRALayer to save")
    if len({layer.use_dora for layer in layers.values()}) > 1:
        raise ValueError("layers mix use_dora True and False; peft's config takes one value")
    if "" in layers:
        raise ValueError(
            "save_peft_adapter: the model is a bare LoRALayer, which has no module name for "
            "peft's keys (base_model.model.<module>.lora_A.weight): save the model holding it"
        )
    to_save = {engines.clean_name(n): m for n, m in modules_to_save_in(model).items()}
    check_nothing_unsaved(model.named_parameters(), trained_parameters(model), "save")
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("layers mix use_rslora True and False; peft's config takes one value")
    if any(layer.merged for layer in layers.values()):
        merged = [n for n, layer in layers.items() if layer.merged]
        raise ValueError(f"merged layers can't be saved as an adapter: {', '.join(merged)}")
    if len({layer.dropout for layer in layers.values()}) > 1:
        raise ValueError("layers have different dropout; peft's config takes one value")
    rank = _most_common([layer.rank for layer in layers.values()])
    alpha = _most_common([_alpha_of(layer) for layer in layers.values()])
    dropout = _most_common([layer.dropout for layer in layers.values()])
    if base_model_name_or_path is not None:
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "use_rslora": next(iter(layers.values())).use_rslora,
        "bias": "none",
        # Keys are anchored regexes: peft (and our loader) match a key against a name's last
        # dotted parts, so a plain "0" would match "2.0" too.
        "rank_pattern": {
            _exactly(n): layer.rank for n, layer in layers.items() if layer.rank != rank
        },
        "alpha_pattern": {
            _exactly(n): _alpha_of(layer)
            for n, layer in layers.items()
            if _alpha_of(layer) != alpha
        },
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(to_save) or None,
        "use_dora": next(iter(layers.values())).use_dora,
    }
    tensors = {}
    for name, layer in layers.items():
        for factor, shape in (("A", (layer.in_features, layer.rank)),
                              ("B", (layer.rank, layer.out_features))):  # fmt: skip
            key = f"{name}.lora_{factor}"
            value = engines.whole(_tensor(state_dict, key, getattr(layer, f"lora_{factor}")))
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"save: {key} has shape {tuple(value.shape)}, not the layer's {shape}: a "
                    "partitioned parameter's shard (DeepSpeed ZeRO-3, FSDP) that was not "
                    "gathered? Call save_peft_adapter on every rank, or pass the gathered "
                    "state_dict="
                )
            tensors[f"{KEY_PREFIX}{key}.weight"] = value.detach().t().contiguous().cpu()
        if layer.use_dora:  # peft's key: <module>.lora_magnitude_vector
            value = engines.whole(_tensor(state_dict, f"{name}.magnitude", layer.magnitude))
            if tuple(value.shape) != (layer.out_features,):
                raise ValueError(
                    f"save: {name}.magnitude has shape {tuple(value.shape)}, not the layer's "
                    f"({layer.out_features},): a shard that was not gathered?"
                )
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = value.detach().cpu().clone()
    for name, module in to_save.items():
        for key, value in module.state_dict().items():
            value = engines.whole(_tensor(state_dict, f"{name}.{engines.clean_name(key)}", value))
            # clone: safetensors refuses tensors that share storage (a tied weight, a view)
            tensors[f"{KEY_PREFIX}{name}.{engines.clean_name(key)}"] = value.detach().cpu().clone()
    return config, tensors


def _write_adapter(config: dict, tensors: dict, directory) -> None:
    from safetensors.torch import save_file

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
    is renamed in one step; an existing one keeps its other files and gets ours by rename.
    What can be checked is checked before anything moves; if a rename fails, the files already
    moved are taken back and the old ones restored: the directory is left as it was."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory; nothing written")
    names = (WEIGHTS_NAME, CONFIG_NAME)
    for name in names:
        dest = os.path.join(directory, name)
        if os.path.lexists(dest) and not os.path.isfile(dest):
            raise IsADirectoryError(f"{dest} exists and is not a file; nothing written")
    moved, backups = [], []
    try:
        for name in names:
            src, dest = os.path.join(staging, name), os.path.join(directory, name)
            if os.path.lexists(dest):
                backup = os.path.join(staging, name + ".old")
                os.replace(dest, backup)
                backups.append((backup, dest))
            os.replace(src, dest)
            moved.append(dest)
    except BaseException:
        for dest in moved:
            os.remove(dest)
        for backup, dest in backups:
            os.replace(backup, dest)
        raise


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
    _check_config(config, config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
    return config, tensors, config_path, weights_path


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(config: dict, config_path: str) -> None:
    """The config's fields we read, strictly: ``ValueError`` naming the file and the field."""

    def bad(field, value, want):
        raise ValueError(f"{config_path}: {field} must be {want}, got {value!r}")

    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad("r", r, "a positive int")
    alpha = config.get("lora_alpha")
    if not _number(alpha) or not math.isfinite(alpha):
        bad("lora_alpha", alpha, "a finite number")
    dropout = config.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0.0 <= dropout < 1.0:
        bad("lora_dropout", dropout, "a number in [0, 1)")
    for field in ("use_rslora", "use_dora"):
        flag = config.get(field, False)
        if not isinstance(flag, bool) and flag is not None:
            bad(field, flag, "true or false")
    for field, ok, want in (
        ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "a positive int"),
        ("alpha_pattern", lambda v: _number(v) and math.isfinite(v), "a finite number"),
    ):  # fmt: skip
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            bad(field, patterns, "an object of module-name patterns")
        for key, value in patterns.items():
            if not ok(value):
                bad(f"{field}[{key!r}]", value, want)


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
    check_adapter_dtype(adapter_dtype)
    directory = os.fspath(directory)
    config, tensors, config_path, weights_path = _read_adapter(directory)
    existing = list(lora_layers(model))
    # The model's modules the config names to save (peft matches them by name suffix; an
    # entry naming no module of this model, as a SEQ_CLS config's "score" on BERT, is skipped).
    saved_names = [
        n for n, _ in model.named_modules() if n and matches(n, config.get("modules_to_save") or [])
    ]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    to_save: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is not None:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        m = re.fullmatch(
            rf"{re.escape(KEY_PREFIX)}(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", key
        )
        if m is not None:  # DoRA's magnitude
            if not config.get("use_dora"):
                raise ValueError(f"{weights_path}: {key} is a DoRA magnitude, use_dora is not set")
            pairs.setdefault(m.group(1), {})["M"] = value
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
        if not overlaps(name, to_save):
            raise ValueError(f"{weights_path}: no weights for {name!r}, a module to save")
    for name, state in to_save.items():
        module = model.get_submodule(name)
        if overlaps(name, existing):
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
    checked, direct = [], read_directly(model)
    for name, ab in sorted(pairs.items()):
        if not {"A", "B"} <= set(ab):
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"{weights_path}: {name} has no lora_{missing} weight")
        if config.get("use_dora") and "M" not in ab:
            raise ValueError(f"{weights_path}: {name} has no lora_magnitude_vector (use_dora)")
        if under(name, existing):
            raise ValueError(f"{weights_path}: {under(name, existing)} has LoRA already")
        if under(name, to_save):
            raise ValueError(f"{weights_path}: {name} is in a module to save and has LoRA")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no module {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{weights_path}: {name} is a {type(module).__name__}, not an nn.Linear"
            )
        if name in direct:
            raise ValueError(f"{weights_path}: {name}: {direct[name]}: LoRA there would never run")
        A, B = ab["A"], ab["B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
            raise ValueError(
                f"{weights_path}: {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                f"don't fit nn.Linear({module.in_features}, {module.out_features}) at one rank"
            )
        expected_r = pattern_value(rank_pattern, name, config["r"])
        if r != expected_r:
            raise ValueError(
                f"{config_path}: {name} has rank {r} in the weights, {expected_r} in the config"
            )
        alpha = float(pattern_value(alpha_pattern, name, config["lora_alpha"]))
        M = ab.get("M")
        if M is not None and M.shape != (module.out_features,):
            raise ValueError(
                f"{weights_path}: {name}: lora_magnitude_vector {tuple(M.shape)} doesn't fit "
                f"nn.Linear({module.in_features}, {module.out_features})"
            )
        checked.append((name, module, A, B, M, alpha))

    kwargs = {"use_rslora": use_rslora, "adapter_dtype": adapter_dtype}
    with frozen_back_on_error(model):  # (a base refused half-way: nothing stays frozen)
        new = {
            name: adapted(module, A, B, M, alpha=alpha, dropout=dropout, **kwargs)
            for name, module, A, B, M, alpha in checked
        }
    replace_modules(model, new)
    for name, state in to_save.items():
        model.get_submodule(name).load_state_dict(state)
    mark_to_save(model, to_save)
    freeze_all_but_trained(model)
    return model
