"""Every check of what a user passes in, made once, before anything is computed.

``validate`` checks ``lora_linear``'s arguments and picks the backend; the ``check_*`` functions
check the layer-level arguments ``LoRALayer``, ``inject_lora`` and ``load_peft_adapter`` take.
Each error names what is wrong with the sizes, dtypes or devices involved.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import env, quant

BACKENDS = ("auto", "triton", "torch")
# The device types "auto" runs the kernels on. Tests add "cpu" under TRITON_INTERPRET=1, where the
# interpreter stands in for a GPU (tuned dispatch, tune_model).
AUTO_TRITON_DEVICE_TYPES = ("cuda",)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# "auto" takes the kernels for these; float64 runs on them only when asked (backend="triton").
AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Seeds are non-negative 31-bit ints: every backend reads them the same way, and the kernels
# always receive an int32 (Triton types an int argument by its value).
SEED_LIMIT = 2**31


# The highest rank the kernels take: every build up to it fits each GPU's shared memory, every
# build above it (padded to 256) does not on some (`python -m lora_kernels.inspect --rank 128
# --rank 256`, bfloat16: at 128 at most 85% of a limit; at 256 up to 327,776 B of sm_90's
# 232,448 and 196,608 of sm_80's 166,912). backend="auto" runs higher ranks on the torch path.
KERNEL_MAX_RANK = 128


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """The backend a call with input ``x`` runs on: ``"triton"`` or ``"torch"``.

    ``"auto"`` takes Triton for CUDA tensors of float16, bfloat16 or float32, the torch path
    otherwise. ``"triton"`` runs every supported dtype (float64 too, without tensor cores: it is
    how gradcheck verifies the kernels). Raises ``ValueError`` for an unknown backend, and for
    ``"triton"`` on tensors the kernels can't reach.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = (
            x.device.type in AUTO_TRITON_DEVICE_TYPES
            and x.dtype in AUTO_TRITON_DTYPES
            and env.triton_available()
        )
        return "triton" if use_triton else "torch"
    if x.device.type != "cuda" and not env.triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs a CUDA device, but the tensors are on {x.device}; "
            "use backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels in Triton's CPU interpreter"
        )
    if not env.triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    return "triton"


def _check_tensor(name: str, t: object, dims: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend: str) -> str:
    """Check every argument of ``lora_linear`` (the shapes and types its docstring gives); return
    the backend to run on. ``weight`` may be a bitsandbytes 4-bit weight (its ``(N, K)`` from its
    ``quant_state``, ``quant.check``)."""
    _check_tensor("x", x, None)
    four_bit = quant.is_4bit(weight)
    if four_bit:
        quant.check(weight)
        shape = quant.shape(weight)
    else:
        _check_tensor("weight", weight, 2)
        shape = tuple(weight.shape)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    n_out, k_in = shape
    if x.dim() == 0:
        raise ValueError(
            f"x must have shape (..., in_features={k_in}), got a scalar (weight shape {shape})"
        )
    if x.shape[-1] != k_in:
        raise ValueError(
            f"x has last dimension {x.shape[-1]} but the layer has in_features={k_in} "
            f"(weight shape {shape}, x shape {tuple(x.shape)})"
        )
    if lora_A.shape[0] != k_in:
        raise ValueError(
            f"lora_A has shape {tuple(lora_A.shape)}: expected ({k_in}, rank), its first "
            f"dimension must equal in_features={k_in} of weight {shape}"
        )
    if lora_B.shape[1] != n_out:
        raise ValueError(
            f"lora_B has shape {tuple(lora_B.shape)}: expected (rank, {n_out}), its second "
            f"dimension must equal out_features={n_out} of weight {shape}"
        )
    if lora_A.shape[1] != lora_B.shape[0]:
        raise ValueError(
            f"rank mismatch: lora_A {tuple(lora_A.shape)} has rank {lora_A.shape[1]} but "
            f"lora_B {tuple(lora_B.shape)} has rank {lora_B.shape[0]}"
        )
    if lora_A.shape[1] < 1:
        raise ValueError(f"rank must be a positive int, got lora_A of shape {tuple(lora_A.shape)}")
    if bias is not None and bias.shape[0] != n_out:
        raise ValueError(
            f"bias has {bias.shape[0]} elements but out_features={n_out} (weight shape {shape})"
        )

    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; supported dtypes are "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    # The base layer computes in x's dtype, as nn.Linear does (a 4-bit weight holds codes: it
    # is dequantized to x's dtype). The adapters may be kept in another dtype (float32 adapters
    # on a bfloat16 model, peft's default): they are cast to x's dtype for the computation and
    # their gradients come back in their own dtype.
    for name, t in named[1:]:
        if name == "weight" and four_bit:
            continue
        if name in ("weight", "bias") and t.dtype != x.dtype:
            raise TypeError(
                f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; "
                "cast them to one dtype (e.g. layer.to(x.dtype)), or run under torch.autocast"
            )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(
            f"dtype mismatch: lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}; "
            "the adapters must share one dtype"
        )
    if lora_A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"lora_A and lora_B have dtype {lora_A.dtype}; supported dtypes are "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    for name, t in named[1:]:
        if t.device != x.device:
            raise ValueError(
                f"device mismatch: x is on {x.device} but {name} is on {t.device}; "
                "move them to one device"
            )

    _check_real("scaling", scaling)
    # NOTE: comparisons, not math.isfinite: torch.compile traces them on a symbolic scaling
    # (False for NaN too).
    if not -math.inf < scaling < math.inf:
        raise ValueError(f"scaling must be finite, got {scaling}")
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    resolved = resolve_backend(x, backend)
    rank = lora_A.shape[1]
    if resolved == "triton" and rank > KERNEL_MAX_RANK:
        if backend == "triton":
            raise ValueError(
                f"backend='triton': rank {rank} is over the kernels' limit of "
                f"{KERNEL_MAX_RANK} (their builds for higher ranks need more shared memory "
                "than a GPU has); backend='auto' runs it on the torch path"
            )
        return "torch"
    return resolved


# --- the layer's arguments ----------------------------------------------------------------------


def check_rank(rank: object) -> int:
    """``rank`` as an int; ``ValueError`` unless it is a positive int."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return int(rank)


def check_dropout(dropout: object) -> float:
    """``dropout`` as a float; ``TypeError`` / ``ValueError`` unless it is a real in ``[0, 1)``."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a real number in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def check_adapter_dtype(adapter_dtype: object) -> torch.dtype | None:
    """``adapter_dtype`` as given; ``TypeError`` unless it is ``None`` or a supported dtype."""
    if adapter_dtype is not None and adapter_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"adapter_dtype must be None or one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {adapter_dtype!r}"
        )
    return adapter_dtype


def check_alpha(alpha: object) -> None:
    """``TypeError`` unless ``alpha`` is ``None`` or a real number; ``ValueError`` if it is not
    finite (a NaN scaling is no scaling: BLAS treats ``alpha=nan`` as 1 on some shapes)."""
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"alpha must be a real number or None, got {type(alpha).__name__}")
    if alpha is not None and not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
