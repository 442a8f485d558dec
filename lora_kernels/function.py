"""``LoRALinearFunction`` and ``lora_linear``: backend dispatch and what backward keeps.

Data flows one way: ``LoRALayer`` -> here (``validation.validate`` once, then the backend: the
torch path, or the Triton path with ``tune``'s decision for the call) -> ``torch_path`` or
``triton_path`` -> the kernels. Nothing below this module checks user input again.
"""

from __future__ import annotations

import torch

from . import dora, quant, torch_path, tune
from .dropout import seed_tensor
from .validation import SEED_LIMIT, validate


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
    return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64)


def base_operand(weight: torch.Tensor, dtype: torch.dtype, strategy: str | None):
    """W as the backend reads it for one use: ``weight`` itself (``strategy`` ``None``: a
    16-bit base); a 4-bit ``weight`` dequantized by PyTorch ops (``"torch"``), or as
    ``triton_path.base_weight`` gives it (``"in_loop"``, ``"buffer"``). Never kept."""
    if strategy is None:
        return weight
    if strategy == tune.TORCH:
        return quant.dequantize(weight, dtype)
    from . import triton_path

    return triton_path.base_weight(weight, dtype, strategy)


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

        packed = weight if quant.is_4bit(weight) else None  # a parameter: read per use, not kept
        n_out, k_in = quant.base_shape(weight)
        # reshape, not view: a copy only where x's strides can't be flattened. The rows are
        # counted, not -1: x may have no elements (K = 0), as nn.Linear takes.
        x2 = x.reshape(_rows(x.shape), k_in)
        _, need_w, _, need_a, need_lb = ctx.needs_input_grad[:5]
        plan, strategy = None, None
        if backend == "triton" and k_in > 0 and n_out > 0:  # (K or N = 0: nothing to launch)
            key = (x2.device, x2.dtype, x2.shape[0], k_in, n_out, lora_A.shape[1], dropout)
            auto, four_bit = requested == "auto", packed is not None
            plan, strategy = tune.dispatch(*key, auto=auto, four_bit=four_bit)
        elif packed is not None:
            strategy = tune.TORCH
        operand = base_operand(weight, x.dtype, strategy)
        if plan is not None:
            from . import triton_path

            y2, S = triton_path.run_forward(
                x2, operand, bias, lora_A, lora_B, scaling, dropout_p, seed, plan, need_lb
            )
        else:
            y2, S = torch_path.forward(x2, operand, bias, lora_A, lora_B, scaling, dropout_p, seed)

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
        ctx.packed, ctx.strategy = packed, strategy
        return _as_output(y2, (*x.shape[:-1], n_out))

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        if ctx.packed is not None:  # a 4-bit base (frozen): read again where dx needs it
            if not ctx.needs_input_grad[0]:
                weight = quant.stand_in(ctx.packed, dy.dtype)
            else:
                strategy = ctx.strategy
                if strategy == "in_loop" and torch.is_grad_enabled():
                    strategy = "buffer"  # double backward differentiates through a tensor
                weight = base_operand(ctx.packed, dy.dtype, strategy)
        k_in, n_out = ctx.x_shape[-1], dy.shape[-1]
        m = _rows(ctx.x_shape)
        dy2 = dy.reshape(m, n_out)
        x2 = None if x is None else x.reshape(m, k_in)
        args = (dy2, x2, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed)
        needs = tuple(ctx.needs_input_grad[:5])
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients to differentiate
            _check_double_backward(ctx, x is None)
            dx, dw, db, da, dlb = torch_path.backward_differentiable(
                *args, needs, s_scaled=ctx.plan is not None
            )
        elif ctx.plan is not None:
            from . import triton_path

            grads = triton_path.run_backward(*args, ctx.plan, needs)
            dx, dw, db, da, dlb = (g if need else None for g, need in zip(grads, needs))
        else:
            dx, dw, db, da, dlb = torch_path.backward(*args, needs)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, db, da, dlb, None, None, None, None


def _as_output(y2: torch.Tensor, out_shape) -> torch.Tensor:
    """The 2-D result as the caller's ``(..., N)`` output. NOTE: not a view of ``y2`` (F.linear
    folds batch dimensions the same way): autograd refuses in-place ops on a custom Function's
    output that is a view made inside it, and users take nn.Linear's output in place
    (``y += residual``, ``nn.ReLU(inplace=True)``)."""
    if y2.shape == out_shape:
        return y2
    return torch.ops.aten._unsafe_view(y2, out_shape)


