"""The seeds' toy training run on ``LoRALayer``: ``python -m lora_kernels.demo``.

``LoRALayer(64, 10, rank=4)``, 1000 random samples of 64 features and 10 targets (seed 42),
10 full-batch epochs of Adam (lr 0.01) on the trainable parameters only, MSE loss.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .layer import LoRALayer
from .validation import resolve_backend


def train(
    epochs: int = 10, seed: int = 42, device: str | torch.device = "cpu", log=print
) -> tuple[LoRALayer, list[float]]:
    """Run the toy program; return the trained layer and the loss of every epoch."""
    torch.manual_seed(seed)
    model = LoRALayer(64, 10, rank=4).to(device)
    x = torch.randn(1000, 64, device=device)
    y = torch.randn(1000, 10, device=device)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"Trainable parameters: {trainable}")
    log(f"Total parameters: {total}")
    log(f"Backend: {resolve_backend(x)} (device {x.device}, dtype {x.dtype})")

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loss_fn = nn.MSELoss()
    losses = []
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        log(f"Epoch {epoch + 1}/{epochs}, Loss: {loss.item():.6f}")
    return model, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    train(args.epochs, args.seed, args.device)


if __name__ == "__main__":
    main()
