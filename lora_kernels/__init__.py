"""lora_kernels: exact, fused LoRA layers for PyTorch (Triton on CUDA, plain PyTorch elsewhere).

``y = x W^T + b + scaling * (dropout(x) A) B``
"""

# Public submodules; triton_path, kernels, tune, inspect and roofline import on demand: triton
# is not needed to import the package.
from . import adapters, function, quant, reference, torch_path  # noqa: F401
from ._version import __version__  # noqa: F401  (lora_kernels.__version__)
from .adapters import (
    from_peft,
    inject_lora,
    load_peft_adapter,
    merge_and_unload,
    merge_lora,
    patch_peft,
    save_peft_adapter,
    unload,
    unmerge_lora,
    unpatch_peft,
)
from .function import LoRALinearFunction, lora_linear
from .layer import LoRALayer

__all__ = [
    "LoRALayer",
    "LoRALinearFunction",
    "from_peft",
    "inject_lora",
    "load_peft_adapter",
    "lora_linear",
    "merge_and_unload",
    "merge_lora",
    "patch_peft",
    "save_peft_adapter",
    "unload",
    "unmerge_lora",
    "unpatch_peft",
]
