"""``python -m lora_kernels.tune``: tune layer calls on this GPU and store the decisions.

python -m lora_kernels.tune --shape MxKxNxR [--dtype bfloat16] [--dropout 0.1] [--base nf4]
                            [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from .. import env
from . import TORCH, cache_path, tune

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if match is None or 0 in (dims := tuple(int(g) for g in match.groups())):
        raise argparse.ArgumentTypeError(f"expected MxKxNxR of positive ints, got {text!r}")
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_kernels.tune",
        description="Tune LoRA layer calls on this GPU and store the decisions in the cache.",
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        required=True,
        metavar="MxKxNxR",
        help="tokens x in x out x rank (repeatable)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0 or > 0)")
    parser.add_argument(
        "--base",
        choices=("16bit", "nf4"),
        default="16bit",
        help="nf4: over a 4-bit base (a synthetic NF4 weight): its two strategies and torch",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per shape")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif env.triton_interpreter_enabled():
        device = torch.device("cpu")
    else:
        print("lora_kernels.tune needs a CUDA GPU (or TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    for m, k, n, r in args.shape:
        key, decision = tune(device, DTYPES[args.dtype], m, k, n, r, args.dropout, args.base)
        if args.json:
            print(json.dumps({"key": key, **decision}))
        else:
            ms = decision["ms"]
            print(
                f"{m}x{k}x{n}x{r} {args.dtype} dropout={args.dropout:g}: {decision['provider']}"
                + (f" ({decision['strategy']})" if "strategy" in decision else "")
                + " "
                f"(tables {ms['tables']:.4g} ms, best Triton {ms['best_triton']:.4g} ms, "
                f"torch {ms[TORCH]:.4g} ms) -> {cache_path()}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
