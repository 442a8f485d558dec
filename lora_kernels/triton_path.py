"""The Triton path: host-side orchestration of the kernels in ``kernels/``.

Same contract as ``torch_path`` (2-D, validated inputs), plus a ``Plan``: the launch configs and
precision chosen once on the host in forward and kept on ``ctx`` for backward.

What forward keeps for backward is ``T = s * dropout(x) A`` in float32 (``(M, r)``), so ``dB`` is
a plain reduction and the LoRA intermediate is never rounded to 16 bits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import List  # noqa: UP035  (see backward_op)

import torch

from . import quant, roofline
from .dropout import seed_tensor
from .kernels import dequant
from .kernels.common import acc_dtype, alloc
from .kernels.configs import (
    dora_dropout_config,
    dora_fwd_config,
    dora_grad_config,
    fused_mm_config,
    fused_mm_t_config,
    grad_config,
)
from .kernels.fused_mm import fused_mm
from .kernels.lora_grad import lora_grad

# The interpreter has no GPU generation: it runs Hopper's tables (the ones most users launch),
# with a small SM count so the M-split of the reductions is exercised on test-sized inputs.
INTERPRETER_ARCH = 9
INTERPRETER_SMS = 4

# Hopper's tables need Hopper's shared memory per block (227 KiB; up to 150 KiB a build, see
# docs/kernels.md). GPUs of capability >= 9 with less (the RTX 50 series, 12.x: 99 KiB) take
# Ampere's tables, which fit in 99 KiB (51 KiB at most).
HOPPER_SHARED_BYTES = 227 * 1024


# Hopper's tables (H100, H200, B200) carry a "TMA" flag per launch: True runs it on the
# descriptor kernels over a persistent grid (kernels/fused_mm.py and lora_grad.py) wherever the
# call's operands allow it, False on the pointer kernels. True for 16-bit inputs, but not for dx
# with dropout: there its 128 x 128 tile, the LoRA term and the mask pass 255 registers (5
# spills, sm_90 bf16 r16). float32 stays on pointers: its FMA dots keep their operands in
# registers, and the descriptor forward spilled 19 to 39 instructions (sm_90 / sm_100, ranks 4
# and 16). Blackwell (Hopper's tables too) from Triton 3.8 only (descriptors_build). The builds
# behind this: docs/kernels.md.
DESCRIPTOR_ARCHS = (9,)
DESCRIPTOR_DTYPES = (torch.float16, torch.bfloat16)

# The roofline GPU of each config table, for the 4-bit strategies' threshold (in_loop_max_m).
ROOFLINE_GPU = {8: "A100", 9: "H100"}
ENV_4BIT = "LORA_KERNELS_4BIT"  # forces a 4-bit base's strategy (see in_loop)
FOUR_BIT_STRATEGIES = ("", "in_loop", "buffer")  # its values ("": chosen by M)
MIN_RANK = 1  # the in-loop tiles' BLOCK_M is the same at every rank


def config_arch(major: int, max_shared_bytes: int) -> int:
    """The config tables' key for a GPU of compute capability ``major.x`` whose blocks may use up
    to ``max_shared_bytes`` of shared memory (the opt-in limit): 9 (Hopper's tables) for H100,
    H200 and B200, 8 (Ampere's) for everything else (A100, RTX 30 / 40 / 50 series, L4, L40S)."""
    return 9 if major >= 9 and max_shared_bytes >= HOPPER_SHARED_BYTES else 8


# The launches of one layer call (forward and its backward), by the Plan field that configures
# each (the tuner changes one field at a time; inspect and the GPU check name them).
LAUNCHES = {
    "fwd": "lora_fwd",  # the fused forward: y (and T)
    "t_only": "lora_fwd_t",  # T-only: the dropout forward's first pass, dS without dx
    "dx": "lora_bwd_dx",  # the fused dx pass (and dS)
    "grad_dA": "lora_bwd_dA",  # the dA reduction
    "grad_dB": "lora_bwd_dB",  # the dB reduction
}


@dataclass(frozen=True)
class Plan:
    """Launch configs of one layer call (forward and its backward), chosen once on the host: a
    config per launch (``LAUNCHES``), and what the launches share."""

    fwd: dict  # lora_fwd
    t_only: dict  # T-only launches of the fused kernel (dropout's lora_fwd_t, dS without dx)
    dx: dict  # lora_bwd_dx
    grad_dA: dict
    grad_dB: dict
    num_sms: int
    precision: str  # tl.dot input_precision for float32 operands
    upcast: bool  # interpreter + bfloat16: dot operands through float32
    # A 4-bit base whose W is dequantized inside the fused kernels' K loop (see in_loop); above
    # the threshold it is dequantized into a buffer, and fwd and dx run.
    fwd_4bit: dict = dataclasses.field(default_factory=dict)
    dx_4bit: dict = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=64)
def _device_facts(device: torch.device) -> tuple[int, int]:
    """``(config_arch, SM count)`` of ``device``."""
    if device.type != "cuda":
        return INTERPRETER_ARCH, INTERPRETER_SMS
    from triton.runtime import driver

    props = torch.cuda.get_device_properties(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    max_shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return config_arch(props.major, max_shared), props.multi_processor_count


@functools.lru_cache(maxsize=64)
def _device_major(device: torch.device) -> int:
    """The compute-capability major of ``device`` (the interpreter's: Hopper's)."""
    if device.type != "cuda":
        return INTERPRETER_ARCH
    return torch.cuda.get_device_properties(device).major


def descriptors_build(major: int) -> bool:
    """Whether the descriptor kernels go on a GPU of capability ``major.x`` (given Hopper's
    tables): Hopper always; Blackwell from Triton 3.8, the first to build their fused forward
    with tensor cores there (3.4 to 3.7 gave a kernel whose SASS shows no UTCHMMA)."""
    import triton

    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    return major == 9 or (major >= 10 and version >= (3, 8))


def plan_for(
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    dropout: bool = False,
    arch: int | None = None,
    num_sms: int | None = None,
    major: int | None = None,
) -> Plan:
    """The tables' plan for inputs of ``dtype`` on ``device`` at padded ``rank`` (all a plan
    depends on of a call), ``dropout`` whether the call drops out; ``arch`` (a ``config_arch``:
    8 or 9), ``num_sms`` and ``major`` (the capability major) override the device's own
    (``inspect`` builds for GPUs it doesn't have)."""
    dev_arch, dev_sms = _device_facts(device)
    arch = dev_arch if arch is None else arch
    num_sms = dev_sms if num_sms is None else num_sms
    major = _device_major(device) if major is None else major
    descriptors = dtype in DESCRIPTOR_DTYPES and descriptors_build(major)
    # float32 follows PyTorch's own switch: TF32 only when the user allowed it for matmuls.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32

    def tma(config: dict, allowed: bool = True) -> dict:
        if arch not in DESCRIPTOR_ARCHS:
            return config
        return {**config, "TMA": allowed and descriptors}

    return Plan(
        fwd=tma(fused_mm_config(arch, dtype, rank)),
        t_only=tma(fused_mm_t_config(arch, dtype)),
        dx=tma(fused_mm_config(arch, dtype, rank, dropout_out=dropout), allowed=not dropout),
        grad_dA=tma(grad_config(arch, dtype, rank, dropout=dropout)),
        grad_dB=tma(grad_config(arch, dtype, rank)),
        num_sms=num_sms,
        precision="tf32" if tf32 else "ieee",
        upcast=device.type == "cpu" and dtype == torch.bfloat16,
        fwd_4bit=fused_mm_config(arch, dtype, rank, four_bit=True),
        dx_4bit=fused_mm_config(arch, dtype, rank, dropout_out=dropout, four_bit=True),
    )


@torch.compiler.assume_constant_result
def in_loop_max_m(device: torch.device, dtype: torch.dtype) -> int:
    """The most tokens for which a 4-bit W is dequantized inside the fused kernels' K loop on
    ``device`` in ``dtype``: the roofline's break-even (``roofline.in_loop_max_tokens``) for the
    GPU of its config tables and the in-loop tiles' ``BLOCK_M``. A constant under torch.compile
    (plain Python arguments only, as ``plan_string``)."""
    arch = _device_facts(device)[0]
    block_m = fused_mm_config(arch, dtype, MIN_RANK, four_bit=True)["BLOCK_M"]
    return roofline.in_loop_max_tokens(ROOFLINE_GPU[arch], block_m, dtype.itemsize)


def in_loop(device: torch.device, dtype: torch.dtype, m: int, tuned: str = "") -> bool:
    """Whether a call of ``m`` tokens over a 4-bit base dequantizes inside the K loop (else into
    one buffer per use of W): as ``LORA_KERNELS_4BIT`` says (``in_loop`` or ``buffer``, to
    measure one strategy against the other), else as the key's ``tuned`` decision says, else
    up to ``in_loop_max_m``."""
    forced = os.environ.get(ENV_4BIT, "")
    if forced not in FOUR_BIT_STRATEGIES:
        raise ValueError(
            f"{ENV_4BIT}={forced!r}: expected one of {', '.join(FOUR_BIT_STRATEGIES[1:])}"
            " (or unset: chosen by the number of tokens)"
        )
    if forced or tuned:
        return (forced or tuned) == "in_loop"
    return m <= in_loop_max_m(device, dtype)


def forward(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *, plan, store_t=True,
    col_scale=None, z_out=None,
):  # fmt: skip
    """``x (M, K) -> (y (M, N), T (M, r) | None)``: one fused launch; two with dropout (a T-only
    pass that generates each mask element once, then the output pass reading T). Adapters of
    another dtype compute in ``x``'s. ``weight``: ``(N, K)``, or a 4-bit ``quant.Packed``.
    DoRA: ``col_scale`` (``c``, ``(N,)`` ACC) makes ``y = c z + b`` with ``z = x W^T + s x A B``,
    stored into ``z_out`` when given (``fused_mm``). DoRA with dropout: the T-only pass also
    stores ``mask(x)`` (one transient ``(M, K)`` copy: each mask element generated once), and
    the output pass feeds ``x`` and ``mask(x)`` against each W tile, ``y = x W^T - x_d W^T + c z
    + b`` with ``z = x_d W^T + s x_d A B``."""
    common = {"precision": plan.precision, "upcast": plan.upcast, "num_sms": plan.num_sms}
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    dora_dropout = dropout_p > 0.0 and col_scale is not None
    xm = alloc(x.shape, x.dtype, x.device) if dora_dropout else None
    t_in = None
    if dropout_p > 0.0:
        _, t_in = fused_mm(
            x,
            weight.t(),
            None,
            lora_A,
            lora_B,
            scaling,
            config=plan.t_only,
            store_out=False,
            dropout_p=dropout_p,
            dropout_in=True,
            seed=seed,
            name=LAUNCHES["t_only"],
            xm_out=xm,
            **common,
        )
    config = _forward_config(plan, weight, col_scale is not None)
    y, t = fused_mm(
        x,
        weight.t(),
        bias,
        lora_A,
        lora_B,
        scaling,
        config=dora_dropout_config(config) if dora_dropout else config,
        store_t=store_t,
        t_in=t_in,
        name=LAUNCHES["fwd"],
        col_scale=col_scale,
        z_out=z_out,
        dropout_p=dropout_p if dora_dropout else 0.0,  # (x_d = mask(x) / (1 - p))
        xm_in=xm,
        **common,
    )
    if t_in is not None:
        return y, t_in if store_t else None
    return y, t


def _forward_config(plan: Plan, weight, dora: bool) -> dict:
    """The forward launch's config: the 4-bit one over a 4-bit W, DoRA's (``dora_fwd_config``)
    for DoRA, else the plan's."""
    if isinstance(weight, quant.Packed):
        return plan.fwd_4bit
    return dora_fwd_config(plan.fwd) if dora else plan.fwd


def backward(
    dy, x, weight, lora_A, lora_B, T, scaling, dropout_p, seed, needs, *, plan, col_scale=None,
    z=None,
):  # fmt: skip
    """Gradients ``(dx, dW, db, dA, dB)``, ``None`` where ``needs`` says no (see torch_path).
    ``dA`` and ``dB`` are float32 reductions rounded once, to the adapters' own dtype. DoRA's
    ``col_scale`` (``c``): the gradients of ``y = c z + b`` through ``z`` (``dz = dY c``,
    folded into the dx pass's ``dY`` tiles and into ``dB``'s sum); ``db`` is ``dY``'s. With
    DoRA's ``z`` (the magnitude trains): ``(dx, dW, db, dA, dB, sum_rows(dY z))``, that sum
    (float32, ``(N,)``) from the dB launch's own ``dY`` tiles (run even when ``dB`` is not
    needed; ``T`` is then there). DoRA with dropout: ``dx = dY W + mask (dY f W + dS A^T)`` with
    ``f = (c - 1) / (1 - p)``, one dx launch (``x_scale2``); dA and dB as LoRA's and DoRA's; no
    ``dW`` (an unfrozen base runs PyTorch ops: ``function.DoRALinearFunction``)."""
    need_x, need_w, need_b, need_a, need_lb = needs
    adapter_dtype = lora_A.dtype
    lora_A, lora_B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
    dx = dw = db = da = dlb = None
    common = {"precision": plan.precision, "upcast": plan.upcast, "num_sms": plan.num_sms}
    if need_x or need_a:
        # dx = dY W + s * drop(dY B^T A^T): the forward kernel on the transposed operands; its T
        # output is s * dS, which dA reduces against x.
        f = None
        if not need_x:
            dx_config = plan.t_only
        else:
            dx_config = plan.dx_4bit if isinstance(weight, quant.Packed) else plan.dx
            if col_scale is not None and dropout_p > 0.0:
                f = (col_scale - 1.0) / (1.0 - dropout_p)
                dx_config = dora_dropout_config(dx_config)
        dx, dT = fused_mm(
            dy,
            weight,
            None,
            lora_B.t(),
            lora_A.t(),
            scaling,
            config=dx_config,
            store_out=need_x,
            store_t=need_a,
            dropout_p=dropout_p,
            dropout_out=dropout_p > 0.0,
            seed=seed,
            name=LAUNCHES["dx"],
            x_scale=col_scale,
            x_scale2=f,
            **common,
        )
    reduce = functools.partial(lora_grad, out_dtype=adapter_dtype, **common)
    if need_a:  # x under the forward's mask
        da = reduce(
            dT,
            x,
            transpose_out=True,
            config=plan.grad_dA,
            dropout_p=dropout_p,
            seed=seed,
            name=LAUNCHES["grad_dA"],
        )
    dm = None
    if need_lb or z is not None:
        config = plan.grad_dB if z is None else dora_grad_config(plan.grad_dB)
        dlb = reduce(
            T, dy, transpose_out=False, config=config, name=LAUNCHES["grad_dB"],
            col_scale=col_scale, z=z,
        )  # fmt: skip
        if z is not None:
            dlb, dm = dlb
            dlb = dlb if need_lb else None
    # dW and db only exist for users who unfreeze the base layer: plain cuBLAS / reductions.
    if need_w:
        if col_scale is not None and dropout_p > 0.0:
            raise NotImplementedError("DoRA with dropout: dW runs on PyTorch ops")
        dw = (dy if col_scale is None else dy * col_scale.to(dy.dtype)).t() @ x
    if need_b:
        # (16-bit sums accumulate in float32; float32 and float64 in their own precision)
        db = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(dy.dtype)
    return (dx, dw, db, da, dlb) if z is None else (dx, dw, db, da, dlb, dm)


# --- a 4-bit base weight: one operand per use ---------------------------------------------------


def base_weight(weight: torch.Tensor, dtype: torch.dtype, strategy: str):
    """A bitsandbytes 4-bit ``weight`` as the launches read it for one use of W: ``"in_loop"``,
    its bytes and decoded scales (``quant.Packed``), dequantized tile by tile in the fused
    kernels' K loop; ``"buffer"``, dequantized by our kernel into one transient ``(N, K)``
    buffer of ``dtype`` (then the fused kernels run as over a 16-bit base). Which one a call
    takes: ``in_loop``. The layer's calls (``function``) and the tuner's measurements build the
    operand here and nowhere else."""
    w = quant.packed(weight)
    if strategy == "in_loop":
        return w
    return dequantize_op(w.data, w.scales, w.code, *w.shape, w.blocksize, dtype)


# --- torch.library custom ops ------------------------------------------------------------------
# The Triton launches as two opaque ops, so torch.compile(fullgraph=True) keeps LoRA layers in one
# graph instead of tracing into Triton's launcher. The plan travels as a JSON string (an op's
# arguments are tensors and scalars), so backward still runs the forward's configs.


def plan_to_str(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), sort_keys=True)


_plan_strings: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def plan_string(device: torch.device, dtype: torch.dtype, rank: int, dropout: bool) -> str:
    """``plan_for`` as the string the ops take, cached by everything the plan depends on (the
    forward's hot path); under torch.compile, a constant of the graph.

    Its arguments are plain Python values, never a tensor or a symbolic size: under
    ``torch.compile(dynamic=True)`` those can't be turned into constants and the compile fails.
    ``rank`` is the padded rank (``padded_rank``), the only way a plan depends on the rank."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    key = (device, _device_facts(device), _device_major(device), dtype, rank, dropout, tf32)
    if key not in _plan_strings:
        _plan_strings[key] = plan_to_str(plan_for(device, dtype, rank, dropout))
    return _plan_strings[key]


@functools.lru_cache(maxsize=64)
def plan_from_str(text: str) -> Plan:
    """The inverse of ``plan_to_str`` (cached: backward runs it on every call)."""
    return Plan(**json.loads(text))


@torch.library.custom_op("lora_kernels::triton_forward", mutates_args=())
def forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    plan: str,
    store_t: bool,
    w_scales: torch.Tensor | None = None,
    w_code: torch.Tensor | None = None,
    w_meta: List[int] | None = None,  # noqa: UP006
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` as an op: ``(y, T)``, ``T`` empty when not stored. A 4-bit W dequantized in
    the K loop comes as its parts (``_op_weight``): ``weight`` its bytes."""
    y, t = forward(
        x,
        _packed_weight(weight, w_scales, w_code, w_meta),
        bias,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        int(seed),
        plan=plan_from_str(plan),
        store_t=store_t,
    )
    return y, t if t is not None else x.new_empty(0, dtype=acc_dtype(x.dtype))


@forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, plan, store_t, w_scales=None,
      w_code=None, w_meta=None):  # fmt: skip
    m, n, r = x.shape[0], w_meta[0] if w_meta else weight.shape[0], lora_A.shape[1]
    return x.new_empty((m, n)), x.new_empty((m, r) if store_t else (0,), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("lora_kernels::triton_backward", mutates_args=())
def backward_op(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    T: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    plan: str,
    needs: List[bool],  # noqa: UP006  (torch 2.6 infers no schema from list[bool])
    w_scales: torch.Tensor | None = None,
    w_code: torch.Tensor | None = None,
    w_meta: List[int] | None = None,  # noqa: UP006
) -> List[torch.Tensor]:  # noqa: UP006
    """``backward`` as an op: ``[dx, dW, db, dA, dB]``, empty where ``needs`` says no."""
    grads = backward(
        dy,
        x,
        _packed_weight(weight, w_scales, w_code, w_meta),
        lora_A,
        lora_B,
        T,
        scaling,
        dropout_p,
        int(seed),
        tuple(needs),
        plan=plan_from_str(plan),
    )
    return _op_grads(grads, (dy, dy, dy, lora_A, lora_B))


def _op_grads(grads, likes) -> list[torch.Tensor]:
    """A backward op's results: each gradient, or an empty tensor like ``likes``' (the fake's
    dtypes: dA and dB the adapters') where it is ``None``."""
    return [like.new_empty(0) if g is None else g for g, like in zip(grads, likes)]


def _fake_grads(shapes, likes, needs) -> list[torch.Tensor]:
    """A backward op's fake results: ``shapes`` where ``needs`` says so, else empty."""
    return [like.new_empty(s if need else (0,)) for s, like, need in zip(shapes, likes, needs)]


@backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, T, scaling, dropout_p, seed, plan, needs, w_scales=None,
      w_code=None, w_meta=None):  # fmt: skip
    (m, n), k, r = dy.shape, w_meta[1] if w_meta else weight.shape[1], lora_A.shape[1]
    shapes = [(m, k), (n, k), (n,), (k, r), (r, n)]
    return _fake_grads(shapes, (dy, dy, dy, lora_A, lora_B), needs)