def _rows(shape) -> int:
    """The rows of ``x`` flattened to 2-D: the product of its leading sizes."""
    rows = 1
    for size in shape[:-1]:
        rows = rows * size
    return rows


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
    magnitude: torch.Tensor | None = None,
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
        magnitude: ``(N,)`` DoRA magnitude ``m``: then DoRA's output (:func:`dora_linear`).

    Returns:
        ``(..., N)`` tensor of ``x``'s dtype (under ``torch.autocast``: autocast's dtype).

    Example::

        >>> x = torch.randn(8, 64)
        >>> W, A, B = torch.randn(10, 64), torch.randn(64, 4), torch.randn(4, 10)
        >>> lora_linear(x, W, None, A, B, scaling=0.5).shape
        torch.Size([8, 10])
    """
    if magnitude is not None:
        return dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, scaling,
            dropout_p=dropout_p, seed=seed, backend=backend,
        )  # fmt: skip
    # autocast's casts here, outside the Function, where autograd records them (double backward
    # differentiates through them); the Function's own cast then has nothing left to do.
    x, weight, bias = autocast_base(x, weight, bias)
    return LoRALinearFunction.apply(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend
    )


class DoRALinearFunction(torch.autograd.Function):
    """DoRA: ``y = x W^T + b + (c - 1) (x_d W^T) + c s (x_d A) B`` with ``c = m / n``, ``n`` a
    constant (``dora.weight_norm``, detached as in peft).

    ``apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling=1.0, dropout_p=0.0,
    seed=None, backend="auto", operand=None)``, shapes as in :func:`dora_linear`, ``norm``
    ``(N,)``; for a 4-bit ``weight``, ``operand`` is its dequantized ``(N, K)`` values when the
    caller has them (else they are made here), read in forward and never saved.

    Without dropout, ``y = c z + b`` with ``z = x W^T + s (x A) B``: one fused launch on the
    Triton path (the column scale and the bias in the kernel's epilogue). Saved beyond what
    :class:`LoRALinearFunction` keeps: ``z`` (``(M, N)`` in ``x``'s dtype, only when the
    magnitude requires grad: ``dm = sum_rows(dY z) / n`` needs it, and it spares a second GEMM),
    ``c`` and ``n`` (``(N,)``). Backward folds ``c`` into ``dY``: on the Triton path into the
    dx pass's ``dY`` tiles and ``dB``'s float32 sum (``dz = dY c`` is never stored); on the
    torch path onto ``W``'s rows and ``B``'s columns (thin copies; ``dz`` is never made either).

    With dropout, on the Triton path (the base frozen): two forward launches (the T-only pass
    also stores ``mask(x)``, a transient ``(M, K)`` copy; the output pass feeds ``x`` and it
    against each W tile), ``z = x_d W^T + s x_d A B`` saved in place of dropout 0's; dx one
    launch, ``dY W + mask (dY f W + dS A^T)`` with ``f = (c - 1) / (1 - p)``. Elsewhere, and for
    an unfrozen base (``dW`` needs the mask over ``x``): PyTorch ops
    (``torch_path.dora_dropout_forward``), saving ``x`` (by reference, for ``dA`` or ``dW``),
    ``S = x_d A`` and ``U = mask(x) W^T`` (``(M, N)``, for ``dm`` only). Either way the seed is
    kept and the mask regenerated, never saved. Double backward: refused.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling=1.0, dropout_p=0.0,
        seed=None, backend="auto", operand=None,
    ):  # fmt: skip
        requested = backend
        backend = validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        scaling, dropout_p = float(scaling), float(dropout_p)
        # A 4-bit base (frozen): computed over its dequantized values (``operand``, when the
        # caller has them already: dora_linear took the norm from them), never kept.
        packed = weight if quant.is_4bit(weight) else None
        ctx.packed, ctx.strategy = packed, dense_strategy(backend)
        if packed is not None:
            weight = operand if operand is not None else base_operand(packed, x.dtype, ctx.strategy)
        n_out, k_in = weight.shape
        x2 = x.reshape(_rows(x.shape), k_in)
        need_x, need_w, _, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
        acc = dora.accumulation_dtype(x.dtype)
        c = magnitude.detach().to(acc) / norm.to(acc)
        ctx.x_shape, ctx.scaling, ctx.dropout_p = x.shape, scaling, dropout_p
        ctx.magnitude_dtype = magnitude.dtype
        out_shape = (*x.shape[:-1], n_out)
        # NOTE: a Python bool (see LoRALinearFunction): the plan's arguments must be constants.
        dropout = True if dropout_p > 0.0 else False  # noqa: SIM210
        if dropout and seed is None:
            seed = draw_seed()
        ctx.seed = seed
        plan = None
        # (with dropout an unfrozen base's dW needs the mask over x: PyTorch ops, below)
        if backend == "triton" and k_in > 0 and n_out > 0 and not (dropout and need_w):
            key = (x2.device, x2.dtype, x2.shape[0], k_in, n_out, lora_A.shape[1], dropout)
            plan, _ = tune.dispatch(*key, auto=requested == "auto", four_bit=False)
        if dropout and plan is None:
            y2, S, U = torch_path.dora_dropout_forward(
                x2, weight, bias, lora_A, lora_B, c, scaling, dropout_p, seed
            )
            ctx.save_for_backward(
                x if (need_a or need_w) else None, weight if packed is None else None, lora_A,
                lora_B, S if (need_lb or need_m) else None, U if need_m else None, c, norm,
            )  # fmt: skip
            ctx.plan = None
            return _as_output(y2, out_shape)
        if plan is not None:
            from . import triton_path

            y2, S, z = triton_path.dora_forward_op(
                x2, weight, bias, lora_A, lora_B, scaling, c, plan, need_lb or need_m, need_m,
                dropout_p, seed_tensor(seed) if dropout else None,
            )  # fmt: skip
        else:
            z, S = torch_path.forward(x2, weight, None, lora_A, lora_B, scaling, 0.0, 0)
            c_x = c.to(x.dtype)
            if need_m:
                y2 = z * c_x if bias is None else torch.addcmul(bias, z, c_x)
            else:  # (z not kept: scaled in place)
                y2 = z.mul_(c_x) if bias is None else z.mul_(c_x).add_(bias)
        ctx.save_for_backward(
            x if (need_a or need_w) else None,
            weight if packed is None else None,
            lora_A,
            lora_B,
            S if (need_lb or need_m and plan is not None) else None,
            z if need_m else None,
            c,
            norm,
        )
        ctx.plan = plan
        return _as_output(y2, out_shape)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through a DoRA layer is not supported: its "
                "backward is not differentiable; use the reference "
                "(lora_kernels.reference.dora_linear_reference)"
            )
        x, weight, lora_A, lora_B, S, z, c, norm = ctx.saved_tensors
        if ctx.packed is not None:  # a 4-bit base: dequantized again where dx reads it
            if ctx.needs_input_grad[0]:
                weight = base_operand(ctx.packed, dy.dtype, ctx.strategy)
            else:
                weight = quant.stand_in(ctx.packed, dy.dtype)
        k_in, n_out = ctx.x_shape[-1], dy.shape[-1]
        m = _rows(ctx.x_shape)
        dy2 = dy.reshape(m, n_out)
        x2 = None if x is None else x.reshape(m, k_in)
        needs = tuple(ctx.needs_input_grad[:5])
        if ctx.dropout_p > 0.0 and ctx.plan is None:
            grads = torch_path.dora_dropout_backward(
                dy2, x2, weight, lora_A, lora_B, S, z, c, norm, ctx.scaling, ctx.dropout_p,
                ctx.seed, tuple(ctx.needs_input_grad[:6]),
            )  # fmt: skip
            dx, dw, db, da, dlb, dm = grads
            if dm is not None:
                dm = dm.to(ctx.magnitude_dtype)
            if dx is not None:
                dx = dx.reshape(ctx.x_shape)
            return dx, dw, db, da, dlb, dm, None, None, None, None, None, None
        need_m = ctx.needs_input_grad[5]
        dm = None
        if ctx.plan is not None:  # (dm's sum from the dB launch's own dY tiles)
            from . import triton_path

            seed = seed_tensor(ctx.seed) if ctx.dropout_p > 0.0 else None
            grads = triton_path.dora_backward_op(
                dy2, x2, weight, lora_A, lora_B, S, ctx.scaling, c, ctx.plan, list(needs), z,
                ctx.dropout_p, seed,
            )  # fmt: skip
            dx, dw, db, da, dlb = (g if need else None for g, need in zip(grads, needs))
            if need_m:
                dm = (grads[5] / norm.to(c.dtype)).to(ctx.magnitude_dtype)
        else:
            if need_m:  # sum over the rows of dY z, in c's dtype (no copies for float32)
                dm = (dy2.to(c.dtype) * z.to(c.dtype)).sum(0) / norm.to(c.dtype)
                dm = dm.to(ctx.magnitude_dtype)
            # dz = dY c is never made: c goes on W's rows and B's columns (thin copies), and on
            # dB's and dW's columns after (dz W = dY (c W), dz B^T = dY (B c)^T).
            c_w = c.to(weight.dtype)
            w_c = weight * c_w[:, None] if needs[0] else weight
            b_c = lora_B * c.to(lora_B.dtype)
            through_z = (needs[0], needs[1], False, needs[3], needs[4])
            dx, dw, _, da, dlb = torch_path.backward(
                dy2, x2, w_c, lora_A, b_c, S, ctx.scaling, 0.0, 0, through_z
            )
            if dlb is not None:
                dlb = dlb * c.to(dlb.dtype)
            if dw is not None:
                dw = dw * c_w[:, None]
            db = dy2.sum(0) if needs[2] else None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, db, da, dlb, dm, None, None, None, None, None, None


