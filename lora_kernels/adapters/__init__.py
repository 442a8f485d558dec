"""LoRA on whole models: inject into any model, convert from peft, save / load peft adapters,
merge and unload.

Adapters move both ways in peft's own file format (``adapter_config.json`` and
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained`` loads what we save and
``load_peft_adapter`` loads what peft saves. The modules: ``matching`` (peft's name rules, LoRA
layers and modules to save), ``inject`` (``inject_lora``), ``convert`` (``from_peft``),
``files`` (the peft files), ``merge`` (whole-model merge and unload), ``patch`` (peft's own
LoRA layers computing through lora_kernels, in place: ``patch_peft``).
"""

from .convert import from_peft
from .files import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter
from .inject import inject_lora
from .matching import ALL_LINEAR, lora_layers, modules_to_save_in, set_submodule
from .merge import merge_and_unload, merge_lora, unload, unmerge_lora
from .patch import PatchReport, patch_peft, unpatch_peft

__all__ = [
    "ALL_LINEAR",
    "PatchReport",
    "CONFIG_NAME",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "from_peft",
    "inject_lora",
    "load_peft_adapter",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "modules_to_save_in",
    "patch_peft",
    "save_peft_adapter",
    "set_submodule",
    "unload",
    "unmerge_lora",
    "unpatch_peft",
]
