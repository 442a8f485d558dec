"""peft in place (``patch_peft``): peft's own LoRA layers compute through lora_kernels, and
nothing else of peft changes. Real models (a small Llama, all-MiniLM-L6-v2), the real Trainer
and TRL's SFTTrainer, on CPU (our torch path)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from helpers import BACKEND_TOL, assert_close
from real_models import (
    GRAD_TOL,
    TOL,
    base_model,
    batch,
    classifier_model,
    hidden,
    logits,
    peft,
    randomize_trainable,
    small_llama,
    transformers,
)
from torch import nn

from lora_kernels import inject_lora, patch_peft, unpatch_peft
from lora_kernels.adapters import patch
from lora_kernels.reference import relative_errors

LLAMA_VOCAB = 300


@pytest.fixture(autouse=True)
def no_global_patch():
    """Every test starts and ends with peft's own classes (the global form off)."""
    unpatch_peft()
    yield
    unpatch_peft()


def peft_model(model=None, **config):
    """``get_peft_model(model, all-linear)`` with non-zero ``lora_B`` (a fresh adapter is the
    identity), dropout 0."""
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **config}
    model = peft.get_peft_model(
        model if model is not None else small_llama(), peft.LoraConfig(**cfg)
    )
    randomize_trainable(model)
    return model


def llama_loss(model):
    ids = batch(LLAMA_VOCAB)["input_ids"]
    return model(input_ids=ids, labels=ids).loss


def minilm_loss(model):
    return hidden(model).square().mean()


