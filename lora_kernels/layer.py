"""``LoRALayer``: a drop-in replacement for ``nn.Linear`` with a trainable low-rank update."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import dora, engines, quant
from .function import dora_linear, lora_linear
from .validation import check_adapter_dtype, check_alpha, check_dropout, check_rank

INITS = ("lora", "gaussian", "seed")
# nn.Linear's parameters, read through to the frozen linear (properties without setters).
_READ_ONLY = ("weight", "bias")


def lora_scaling(rank: int, alpha: float | None, use_rslora: bool) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA); ``1.0`` when ``alpha`` is ``None``."""
    check_alpha(alpha)
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def lora_forward(
    base: nn.Module,
    x: torch.Tensor,
    lora_A,
    lora_B,
    scaling: float,
    dropout_p: float,
    owner: nn.Module | None = None,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base(x) + scaling * (dropout(x) A) B`` through :func:`lora_linear`, reading ``base``'s
    weight and bias without calling it: ``base`` is an ``nn.Linear``, or a bitsandbytes 4-bit
    ``Linear4bit``, which computes in bitsandbytes' compute dtype and gives ``x``'s back, as
    ``Linear4bit`` does. ``lora_A`` ``(K, r)`` and ``lora_B`` ``(r, N)`` may be views (peft's
    transposed weights: their gradients land in the parameters). ``LoRALayer`` and peft's
    patched layers (``patch_peft``) both run this.

    ``owner``: the module whose forward this is. Under DeepSpeed ZeRO-3 the base weight and bias
    are registered as its external parameters (gathered and prefetched with it). A base that is
    an FSDP unit of its own (FSDP1 or FSDP2) is called (it unshards its weight only in its own
    forward) and the LoRA term added in plain PyTorch. A base weight still partitioned here
    raises an error that names the engine."""
    if engines.fsdp_unit(base):
        if magnitude is not None:
            raise ValueError(
                "DoRA over a base linear that is an FSDP unit of its own is not supported (its "
                "weight is whole only inside its own forward; DoRA's norm reads it): wrap the "
                "LoRA layer, or a module above it, as the unit instead"
            )
        return _lora_over_unit(base, x, lora_A, lora_B, scaling, dropout_p)
    weight, bias = base.weight, base.bias
    if owner is not None:
        engines.gather_with(owner, (weight, bias))
    if not quant.is_4bit(weight):
        engines.check_whole(weight, type(owner or base).__name__)
        if magnitude is not None:  # DoRA: the base rows' norms kept while W is unchanged
            return dora_linear(
                x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p,
                base_sq=dora.cached_base_sq(weight),
            )  # fmt: skip
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p)
    dtype = quant.compute_dtype(base, x)
    bias = None if bias is None else bias.to(dtype)
    if magnitude is not None:  # QDoRA: the base rows' norms kept per weight and compute dtype
        y = dora_linear(
            x.to(dtype), weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p,
            base_sq=dora.cached_base_sq(weight, dtype),
        )  # fmt: skip
    else:
        y = lora_linear(x.to(dtype), weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p)
    return y.to(x.dtype)


def _lora_over_unit(base, x, lora_A, lora_B, scaling, dropout_p) -> torch.Tensor:
    """``base(x) + scaling * (dropout(x) A) B`` for a base that is an FSDP unit: the unit's
    call unshards its weight (and again for backward), the LoRA term is plain PyTorch (the mask
    from PyTorch's generator, as ``nn.Dropout`` draws it)."""
    x_drop = nn.functional.dropout(x, dropout_p) if dropout_p > 0.0 else x
    lora = (x_drop @ lora_A.to(x.dtype)) @ lora_B.to(x.dtype)
    return base(x) + lora * scaling


def _unmerged_in_state(layer: LoRALayer, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: a merged layer's base weight entry is the unmerged weight."""
    key = prefix + "linear.weight"
    if layer.merged and key in state_dict:
        state_dict[key] = layer.merged_weight(sign=-1)


def _merge_loaded(layer: LoRALayer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: a merged layer folds the update into the (unmerged)
    weight it loaded, so it stays merged."""
    if layer.merged:
        with torch.no_grad():
            layer._fold()


class LoRALayer(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA, Hu et al. 2021).

    .. math::

        y = x W^T + b + s \cdot (\mathrm{dropout}(x) A) B

    ``W`` and ``b`` (``self.linear``) are frozen; only ``lora_A`` and ``lora_B`` train. On CUDA
    the forward and backward run as fused Triton kernels, elsewhere as plain PyTorch; both compute
    the same numbers as :func:`lora_kernels.reference.lora_linear_reference`.

    Args:
        in_features: ``K``, size of each input sample.
        out_features: ``N``, size of each output sample.
        rank: ``r``, the inner dimension of the update (a positive int).
        alpha: LoRA alpha; ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with
            ``use_rslora``). ``None`` (the default) gives ``scaling = 1.0``.
        dropout: dropout probability on the LoRA branch's input, in ``[0, 1)``, applied in
            training mode only (peft's ``lora_dropout``).
        bias: whether the frozen linear has a bias.
        init: ``"lora"`` (``lora_A`` Kaiming-uniform over the input dimension, ``lora_B`` zeros:
            a fresh layer equals its linear, as in peft), ``"gaussian"`` (``lora_A`` normal with
            std ``1 / rank``, ``lora_B`` zeros) or ``"seed"`` (both ``torch.randn``).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
        device, dtype: factory kwargs for every parameter.
        use_dora: DoRA (Liu et al. 2024, peft's ``use_dora``): a trainable ``magnitude``
            ``(out_features,)``, initialised to the row norms of ``W + s (A B)^T`` (with
            ``init="lora"``, the base's: the layer starts equal to its linear); the output is
            :func:`lora_kernels.function.dora_linear`'s. Over a 4-bit base too (QDoRA): the
            norm is then that of the dequantized weight in bitsandbytes' compute dtype.
        adapter_dtype: dtype of ``lora_A`` / ``lora_B`` when it should differ from ``dtype``:
            ``torch.float32`` keeps float32 adapters (the optimizer's master weights) on a
            bfloat16 or float16 layer, peft's default. The LoRA branch then computes in the
            input's dtype and the adapters' gradients arrive in float32.

    Attributes:
        linear: the frozen ``nn.Linear(in_features, out_features)``; ``weight`` and ``bias``
            are its parameters (read-only properties, as on peft's LoRA layers).
        lora_A: ``(in_features, rank)`` parameter.
        lora_B: ``(rank, out_features)`` parameter.
        scaling: the float ``s``.
        merged: whether the update is currently folded into ``linear.weight``.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``, dtype kept (under
        ``torch.autocast``: autocast's dtype, as ``nn.Linear`` gives).

    Example::

        >>> layer = LoRALayer(64, 10, rank=4)
        >>> layer(torch.randn(32, 64)).shape
        torch.Size([32, 10])
        >>> sum(p.numel() for p in layer.parameters() if p.requires_grad)
        296
    """

    # (defaults for layers pickled before these attributes existed)
    use_dora = False
    _dora_norm = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        init: str = "lora",
        use_rslora: bool = False,
        device=None,
        dtype=None,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        rank = check_rank(rank)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        factory_kwargs = {"device": device, "dtype": dtype}
        self._setup(
            nn.Linear(in_features, out_features, bias=bias, **factory_kwargs),
            rank,
            alpha,
            dropout,
            init,
            use_rslora,
            adapter_dtype,
            use_dora,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int = 4,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "lora",
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> LoRALayer:
        """Wrap an existing ``nn.Linear`` (no copy: the layer's ``linear`` *is* ``linear``).

        The linear's parameters are frozen in place; ``lora_A`` / ``lora_B`` are created on its
        device, with its dtype unless ``adapter_dtype`` says otherwise.

        A bitsandbytes ``Linear4bit`` (QLoRA) is wrapped as it is, its packed weight neither
        copied nor dequantized: each call dequantizes it (fp32 math, rounded once to the
        compute dtype) for that call only. The base then computes in bitsandbytes' compute
        dtype, as ``Linear4bit`` does, and the adapters default to float32, as in peft.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        rank = check_rank(rank)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear, rank, alpha, dropout, init, use_rslora, adapter_dtype, use_dora)
        return layer

    def _setup(
        self, linear, rank, alpha, dropout, init, use_rslora, adapter_dtype, use_dora=False
    ) -> None:
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        self.dropout = check_dropout(dropout)
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.rank, self.alpha, self.use_rslora, self.init = rank, alpha, bool(use_rslora), init
        four_bit = quant.check_base(linear)
        self.linear = linear
        self.linear.requires_grad_(False)
        factory_kwargs = {
            "device": linear.weight.device,
            "dtype": adapter_dtype or (torch.float32 if four_bit else linear.weight.dtype),
        }
        self.lora_A = nn.Parameter(torch.empty(linear.in_features, rank, **factory_kwargs))
        self.lora_B = nn.Parameter(torch.empty(rank, linear.out_features, **factory_kwargs))
        self.merged = False
        # The state dict holds the unmerged base weight whatever `merged` is, and a merged layer
        # merges again what it loads: a state moves between merged and unmerged layers without
        # counting the update twice or losing it.
        self.register_state_dict_post_hook(_unmerged_in_state)
        self.register_load_state_dict_post_hook(_merge_loaded)
        self.use_dora = use_dora
        self.magnitude = None
        self.reset_parameters()
        if use_dora:
            # peft's init: the merged weight's row norms (with B = 0, the base's: the layer
            # starts equal to its linear), from the whole weight where an engine has sharded it
            # (ZeRO-3 under zero.Init, FSDP: a collective, as peft's own init gathers)
            with engines.gathered(linear, {id(linear.weight)}):
                weight = engines.whole(linear.weight)
                engines.check_whole(weight, "LoRALayer(use_dora=True)")
                norm = dora.weight_norm(
                    weight, self.lora_A, self.lora_B, self.scaling, dtype=self._base_dtype()
                )
            self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))
        self._dora_norm = None  # the norm a merge used (to unmerge with)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    # nn.Linear's attributes, for code that reads them off the module it replaced (transformers'
    # T5 reads `self.wo.weight.dtype`; peft's LoRA layers forward them the same way).
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, ``linear.weight`` (the merged one while ``merged``)."""
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias, ``linear.bias``."""
        return self.linear.bias

    def reset_parameters(self) -> None:
        """Initialise ``lora_A`` / ``lora_B`` by ``self.init``; the frozen linear is untouched."""
        with torch.no_grad():
            if self.init == "lora":
                # NOTE: lora_A is stored (in, r); its transpose has peft's (r, in) layout, so
                # Kaiming's fan_in is in_features, as in peft.
                nn.init.kaiming_uniform_(self.lora_A.T, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
                nn.init.zeros_(self.lora_B)
            else:
                self.lora_A.normal_()
                self.lora_B.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        dropout_p = self.dropout if self.training else 0.0
        return lora_forward(
            self.linear,
            x,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p,
            owner=self,
            magnitude=getattr(self, "magnitude", None),  # (a layer pickled before DoRA has none)
        )

    def _base_dtype(self) -> torch.dtype:
        """The dtype of the base weight's values as the layer computes with them: its own; for
        a 4-bit base, bitsandbytes' compute dtype (its ``quant_state.dtype`` until the first
        call sets one)."""
        weight = self.linear.weight
        if not quant.is_4bit(weight):
            return weight.dtype
        return getattr(self.linear, "compute_dtype", None) or weight.quant_state.dtype

    def _dense_base(self) -> torch.Tensor:
        """The base weight's values: ``linear.weight``, a 4-bit one dequantized (a copy)."""
        weight = self.linear.weight
        if quant.is_4bit(weight):
            return quant.dequantize(weight, self._base_dtype())
        return weight

    def _lora_delta(self) -> torch.Tensor:
        """``s * (A B)^T`` in float32 (float64 for float64 layers)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        with torch.no_grad():
            return (self.lora_A.to(dtype) @ self.lora_B.to(dtype)).T.mul_(self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` update ``merge`` adds to the weight, computed in float32 (float64
        for float64 layers) whatever the parameters' dtype: ``s * (A B)^T``; with DoRA,
        ``c * (W + s (A B)^T) - W`` (``c = magnitude / n`` per output row)."""
        if not self.use_dora:
            return self._lora_delta()
        with torch.no_grad():
            weight = self._dense_base()
            merged = self._dora_merged(weight)
            return merged - weight.to(merged.dtype)

    def _dora_merged(self, weight: torch.Tensor, norm: torch.Tensor | None = None):
        """``c * (W + s (A B)^T)`` for the unmerged ``weight``, in the accumulation dtype."""
        delta = self._lora_delta()
        if norm is None:
            norm = dora.weight_norm(weight, self.lora_A, self.lora_B, self.scaling)
        c = self.magnitude.detach().to(delta.dtype) / norm.to(delta.dtype)
        return (weight.to(delta.dtype) + delta) * c[:, None]

    def merged_weight(self, sign: int = 1) -> torch.Tensor:
        """``linear.weight + sign * delta_weight()`` in the weight's dtype, computed in at least
        float32, without changing anything (with DoRA: ``c * (W + s (A B)^T)``, and for
        ``sign=-1`` the weight a merge started from: ``W' / c - s (A B)^T`` with the norm that
        merge used). Raises ``RuntimeError`` if the result is not finite in the weight's
        dtype."""
        return self._merged_weight(sign)

    def _merged_weight(self, sign: int, norm: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`merged_weight`; for a DoRA merge, ``norm`` (when already computed) is ``n``."""
        weight = self._mergeable_weight()
        with torch.no_grad():
            if not self.use_dora:
                delta = self._lora_delta()
                result = torch.add(weight.to(delta.dtype), delta, alpha=sign)
            elif sign > 0:
                result = self._dora_merged(weight, norm)
            else:
                if self._dora_norm is None:
                    raise RuntimeError("unmerge: this DoRA layer was not merged by merge()")
                delta = self._lora_delta()
                c = self.magnitude.detach().to(delta.dtype) / self._dora_norm.to(delta.dtype)
                result = weight.to(delta.dtype) / c[:, None] - delta
            result = result.to(weight.dtype)
        if not torch.isfinite(result).all():
            raise RuntimeError(
                f"{'merge' if sign > 0 else 'unmerge'} would make linear.weight non-finite in "
                f"{weight.dtype} (scaling={self.scaling}); the weight is left as it was"
            )
        return result

    def _mergeable_weight(self) -> torch.Tensor:
        """``linear.weight``; ``RuntimeError`` for a 4-bit one (merging is refused there)."""
        weight = self.linear.weight
        if quant.is_4bit(weight):
            raise RuntimeError(
                "merge / unmerge on a 4-bit base (bitsandbytes Linear4bit) is not supported: "
                "re-quantizing W + s (A B)^T to 4 bits would round most of the update away. "
                "Save the adapter (save_peft_adapter) and merge it onto the 16-bit base model"
            )
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``linear.weight`` (computed in at least float32).

        Forward is then a plain linear. Raises ``RuntimeError``, leaving the weight untouched, if
        the merged weight would not be finite in the weight's dtype, or if already merged.
        """
        if self.merged:
            raise RuntimeError("LoRALayer is already merged; call unmerge() first")
        self._fold()

    def _fold(self) -> None:
        """Write the merged weight; a DoRA layer keeps the norm it used, to unmerge with."""
        norm = None
        if self.use_dora:
            weight = self._mergeable_weight()
            norm = dora.weight_norm(weight, self.lora_A, self.lora_B, self.scaling)
        self.linear.weight.copy_(self._merged_weight(1, norm))
        self._dora_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by :meth:`merge` (at least float32 arithmetic)."""
        if not self.merged:
            raise RuntimeError("LoRALayer is not merged; nothing to unmerge")
        self.linear.weight.copy_(self.merged_weight(sign=-1))
        self.merged = False
        self._dora_norm = None

    def __setattr__(self, name: str, value) -> None:
        # NOTE: without this, nn.Module.__setattr__ answers `layer.weight = Parameter(...)` with a
        # bare KeyError ("attribute 'weight' already exists") from register_parameter.
        if name in _READ_ONLY:
            raise AttributeError(
                f"LoRALayer.{name} is read-only: it is the frozen base layer's linear.{name}; "
                f"assign layer.linear.{name} to change the base layer"
            )
        if name == "linear" and any(c.__name__ == "BaseTunerLayer" for c in type(value).__mro__):
            # peft's get_peft_model (a peft_config given to a Trainer, "all-linear") wrapping the
            # frozen linear inside: this layer's forward reads its weight and never calls it,
            # so peft's adapter would never train.
            raise ValueError(
                "peft is wrapping the frozen linear inside a lora_kernels LoRALayer, whose "
                "forward never calls it: its adapter would never train. Keep peft's own LoRA "
                "layers (no inject_lora / from_peft) and call lora_kernels.patch_peft(model), "
                "or lora_kernels.patch_peft() before the code that builds the peft model"
            )
        super().__setattr__(name, value)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given, submodules included.
        raise RuntimeError(
            "LoRALayer does not support TorchScript (torch.jit.script): its forward dispatches "
            "to custom autograd functions and Triton kernels. Use torch.compile or "
            "torch.export instead (torch.jit.trace works too)"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
            + (
                f", adapter_dtype={self.lora_A.dtype}"
                if self.lora_A.dtype != self.linear.weight.dtype
                else ""
            )
        )