def dense_strategy(backend: str) -> str:
    """How a DoRA call reads a 4-bit base: dequantized whole for each use of W (the norm and
    the forward share one), by our Triton kernel on the Triton path, PyTorch ops elsewhere."""
    return "buffer" if backend == "triton" else tune.TORCH


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float = 1.0,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
    base_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA (peft's ``use_dora=True``): ``y = x W^T + b + (c - 1) (x_d W^T) + c s (x_d A) B``
    with ``x_d = dropout(x)``, ``c = magnitude / n`` and ``n`` the row norms of ``W + s (A B)^T``
    (``dora.weight_norm``, factored: no ``(N, K)`` temporary; a constant in backward, as in peft).

    :class:`DoRALinearFunction`. Without dropout this is ``c * (x W^T + s (x A) B) + b``, one
    fused launch on the Triton path. With dropout the base GEMM runs over ``x`` and ``x_d`` both
    (peft's semantics): on the Triton path in the fused launches (both products against each W
    tile), in PyTorch ops on the torch path and for an unfrozen base; the mask from ``seed``
    (drawn when ``None``), the backend's own, as ``lora_linear``'s. ``magnitude``:
    ``(N,)``, floating; ``base_sq``: ``dora.base_row_norms_sq`` of ``weight`` when cached (the
    layer caches it).

    ``weight`` may be a frozen bitsandbytes 4-bit weight (QDoRA): dequantized to ``x``'s dtype
    once per call (one transient ``(N, K)`` buffer: our Triton kernel on the Triton path,
    PyTorch ops elsewhere), which the norm and the forward both read; backward dequantizes it
    again where ``dx`` needs it. Nothing dense is kept between forward and backward.
    """
    four_bit = quant.is_4bit(weight)
    n_out = quant.base_shape(weight)[0]
    if not isinstance(magnitude, torch.Tensor) or magnitude.shape != (n_out,):
        shape = tuple(getattr(magnitude, "shape", ()))
        raise ValueError(f"magnitude must be a ({n_out},) tensor (one per output), got {shape}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be floating point, got {magnitude.dtype}")
    x, weight, bias = autocast_base(x, weight, bias)
    operand = None
    values = weight  # what the norm reads: W's values
    if four_bit:  # (checked before anything is decoded)
        resolved = validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        with torch.no_grad():
            operand = values = base_operand(weight, x.dtype, dense_strategy(resolved))
    norm = dora.weight_norm(values, lora_A, lora_B, scaling, base_sq)
    return DoRALinearFunction.apply(
        x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, backend,
        operand,
    )  # fmt: skip