def graph_functions(tensor) -> set[str]:
    """The names of every autograd node ``tensor`` was computed through."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [child for child, _ in node.next_functions]
    return names


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """The gradients of the trainable parameters that got one (MiniLM's pooler gets none from
    a loss on the hidden states)."""
    return {
        n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("which", ["llama", "minilm"])
def test_patched_equals_peft_outputs_and_every_adapter_gradient(which):
    theirs = peft_model(small_llama() if which == "llama" else base_model())
    ours = copy.deepcopy(theirs)
    report = patch_peft(ours)
    assert len(report.fused) == sum(isinstance(m, patch.PatchedLoRA) for m in ours.modules())
    assert len(report.fused) == (14 if which == "llama" else 37) and not report.fallback
    loss = llama_loss if which == "llama" else minilm_loss
    out = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        model.train()
        torch.manual_seed(5)  # the same masks in BERT's own dropout
        value = loss(model)
        value.backward()
        out[name] = value, adapter_grads(model)
    assert "LoRALinearFunctionBackward" in graph_functions(out["ours"][0])
    assert "LoRALinearFunctionBackward" not in graph_functions(out["peft"][0])
    assert_close("loss", out["ours"][0], out["peft"][0].double(), TOL)
    grads, expected = out["ours"][1], out["peft"][1]
    unused = 0 if which == "llama" else 1  # MiniLM's pooler
    assert grads.keys() == expected.keys() and len(grads) == 2 * (len(report.fused) - unused)
    for name in expected:
        assert_close(name, grads[name], expected[name].double(), GRAD_TOL)
    for model in (theirs, ours):
        model.eval()
    if which == "llama":
        assert_close("logits", logits(ours, LLAMA_VOCAB), logits(theirs, LLAMA_VOCAB).double(), TOL)
    else:
        assert_close("hidden", hidden(ours), hidden(theirs).double(), TOL)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_dora_equals_peft_s_dora(dropout):
    """peft's DoRA layers (``use_dora=True``) run ``dora_linear``: at dropout 0 the loss and every
    adapter gradient (magnitudes too) equal peft's, computed through our Function; with dropout
    (our mask, peft's another) no call falls back and ``eval()`` equals peft's."""
    theirs = peft_model(small_llama(), use_dora=True, lora_dropout=dropout)
    randomize_trainable(theirs, ("lora_B", "lora_magnitude_vector"))
    ours = copy.deepcopy(theirs)
    report = patch_peft(ours)
    assert len(report.fused) == 14 and not report.fallback
    calls_before = sum(patch._CALLS.values())
    out = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        model.train()
        value = llama_loss(model)
        value.backward()
        out[name] = value, adapter_grads(model)
    assert sum(patch._CALLS.values()) == calls_before  # no call fell back
    grads, expected = out["ours"][1], out["peft"][1]
    assert grads.keys() == expected.keys() and len(grads) == 3 * 14
    assert "DoRALinearFunctionBackward" in graph_functions(out["ours"][0])
    if dropout == 0.0:  # (with dropout, a fresh mask of ours: other numbers than peft's)
        assert_close("loss", out["ours"][0], out["peft"][0].double(), TOL)
        for name in expected:
            assert_close(name, grads[name], expected[name].double(), GRAD_TOL)
    for model in (theirs, ours):
        model.eval()
    assert_close("logits", logits(ours, LLAMA_VOCAB), logits(theirs, LLAMA_VOCAB).double(), TOL)


def test_from_peft_converts_dora_layers_with_peft_s_numbers(tmp_path):
    """``from_peft`` on peft's DoRA model: DoRA ``LoRALayer``s with peft's magnitudes; at
    dropout 0 the loss and every trainable gradient (magnitudes included, by the matching
    names) equal peft's, through ``DoRALinearFunction``; the converted model saves an adapter
    peft loads back to the same logits."""
    from lora_kernels import LoRALayer, from_peft

    theirs = peft_model(small_llama(), use_dora=True)
    randomize_trainable(theirs, ("lora_B", "lora_magnitude_vector"))
    ours = from_peft(copy.deepcopy(theirs))
    layers = [m for m in ours.modules() if isinstance(m, LoRALayer)]
    assert len(layers) == 14 and all(m.use_dora and m.magnitude.requires_grad for m in layers)
    losses = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        model.train()
        losses[name] = llama_loss(model)
        losses[name].backward()
    assert "DoRALinearFunctionBackward" in graph_functions(losses["ours"])
    assert_close("loss", losses["ours"], losses["peft"].double(), TOL)
    expected = adapter_grads(theirs)
    names = {
        "lora_A.default.weight": "lora_A",
        "lora_B.default.weight": "lora_B",
        "lora_magnitude_vector.default.weight": "magnitude",
    }
    grads = {}
    for name, grad in adapter_grads(ours).items():
        grads[name] = grad.t() if name.endswith(("lora_A", "lora_B")) else grad
    assert len(grads) == len(expected) == 3 * 14
    for name, grad in expected.items():
        module, suffix = name.removeprefix("base_model.model.").rsplit(".lora_", 1)
        ours_name = f"{module}.{names['lora_' + suffix]}"
        assert_close(name, grads[ours_name], grad.double(), GRAD_TOL)
    for model in (theirs, ours):
        model.eval()
    expected_logits = logits(theirs, LLAMA_VOCAB)
    assert_close("logits", logits(ours, LLAMA_VOCAB), expected_logits.double(), TOL)
    theirs.save_pretrained(tmp_path / "unused")  # (peft's own save still works beside)
    from lora_kernels import save_peft_adapter

    save_peft_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(small_llama(), tmp_path / "adapter").eval()
    assert_close("reloaded", logits(loaded, LLAMA_VOCAB), expected_logits.double(), TOL)


def test_the_tree_keys_and_parameters_stay_peft_s():
    theirs = peft_model()
    ours = copy.deepcopy(theirs)
    params = {n: p for n, p in ours.named_parameters()}
    patch_peft(ours)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert {n: p for n, p in ours.named_parameters()} == params  # the same objects
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.layer.Linear) and repr(layer).startswith(
        "lora.Linear"
    )


def test_save_load_disable_merge_and_unload_are_peft_s(tmp_path):
    ours = peft_model()
    reference = copy.deepcopy(ours).eval()
    patch_peft(ours).calls.clear()
    ours.eval()
    expected = logits(ours, LLAMA_VOCAB)
    ours.save_pretrained(tmp_path / "adapter")
    reference.save_pretrained(tmp_path / "reference")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "reference").iterdir())
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in saved)
    loaded = peft.PeftModel.from_pretrained(small_llama(), tmp_path / "adapter").eval()
    assert_close("reloaded", logits(loaded, LLAMA_VOCAB), expected.double(), TOL)

    with ours.disable_adapter():
        assert torch.equal(logits(ours, LLAMA_VOCAB), logits(small_llama(), LLAMA_VOCAB))
    ours.merge_adapter()
    assert_close("merged", logits(ours, LLAMA_VOCAB), expected.double(), TOL)
    ours.unmerge_adapter()
    assert_close("unmerged", logits(ours, LLAMA_VOCAB), expected.double(), TOL)
    merged = copy.deepcopy(ours).merge_and_unload()
    assert not any(isinstance(m, patch.PatchedLoRA) for m in merged.modules())
    assert_close("merge_and_unload", logits(merged, LLAMA_VOCAB), expected.double(), TOL)
    plain = copy.deepcopy(ours).unload()  # (peft's merge and unmerge rounded the weights)
    assert_close(
        "unload", logits(plain, LLAMA_VOCAB), logits(small_llama(), LLAMA_VOCAB).double(), TOL
    )
    assert set(patch_peft(ours).calls) == {
        "adapters disabled (peft runs the base layer alone)",
        "merged adapter (peft runs the merged base layer)",
    }


def test_adapters_added_loaded_switched_and_deleted(tmp_path):
    ours = peft_model()
    ours.save_pretrained(tmp_path / "first")
    patch_peft(ours)
    ours.load_adapter(tmp_path / "first", adapter_name="other")
    ours.set_adapter("other")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert patch.fallback_reason(layer) is None  # one active adapter: fused
    reference = copy.deepcopy(ours)
    unpatch_peft(reference)
    assert_close("other", logits(ours, LLAMA_VOCAB), logits(reference, LLAMA_VOCAB).double(), TOL)
    ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    ours.set_adapter("mix")
    reference.add_weighted_adapter(
        ["default", "other"], [0.5, 0.5], "mix", combination_type="linear"
    )
    reference.set_adapter("mix")
    assert_close("mix", logits(ours, LLAMA_VOCAB), logits(reference, LLAMA_VOCAB).double(), TOL)
    ours.delete_adapter("other")
    assert "other" not in layer.lora_A


def test_patching_twice_unpatching_copying_pickling():
    theirs = peft_model().eval()
    ours = copy.deepcopy(theirs)
    first, second = patch_peft(ours), patch_peft(ours)
    assert first.fused == second.fused
    expected = logits(ours, LLAMA_VOCAB)
    for again in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert sum(isinstance(m, patch.PatchedLoRA) for m in again.modules()) == len(first.fused)
        assert torch.equal(logits(again, LLAMA_VOCAB), expected)
        y = again(input_ids=batch(LLAMA_VOCAB)["input_ids"]).logits
        assert "LoRALinearFunctionBackward" in graph_functions(y.sum())
    assert unpatch_peft(ours) == len(first.fused)
    assert not any(isinstance(m, patch.PatchedLoRA) for m in ours.modules())
    y = ours(input_ids=batch(LLAMA_VOCAB)["input_ids"]).logits
    assert "LoRALinearFunctionBackward" not in graph_functions(y.sum())
    assert (
        type(ours.base_model.model.model.layers[0].self_attn.q_proj)
        is peft.tuners.lora.layer.Linear
    )


def test_a_model_without_peft_layers_is_refused():
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        patch_peft(small_llama())
    injected = inject_lora(small_llama(), "all-linear")
    with pytest.raises(ValueError, match="run lora_kernels already"):
        patch_peft(injected)


def test_dropout_checkpointing_and_compile():
    """Dropout: our mask from our seed (torch.manual_seed reproduces it; gradient checkpointing
    recomputes the same one); eval equals peft; torch.compile equals eager."""
    theirs = peft_model(lora_dropout=0.1)
    ours = copy.deepcopy(theirs)
    patch_peft(ours)
    ours.train()
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            ours.gradient_checkpointing_enable()
            ours.enable_input_require_grads()
        torch.manual_seed(7)
        llama_loss(ours).backward()
        runs.append({n: g.clone() for n, g in adapter_grads(ours).items()})
        ours.zero_grad(set_to_none=True)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    ours.gradient_checkpointing_disable()
    for model in (theirs, ours):
        model.eval()
    assert_close("eval", logits(ours, LLAMA_VOCAB), logits(theirs, LLAMA_VOCAB).double(), TOL)


@pytest.mark.inductor
@pytest.mark.skipif(
    not hasattr(torch.compiler, "is_exporting"),
    reason="transformers' Llama calls torch.compiler.is_exporting under torch.compile, which "
    "this torch (before 2.7) lacks: a gap between transformers and this torch, not ours",
)
def test_compile_a_patched_model():
    ours = peft_model()
    patch_peft(ours)
    ours.train()
    eager = llama_loss(ours)
    eager.backward()
    expected = {n: g.clone() for n, g in adapter_grads(ours).items()}
    ours.zero_grad(set_to_none=True)
    compiled = torch.compile(ours)
    loss = llama_loss(compiled)
    loss.backward()
    assert_close("loss", loss, eager.double(), 1e-6)
    for name, grad in adapter_grads(ours).items():
        assert_close(name, grad, expected[name].double(), 1e-5)


def test_float32_adapters_on_a_bfloat16_base():
    """peft's default for a 16-bit model: float32 adapters on a bfloat16 base. One layer: ours
    and peft's within our bfloat16 tolerance of the float64 reference (peft computes its LoRA
    branch in float32, we in bfloat16 with float32 accumulation); the whole model (two Llama
    layers, every rounding compounding): ours no further from the reference than 1.5x peft's
    distance. The adapters' gradients arrive in float32."""
    theirs = peft_model(small_llama().to(torch.bfloat16))
    ours = copy.deepcopy(theirs)
    patch_peft(ours)
    reference = copy.deepcopy(theirs).double()
    for model in (ours, theirs, reference):
        model.eval()
    layers = [
        m.base_model.model.model.layers[0].self_attn.q_proj for m in (ours, theirs, reference)
    ]
    assert layers[0].lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = layers[2](x.double())
    for name, layer in zip(("ours", "peft"), layers[:2]):
        y = layer(x)
        assert y.dtype == torch.bfloat16
        assert_close(f"{name} layer", y, want, BACKEND_TOL["torch"][torch.bfloat16])
    ids = batch(LLAMA_VOCAB)["input_ids"]
    want = reference(input_ids=ids).logits
    ours_error = relative_errors(ours(input_ids=ids).logits, want).max()
    peft_error = relative_errors(theirs(input_ids=ids).logits, want).max()
    assert ours_error <= 1.5 * peft_error, (ours_error, peft_error)
    ours.train()
    llama_loss(ours).backward()
    assert all(g.dtype == torch.float32 for g in adapter_grads(ours).values())