@torch.library.custom_op("lora_kernels::dora_forward", mutates_args=())
def dora_forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    col_scale: torch.Tensor,
    plan: str,
    store_t: bool,
    store_z: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA over a 16-bit W, one launch: ``(y, T, z)`` with ``y = c z + b``, ``z = x W^T + s x A
    B`` (``c``: ``col_scale``); with dropout ``y = x W^T - x_d W^T + c z + b``, ``z = x_d W^T +
    s x_d A B``. ``T`` and ``z`` empty when not stored."""
    z = alloc((x.shape[0], weight.shape[0]), x.dtype, x.device) if store_z else None
    y, t = forward(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, 0 if seed is None else int(seed),
        plan=plan_from_str(plan), store_t=store_t, col_scale=col_scale, z_out=z,
    )  # fmt: skip
    empty = x.new_empty(0)
    return y, t if t is not None else empty.to(acc_dtype(x.dtype)), z if z is not None else empty


@dora_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, col_scale, plan, store_t, store_z, dropout_p=0.0,
      seed=None):  # fmt: skip
    m, n, r = x.shape[0], weight.shape[0], lora_A.shape[1]
    t = x.new_empty((m, r) if store_t else (0,), dtype=acc_dtype(x.dtype))
    return x.new_empty((m, n)), t, x.new_empty((m, n) if store_z else (0,))


@torch.library.custom_op("lora_kernels::dora_backward", mutates_args=())
def dora_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    T: torch.Tensor | None,
    scaling: float,
    col_scale: torch.Tensor,
    plan: str,
    needs: List[bool],  # noqa: UP006
    z: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> List[torch.Tensor]:  # noqa: UP006
    """``dora_forward_op``'s gradients through ``z``: ``[dx, dW, db, dA, dB, sum_rows(dY z)]``,
    empty where ``needs`` says no, the last without ``z`` (the magnitude's gradient is that sum
    over ``n``: the caller's)."""
    grads = backward(
        dy, x, weight, lora_A, lora_B, T, scaling, dropout_p, 0 if seed is None else int(seed),
        tuple(needs), plan=plan_from_str(plan), col_scale=col_scale, z=z,
    )  # fmt: skip
    grads = (*grads, None) if z is None else grads
    return _op_grads(grads, (dy, dy, dy, lora_A, lora_B, col_scale))


@dora_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, T, scaling, col_scale, plan, needs, z=None, dropout_p=0.0,
      seed=None):  # fmt: skip
    (m, n), k, r = dy.shape, weight.shape[1], lora_A.shape[1]
    shapes = [(m, k), (n, k), (n,), (k, r), (r, n), (n,)]
    return _fake_grads(shapes, (dy, dy, dy, lora_A, lora_B, col_scale), [*needs, z is not None])


