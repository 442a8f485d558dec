"""``LoRALinearFunction`` and ``lora_linear``: validation, backend dispatch, what backward keeps.

Data flows one way: ``LoRALayer`` -> here (validate once, pick a backend) -> ``torch_path`` or the
Triton kernels. Everything a user can get wrong is checked here, before any computation, and
reported with the sizes / dtypes / devices involved.
"""

from __future__ import annotations

import numbers
import os

import torch

from . import quant, torch_path

BACKENDS = ("auto", "triton", "torch")
# The device types "auto" runs the kernels on. Tests add "cpu" under TRITON_INTERPRET=1, where the
# interpreter stands in for a GPU (tuned dispatch, tune_model).
AUTO_TRITON_DEVICE_TYPES = ("cuda",)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# "auto" takes the kernels for these; float64 runs on them only when asked (backend="triton").
AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Seeds are non-negative 31-bit ints: every backend reads them the same way, and the kernels
# always receive an int32 (Triton types an int argument by its value).
_SEED_LIMIT = 2**31


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (Triton's own truthy spellings)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


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
            and triton_available()
        )
        return "triton" if use_triton else "torch"
    if x.device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs a CUDA device, but the tensors are on {x.device}; "
            "use backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels in Triton's CPU interpreter"
        )
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    return "triton"


def _check_tensor(name: str, t: object, dims: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def validate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
    backend: str,
) -> str:
    """Check every argument of ``lora_linear``; return the backend to run on."""
    _check_tensor("x", x, None)
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    n_out, k_in = weight.shape
    if x.dim() == 0:
        raise ValueError(
            f"x must have shape (..., in_features={k_in}), got a scalar "
            f"(weight shape {tuple(weight.shape)})"
        )
    if x.shape[-1] != k_in:
        raise ValueError(
            f"x has last dimension {x.shape[-1]} but the layer has in_features={k_in} "
            f"(weight shape {tuple(weight.shape)}, x shape {tuple(x.shape)})"
        )
    if lora_A.shape[0] != k_in:
        raise ValueError(
            f"lora_A has shape {tuple(lora_A.shape)}: expected ({k_in}, rank), its first "
            f"dimension must equal in_features={k_in} of weight {tuple(weight.shape)}"
        )
    if lora_B.shape[1] != n_out:
        raise ValueError(
            f"lora_B has shape {tuple(lora_B.shape)}: expected (rank, {n_out}), its second "
            f"dimension must equal out_features={n_out} of weight {tuple(weight.shape)}"
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
            f"bias has {bias.shape[0]} elements but out_features={n_out} "
            f"(weight shape {tuple(weight.shape)})"
        )

    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; supported dtypes are "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    # The base layer computes in x's dtype, as nn.Linear does. The adapters may be kept in
    # another dtype (float32 adapters on a bfloat16 model, peft's default): they are cast to x's
    # dtype for the computation and their gradients come back in their own dtype.
    for name, t in named[1:]:
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

    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return resolve_backend(x, backend)


@torch.compiler.assume_constant_result  # a fact of the build (torch 2.6's dynamo can't trace it)
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device``'s type, ``None`` where it is off."""
    kind = device.type
    if not _autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _autocast(t: object, dtype: torch.dtype) -> object:
    """``t`` as autocast would pass it to ``F.linear``: floating-point tensors other than
    float64 in autocast's dtype, everything else as it is."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def autocast_base(x: object, weight: object, bias: object) -> tuple:
    """``(x, weight, bias)`` as autocast runs ``nn.Linear``: in autocast's dtype when it is on
    for ``x``'s device type, else as given. The adapters keep their dtype (see ``validate``)."""
    cast = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if cast is None:
        return x, weight, bias
    # NOTE: a 4-bit weight stays as it is (a float quant_storage holds codes, not values): it is
    # dequantized to x's dtype, which autocast sets.
    packed = quant.is_4bit(weight)
    return _autocast(x, cast), weight if packed else _autocast(weight, cast), _autocast(bias, cast)


def draw_seed() -> torch.Tensor:
    """A dropout seed from PyTorch's default generator, so ``torch.manual_seed`` reproduces runs.

    A 0-d int64 tensor, not an int: reading it (``.item()``) would break a ``torch.compile``
    graph; the torch path passes it to its mask op as is, the Triton launch reads it.
    """
    return torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64)


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


class LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * (dropout(x) A) B`` with a hand-written, memory-lean backward.

    ``apply(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_p=0.0, seed=None,
    backend="auto")``; shapes as in :func:`lora_linear`. Saved for backward: ``x`` (by reference,
    only when ``dA`` or ``dW`` is needed; under autocast its autocast-dtype copy, as ``F.linear``
    keeps), the weights (parameters, no copies), ``S = dropout(x) A`` (``(M, r)``, only when
    ``dB`` is needed) and the dropout seed; never a dropped copy of ``x``.

    Dtypes: ``x``, ``weight`` and ``bias`` share one; ``lora_A`` and ``lora_B`` share one, which
    may differ (cast to ``x``'s for the computation; their gradients come back in their own).
    Under ``torch.autocast`` ``x``, ``weight`` and ``bias`` are cast to autocast's dtype first.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scaling=1.0,
        dropout_p=0.0,
        seed=None,
        backend="auto",
    ):
        # Under torch.autocast: gradients returned in autocast's dtype are cast back to each
        # input's own dtype by autograd. lora_linear casts first, where autograd records it;
        # this is for direct callers (and then nothing is left to cast).
        originals = (x, weight, bias)
        x, weight, bias = autocast_base(x, weight, bias)
        cast_here = any(a is not b for a, b in zip((x, weight, bias), originals))
        requested = backend
        packed = None  # a 4-bit base weight: dequantized for each use, never kept
        if quant.is_4bit(weight):
            quant.check(weight)
            packed, weight = weight, _stand_in(weight, x)
        backend = validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        scaling, dropout_p = float(scaling), float(dropout_p)
        # NOTE: a Python bool even where torch.compile(dynamic=True) makes the layer's float
        # dropout symbolic (the comparison becomes a guard): the plan's arguments must be
        # constants.
        dropout = True if dropout_p > 0.0 else False  # noqa: SIM210
        if not dropout:
            seed = 0
        elif seed is None:
            seed = draw_seed()

        k_in, n_out = weight.shape[1], weight.shape[0]
        # reshape, not view: a copy only where x's strides can't be flattened.
        x2 = x.reshape(-1, k_in)
        _, need_w, _, need_a, need_lb = ctx.needs_input_grad[:5]
        plan = None
        if backend == "triton":
            from . import triton_path, tune
            from .kernels.common import padded_rank

            # The launch plan, chosen once here and kept on ctx for backward (as a string: it
            # travels through torch.library ops): the key's tuned decision where the tuning
            # cache has one (which, for "auto", may be the torch path), else the tables.
            rank = padded_rank(lora_A.shape[1])  # a constant even when the size is symbolic
            m = x2.shape[0]
            base = "16bit" if packed is None else "nf4"
            plan = tune.choose(
                x2.device, x2.dtype, m, k_in, n_out, rank, dropout, requested == "auto", base
            )
            if plan == tune.TORCH:
                backend, plan = "torch", None
            elif plan is None:
                plan = triton_path.plan_string(x2.device, x2.dtype, rank, dropout)
        # A 4-bit weight: read by the fused kernels as it is (small M, see triton_path.in_loop),
        # or dequantized into one transient buffer in x's dtype.
        in_loop = packed is not None and backend == "triton"
        if in_loop:
            tuned = tune.four_bit_strategy(x2.device, x2.dtype, m, k_in, n_out, rank, dropout)
            in_loop = triton_path.in_loop(x2.device, x2.dtype, m, tuned)
        weight, four_bit = _base_weight(packed, weight, x.dtype, backend == "triton", in_loop)
        if backend == "triton":
            y2, S = triton_path.forward_op(
                x2, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_tensor(seed), plan,
                need_lb, **four_bit,
            )  # fmt: skip
        else:
            y2, S = torch_path.forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)

        ctx.save_for_backward(
            x if (need_a or need_w) else None,
            weight if packed is None else None,
            lora_A,
            lora_B,
            S if need_lb else None,
        )
        ctx.x_shape = x.shape
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.plan = scaling, dropout_p, seed, plan
        ctx.cast_here = cast_here
        ctx.packed = packed  # a parameter (the 4-bit weight), not an activation
        ctx.in_loop = in_loop
        out_shape = (*x.shape[:-1], n_out)
        if y2.shape == out_shape:
            return y2
        # NOTE: not a view of y2 (F.linear folds batch dimensions the same way): autograd refuses
        # in-place ops on a custom Function's output that is a view made inside it, and users
        # take nn.Linear's output in place (`y += residual`, `nn.ReLU(inplace=True)`).
        return torch.ops.aten._unsafe_view(y2, out_shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        four_bit = {}
        if ctx.packed is not None:  # read again where dx needs it (4-bit bases are frozen)
            if not ctx.needs_input_grad[0]:
                weight = _stand_in(ctx.packed, dy)
            else:  # double backward differentiates through a dequantized weight
                in_loop = ctx.in_loop and not torch.is_grad_enabled()
                weight, four_bit = _base_weight(
                    ctx.packed, None, dy.dtype, ctx.plan is not None, in_loop
                )
        k_in, n_out = ctx.x_shape[-1], dy.shape[-1]
        dy2 = dy.reshape(-1, n_out)
        x2 = None if x is None else x.reshape(-1, k_in)
        args = (dy2, x2, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed)
        needs = tuple(ctx.needs_input_grad[:5])
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients to differentiate
            _check_double_backward(ctx, x is None)
            dx, dw, db, da, dlb = torch_path.backward_differentiable(
                *args, needs, s_scaled=ctx.plan is not None
            )
        elif ctx.plan is not None:
            from . import triton_path

            *tensors, seed = args
            grads = triton_path.backward_op(
                *tensors, _seed_tensor(seed), ctx.plan, list(needs), **four_bit
            )
            dx, dw, db, da, dlb = (g if need else None for g, need in zip(grads, needs))
        else:
            dx, dw, db, da, dlb = torch_path.backward(*args, needs)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, db, da, dlb, None, None, None, None


def _base_weight(packed, weight, dtype: torch.dtype, triton: bool, in_loop: bool):
    """``(weight, four_bit)`` for the backends: ``weight`` itself when not 4-bit; the packed
    bytes and the ops' ``four_bit_args`` when the fused kernels dequantize in their K loop;
    else the transient dequantized ``(N, K)`` buffer of ``dtype`` (by our Triton kernel on the
    Triton path, by PyTorch ops on the torch path)."""
    if packed is None:
        return weight, {}
    if not triton:  # PyTorch ops: the same math as the kernels, bit for bit
        return quant.dequantize(packed, dtype), {}
    from . import triton_path

    w = quant.packed(packed)
    if in_loop:
        return w.data, triton_path.four_bit_args(w)
    return triton_path.dequantize_op(w.data, w.scales, w.code, *w.shape, w.blocksize, dtype), {}


def _stand_in(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A zero-stride ``(N, K)`` tensor of ``like``'s dtype on the 4-bit weight's device: what
    validation reads of a base weight (shape, dtype, device) without its memory."""
    n, k = quant.shape(packed)
    return torch.zeros((), dtype=like.dtype, device=packed.device).expand(n, k)


def _check_double_backward(ctx, x_dropped: bool) -> None:
    """Refuse, with the reason, the double backwards whose second derivatives would be wrong."""
    if x_dropped and ctx.needs_input_grad[4] and ctx.needs_input_grad[0]:
        raise RuntimeError(
            "double backward (create_graph=True) through lora_linear with x and lora_B "
            "requiring grad but lora_A frozen: dB's dependence on x needs x, which forward "
            "does not keep in that case (only S = x A); let lora_A require grad, or use the "
            "reference implementation"
        )
    if ctx.plan is not None and ctx.dropout_p > 0.0:
        raise RuntimeError(
            "double backward (create_graph=True) through lora_linear with dropout is supported "
            "on backend='torch' only: the Triton kernels' dropout mask exists only inside them"
        )
    if ctx.cast_here:
        raise RuntimeError(
            "double backward (create_graph=True) through LoRALinearFunction.apply under "
            "torch.autocast: the autocast casts made inside it are not recorded by autograd; "
            "call lora_linear (or LoRALayer), which casts before it"
        )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A) B``, differentiable in every tensor.

    Args:
        x: ``(..., K)`` input of any leading shape.
        weight: ``(N, K)`` base weight (``nn.Linear.weight``), ``x``'s dtype; or a frozen
            bitsandbytes 4-bit weight (``Params4bit``, its ``quant_state`` giving ``(N, K)``),
            dequantized to ``x``'s dtype for each use and never kept (on the Triton path inside
            the fused kernels' K loop for small M: ``triton_path.in_loop``).
        bias: ``(N,)`` base bias or ``None``, ``x``'s dtype.
        lora_A: ``(K, r)`` LoRA down-projection; its dtype may differ from ``x``'s (it is cast
            to ``x``'s for the computation, and its gradient comes back in its own).
        lora_B: ``(r, N)`` LoRA up-projection, ``lora_A``'s dtype.
        scaling: ``s``, the factor on the LoRA branch.
        dropout_p: dropout probability on the LoRA branch's input, in ``[0, 1)``.
        seed: dropout seed; ``None`` draws one from PyTorch's default generator.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., N)`` tensor of ``x``'s dtype (under ``torch.autocast``: autocast's dtype).

    Example::

        >>> x = torch.randn(8, 64)
        >>> W, A, B = torch.randn(10, 64), torch.randn(64, 4), torch.randn(4, 10)
        >>> lora_linear(x, W, None, A, B, scaling=0.5).shape
        torch.Size([8, 10])
    """
    # autocast's casts here, outside the Function, where autograd records them (double backward
    # differentiates through them); the Function's own cast then has nothing left to do.
    x, weight, bias = autocast_base(x, weight, bias)
    return LoRALinearFunction.apply(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend
    )