# --- every reason a call runs peft's own forward --------------------------------------------------


class ScaledLinear(nn.Linear):
    """An nn.Linear with a forward of its own: not ours to fuse."""

    def forward(self, x):
        return super().forward(x) * 0.5


class CustomDropout(nn.Dropout):
    pass


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))


def two_adapters():
    model = peft.get_peft_model(small_mlp(), peft.LoraConfig(r=4, target_modules=["0", "2"]))
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["0"]))
    randomize_trainable(model)
    return model


def call(model, **kwargs):
    return model(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)), **kwargs)


def layer_of(model, index="0"):
    return model.base_model.model.get_submodule(index)


def lora_bias():
    model = peft.get_peft_model(
        small_mlp(), peft.LoraConfig(r=4, target_modules=["0"], lora_bias=True)
    )
    randomize_trainable(model, ("lora_B",))
    return model


def fan_in_fan_out():
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    return peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )


def scaled_base():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(16, 8))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"]))


def dora():
    return peft.get_peft_model(
        small_mlp(), peft.LoraConfig(r=4, target_modules=["0"], use_dora=True)
    )


def custom_dropout():
    model = peft.get_peft_model(
        small_mlp(), peft.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1)
    )
    layer_of(model).lora_dropout["default"] = CustomDropout(0.0)
    return model


