"""Bytes kept for backward by one LoRA layer, ours against peft's, with and without dropout.

    python benchmarks/saved_memory.py [--tokens 4096] [--features 4096] [--rank 16]

Counted with ``torch.autograd.graph.saved_tensors_hooks`` on one forward of a layer whose input
requires grad (as inside a network), bfloat16. Every saved tensor is counted once (by storage);
parameters are reported apart from activations, since they exist whether or not backward runs.
The torch path and peft run for real on the CPU; the Triton path runs on ``meta`` tensors with
its kernel launches captured, not executed: what it saves is a function of shapes only.
"""

from __future__ import annotations

import argparse
import os
import sys

# The Triton path's launch checks need a CUDA device or the interpreter; its kernels never run
# here (captured), so the interpreter is only what lets the meta-tensor call through.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lora_kernels import LoRALayer  # noqa: E402


def saved_bytes(forward, params: list[torch.Tensor]) -> dict:
    """``{"activations": bytes, "parameters": bytes, "tensors": [(shape, dtype), ...]}``."""
    param_ids = {id(p) for p in params}
    # A saved view of a parameter (peft saves W^T) shares the parameter's storage.
    param_storages = {p.untyped_storage().data_ptr() for p in params if p.device.type != "meta"}
    seen, out = set(), {"activations": 0, "parameters": 0, "tensors": []}

    def pack(t):
        meta = t.device.type == "meta"
        key = id(t) if meta else (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            is_param = id(t) in param_ids or (not meta and key[0] in param_storages)
            nbytes = t.untyped_storage().nbytes() if not meta else t.numel() * t.element_size()
            out["parameters" if is_param else "activations"] += nbytes
            if not is_param:
                out["tensors"].append((tuple(t.shape), str(t.dtype).replace("torch.", "")))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return out


def measure(tokens: int, features: int, rank: int, dropout: float, dtype=torch.bfloat16):
    torch.manual_seed(0)
    base = nn.Linear(features, features, dtype=dtype)
    rows = []

    def ours(device, backend):
        linear = nn.Linear(features, features, dtype=dtype, device=device)
        layer = LoRALayer.from_linear(linear, rank=rank, alpha=2 * rank, dropout=dropout)
        x = torch.randn(tokens, features, dtype=dtype, device=device, requires_grad=True)
        from lora_kernels import lora_linear

        def fwd():
            return lora_linear(
                x, linear.weight, linear.bias, layer.lora_A, layer.lora_B, layer.scaling,
                dropout_p=dropout, backend=backend,
            )  # fmt: skip

        return saved_bytes(fwd, list(layer.parameters()))

    rows.append(("lora_kernels, torch path (CPU, measured)", ours("cpu", "torch")))
    from lora_kernels.kernels.common import capture_launches

    with capture_launches():
        rows.append(("lora_kernels, Triton path (shapes, meta)", ours("meta", "triton")))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        rows.append(("peft (not installed: pip install -e '.[peft]')", None))
    else:
        model = nn.Sequential()
        model.add_module("proj", base)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"]
        )
        peft_model = get_peft_model(model, config).to(dtype)
        x = torch.randn(tokens, features, dtype=dtype, requires_grad=True)
        rows.append(
            (
                "peft LoRA Linear (CPU, measured)",
                saved_bytes(lambda: peft_model(x), list(peft_model.parameters())),
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    x_bytes = args.tokens * args.features * 2
    print(f"layer {args.features} -> {args.features}, rank {args.rank}, {args.tokens} tokens, bf16")
    print(f"x itself: {x_bytes / 2**20:.2f} MiB\n")
    print(f"{'provider':48} {'dropout':>7} {'activations MiB':>16} {'beyond x MiB':>13}  saved")
    for dropout in (0.0, 0.1):
        for name, r in measure(args.tokens, args.features, args.rank, dropout):
            if r is None:
                print(f"{name:48} {dropout:7.1f}")
                continue
            act = r["activations"] / 2**20
            beyond = (r["activations"] - x_bytes) / 2**20
            shapes = ", ".join(f"{s}:{d}" for s, d in r["tensors"])
            print(f"{name:48} {dropout:7.1f} {act:16.2f} {beyond:13.2f}  {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
