"""Facts of the install and the environment that every layer of the package reads: whether
Triton is importable, whether its interpreter is on, and the truthy spellings of our flags."""

from __future__ import annotations

import os

import torch

# The spellings an environment flag is on with (Triton's own, for TRITON_INTERPRET).
TRUTHY = ("1", "true", "on", "yes")


def flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to one of ``TRUTHY`` (any case, any
    surrounding blanks)."""
    return os.environ.get(name, "").strip().lower() in TRUTHY


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (Triton's own truthy spellings)."""
    return flag("TRITON_INTERPRET")


_triton_available: bool | None = None


@torch.compiler.assume_constant_result  # a fact of the install: a constant of any graph
def triton_available() -> bool:
    """Whether ``triton`` can be imported here (it is a Linux-only dependency)."""
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_available = False
        else:
            _triton_available = True
    return _triton_available