def hooked():
    model = peft.get_peft_model(small_mlp(), peft.LoraConfig(r=4, target_modules=["0"]))
    layer_of(model).base_layer.register_forward_hook(lambda module, args, out: out + 1.0)
    return model


def custom_adapter_module():
    model = peft.get_peft_model(small_mlp(), peft.LoraConfig(r=4, target_modules=["0"]))
    layer = layer_of(model)
    scaled = ScaledLinear(16, 4, bias=False)
    scaled.weight.data.copy_(layer.lora_A["default"].weight)
    layer.lora_A["default"] = scaled
    return model


def set_two_active(model):
    model.base_model.set_adapter(["default", "other"])


def only_other_active(model):
    model.set_adapter("other")


def merged(model):
    model.merge_adapter()


# (reason, model builder, what to do to it first, keyword arguments of the call)
FALLBACKS = [
    ("several active adapters", two_adapters, set_two_active, {}),
    ("no active adapter on this layer", two_adapters, only_other_active, {}),
    (
        "adapter_names",
        two_adapters,
        None,
        {"adapter_names": ["default", "other", "other", "default"]},
    ),
    ("merged adapter", two_adapters, merged, {}),
    ("lora_bias=True", lora_bias, None, {}),
    ("fan_in_fan_out=True", fan_in_fan_out, None, {}),
    ("base layer ScaledLinear", scaled_base, None, {}),
    ("lora_dropout CustomDropout", custom_dropout, None, {}),
    ("hooks on the base layer", hooked, None, {}),
    ("adapter modules ScaledLinear", custom_adapter_module, None, {}),
]


