"""Test-session set-up.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when ``triton`` is imported, so ``TRITON_INTERPRET`` is set here, before any test module
imports the package's kernels. On a machine with a GPU the same tests run on CUDA tensors.
"""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tuning decisions of the test session go to a file of its own, never the user's cache.
os.environ["LORA_KERNELS_CACHE"] = os.path.join(tempfile.mkdtemp(), "tune.json")