@torch.library.custom_op("lora_kernels::dequantize_4bit", mutates_args=())
def dequantize_op(
    data: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    n: int,
    k: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A 4-bit W's parts (``quant.Packed``) dequantized to ``(n, k)`` of ``dtype`` by our
    kernel (``kernels/dequant.py``): the buffer strategy's launch, opaque to torch.compile."""
    out = alloc((n, k), dtype, data.device)
    dequant.launch_dequant(data, scales, code, out, blocksize)
    return out


@dequantize_op.register_fake
def _(data, scales, code, n, k, blocksize, dtype):
    return data.new_empty((n, k), dtype=dtype)


def _op_weight(weight) -> tuple[torch.Tensor, dict]:
    """W as the ops take it: ``(weight, {})`` for a tensor; for a 4-bit ``quant.Packed`` read
    in the K loop, its bytes and the ops' keyword arguments for the rest (the scales, the code
    table, ``[N, K, blocksize]``)."""
    if not isinstance(weight, quant.Packed):
        return weight, {}
    parts = {"w_scales": weight.scales, "w_code": weight.code}
    return weight.data, {**parts, "w_meta": [*weight.shape, weight.blocksize]}


def _packed_weight(weight, w_scales, w_code, w_meta):
    """The inverse of ``_op_weight``: ``(N, K)`` as it came, or the 4-bit W its parts make."""
    if not w_meta:
        return weight
    n, k, blocksize = w_meta
    return quant.packed_w(weight, w_scales, w_code, blocksize, n, k)


def run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, plan: str, store_t):
    """``forward_op`` for W as ``base_weight`` gives it (a tensor, or a 4-bit ``quant.Packed``)
    and a seed that may be an int or a 0-d tensor: ``(y, T)``."""
    data, parts = _op_weight(weight)
    args = (x, data, bias, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed), plan, store_t)
    return forward_op(*args, **parts)


def run_backward(dy, x, weight, lora_A, lora_B, T, scaling, dropout_p, seed, plan: str, needs):
    """``backward_op`` as ``run_forward`` calls ``forward_op``: ``[dx, dW, db, dA, dB]``, empty
    where ``needs`` says no."""
    data, parts = _op_weight(weight)
    args = (dy, x, data, lora_A, lora_B, T, scaling, dropout_p, seed_tensor(seed), plan)
    return backward_op(*args, list(needs), **parts)