@pytest.mark.parametrize("reason, build, prepare, kwargs", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_each_fallback_runs_peft_s_own_forward(reason, build, prepare, kwargs):
    theirs = build().eval()
    if prepare is not None:
        prepare(theirs)
    ours = copy.deepcopy(theirs)
    report = patch_peft(ours)
    before = sum(n for r, n in report.calls.items() if r.startswith(reason))
    if isinstance(theirs.base_model.model, transformers.GPT2Model):
        ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
        got, expected = (
            ours(input_ids=ids).last_hidden_state,
            theirs(input_ids=ids).last_hidden_state,
        )
    else:
        got, expected = call(ours, **kwargs), call(theirs, **kwargs)
    assert torch.equal(got, expected)
    after = sum(n for r, n in report.calls.items() if r.startswith(reason))
    assert after > before, dict(report.calls)
    if not kwargs:  # the layer's state alone says so: the report names it
        assert any(r.startswith(reason) for r in report.fallback), report.fallback


def test_an_adapter_named_per_call_extra_arguments_and_a_global_hook():
    theirs = peft.get_peft_model(small_mlp(), peft.LoraConfig(r=4, target_modules=["0"])).eval()
    randomize_trainable(theirs)
    layer = copy.deepcopy(layer_of(theirs))
    peft_layer = layer_of(theirs)
    patch_peft(nn.Sequential(layer))
    x = torch.randn(3, 16)
    reason = patch.fallback_reason(layer, x, (), {"alora_offsets": [0, 0, 0]})
    assert reason.startswith("extra arguments")
    assert torch.equal(layer(x, alora_offsets=[0, 0, 0]), peft_layer(x, alora_offsets=[0, 0, 0]))
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        assert patch.fallback_reason(layer, x).startswith("hooks")
    finally:
        handle.remove()
    assert patch.fallback_reason(layer, x) is None
    integers = torch.zeros(3, 16, dtype=torch.int64)
    assert patch.fallback_reason(layer, integers) == "input of type torch.int64"
    with pytest.raises(RuntimeError):  # peft's own error, not ours
        layer(integers)


def test_a_4bit_weight_bitsandbytes_repacked_runs_peft_s_forward():
    pytest.importorskip("bitsandbytes")
    from test_quant import linear4bit, peft_over

    model = peft_over(linear4bit(32, 16), rank=4)
    layer = layer_of(model, "proj")
    patch_peft(model)
    assert patch.fallback_reason(layer) is None
    layer.base_layer.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks it
    assert patch.fallback_reason(layer) == "4-bit weight repacked for bitsandbytes' CPU kernel"


def test_input_dtype_casting_disabled_stays_peft_s():
    from peft.helpers import disable_input_dtype_casting

    theirs = peft.get_peft_model(
        small_mlp().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["0"])
    )
    ours = copy.deepcopy(theirs)
    patch_peft(ours)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    results = []
    for model in (theirs, ours):
        with disable_input_dtype_casting(model):
            with pytest.raises(RuntimeError) as info:
                model(x)  # peft's own rule: float32 adapters on a bfloat16 input, not cast
            results.append(type(info.value))
    assert results[0] is results[1]
    assert patch.fallback_reason(layer_of(ours), x) is None  # with casting on: fused


# --- QLoRA ----------------------------------------------------------------------------------------


def test_qlora_minilm_patched_equals_peft():
    pytest.importorskip("bitsandbytes")
    from test_quant import minilm_4bit

    model, _ = minilm_4bit()
    theirs = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value", "dense"], init_lora_weights=False
        ),
    )
    ours = copy.deepcopy(theirs)
    report = patch_peft(ours)
    assert len(report.fused) == 31 and not report.fallback
    assert all(
        type(m).__mro__[2].__name__ == "Linear4bit"
        for m in ours.modules()
        if isinstance(m, patch.PatchedLoRA)
    )
    for model in (theirs, ours):
        model.train()
    torch.manual_seed(5)  # the same masks in BERT's own dropout
    expected = hidden(theirs).square().mean()
    expected.backward()
    torch.manual_seed(5)
    got = hidden(ours).square().mean()
    got.backward()
    assert "LoRALinearFunctionBackward" in graph_functions(got)
    assert_close("loss", got, expected.double(), 1e-5)
    want = adapter_grads(theirs)
    for name, grad in adapter_grads(ours).items():
        assert_close(name, grad, want[name].double(), GRAD_TOL)


# --- the global form, with TRL's SFTTrainer -------------------------------------------------------


def test_global_form_patches_layers_built_later_and_ends():
    report = patch_peft()
    assert report.every_layer
    model = peft_model()  # built after the call
    y = model(input_ids=batch(LLAMA_VOCAB)["input_ids"]).logits
    assert "LoRALinearFunctionBackward" in graph_functions(y.sum())
    assert unpatch_peft() == len(patch.peft_linear_classes())
    y = model(input_ids=batch(LLAMA_VOCAB)["input_ids"]).logits
    assert "LoRALinearFunctionBackward" not in graph_functions(y.sum())


def minilm_tokenizer():
    from real_models import MODEL_DIR

    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_sft_trainer_with_peft_config_trains_on_our_function_and_saves_peft_s_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = minilm_tokenizer()
    patch_peft()  # before SFTTrainer builds its peft model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    texts = [f"lora kernels train peft adapters number {i}" for i in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        max_length=24, eos_token=tokenizer.sep_token, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        bf16=False,  # (accelerate would leave the model's forward under bfloat16 autocast)
    )  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=transformers.LlamaForCausalLM(config),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=lora,
    )
    model = trainer.model
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert len(layers) == 14
    ids = tokenizer(texts[:2], return_tensors="pt", padding=True)["input_ids"]
    y = model(input_ids=ids).logits
    assert "LoRALinearFunctionBackward" in graph_functions(y.sum())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = {
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    }
    assert moved == set(before)  # every adapter trained (the B factors start at zero)
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    unpatch_peft()
    reloaded = peft.PeftModel.from_pretrained(base_of(model, config), tmp_path / "final").eval()
    model.eval()
    assert_close(
        "reloaded", reloaded(input_ids=ids).logits, model(input_ids=ids).logits.double(), TOL
    )


def base_of(peft_model, config):
    """A fresh Llama holding ``peft_model``'s base weights (unmerged, adapters left out)."""
    fresh = transformers.LlamaForCausalLM(config)
    base = copy.deepcopy(peft_model).unload()
    fresh.load_state_dict(base.state_dict())
    return fresh.eval()


# --- the Trainer: peft's checkpoints, resumed --------------------------------------------------


def classification_data():
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1000, 5000, (16,), generator=gen), "labels": i % 3}
        for i in range(24)
    ]


def trainer_for(model, output_dir, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, use_cpu=True, report_to=[],
        disable_tqdm=True, seed=0, data_seed=0,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=classification_data())


def patched_classifier():
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(classifier_model(), config)
    patch_peft(model)
    return model


def test_trainer_checkpoints_are_peft_s_and_resume(tmp_path):
    """A patched peft model under the Trainer: its checkpoints are peft's adapters (peft loads
    them), and a run resumed from one ends where the run that wrote it ended."""
    straight = patched_classifier().train()
    trainer_for(straight, tmp_path / "straight", 4).train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files  # an adapter, not a full dump
    final = peft.PeftModel.from_pretrained(
        classifier_model(), tmp_path / "straight" / "checkpoint-4"
    )
    straight.eval()
    assert_close("checkpoint in peft", logits(final.eval()), logits(straight).double(), TOL)

    resumed = patched_classifier().train()
    trainer_for(resumed, tmp_path / "resumed", 4).train(resume_from_checkpoint=str(checkpoint))
    assert_close("resumed", logits(resumed.eval()), logits(straight).double(), TOL)
