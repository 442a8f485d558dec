"""Nothing silently wrong (issue 25): non-finite scalings, refused calls that change nothing,
saves that fail half-way, tied weights, linears whose parent reads their weight itself, empty
dimensions, strict adapter configs. Each case failed before its fix."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import assert_close
from safetensors.torch import save_file
from torch import nn

from lora_kernels import (
    LoRALayer,
    inject_lora,
    load_peft_adapter,
    lora_linear,
    merge_and_unload,
    merge_lora,
    save_peft_adapter,
    unload,
)
from lora_kernels.reference import lora_linear_reference

# --- non-finite scaling -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_is_refused_where_it_enters(alpha):
    with pytest.raises(ValueError, match="alpha must be finite"):
        LoRALayer(8, 4, rank=2, alpha=alpha)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="alpha must be finite"):
        inject_lora(model, ["0"], rank=2, alpha=alpha)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
    x, W, A, B = torch.randn(3, 8), torch.randn(4, 8), torch.randn(8, 2), torch.randn(2, 4)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_linear(x, W, None, A, B, scaling=alpha)


@pytest.mark.parametrize("rows", [3, 8])  # MKL's addmm_(alpha=nan) differed by row count
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_scaling_follows_the_reference_over_nan_adapters(rows, backend):
    """``0 * NaN`` is NaN in the math: BLAS's alpha=0 shortcut must not hide it."""
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(rows, 8, generator=gen), torch.randn(4, 8, generator=gen)
    A, B = torch.randn(8, 2, generator=gen), torch.randn(2, 4, generator=gen)
    B[0, 1] = math.nan
    y = lora_linear(x, W, None, A, B, scaling=0.0, backend=backend)
    ref = lora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), 0.0)
    assert torch.equal(y.isnan(), ref.isnan()) and ref[:, 1].isnan().all()
    finite = ~ref.isnan()
    assert_close("finite part", y[finite], ref[finite], 1e-5)


def write_adapter(directory, config_changes, rank=2):
    """A valid peft adapter for ``nn.Sequential(nn.Linear(8, 4))`` with config fields changed."""
    os.makedirs(directory, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["0"]}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({**config, **config_changes}, f)
    tensors = {
        "base_model.model.0.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.0.lora_B.weight": torch.randn(4, rank),
    }
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"lora_alpha": math.inf}, "lora_alpha"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"use_rslora": "false"}, "use_rslora"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"r": 2.0}, "r"),
        ({"alpha_pattern": {"0": math.nan}}, "alpha_pattern"),
        ({"rank_pattern": {"0": "2"}}, "rank_pattern"),
    ],
)
def test_adapter_config_fields_are_read_strictly(tmp_path, change, field):
    """A bad field names the file and the field, and the model is left as it was."""
    write_adapter(tmp_path, change)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=f"adapter_config.json: {field}"):
        load_peft_adapter(model, tmp_path)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


# --- a refused call changes nothing -------------------------------------------------------------


class Refused(nn.Linear):
    """A linear ``LoRALayer.from_linear`` refuses (its weight claims to be an unquantized
    bitsandbytes 4-bit weight), after an ordinary one was accepted."""

    def __init__(self):
        super().__init__(8, 4)
        self.weight.__class__ = type("Params4bit", (nn.Parameter,), {})


def test_inject_lora_refused_half_way_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), Refused())
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="not quantized yet"):
        inject_lora(model, ["0", "1"], rank=2)
    assert [p.requires_grad for p in model.parameters()] == before
    assert type(model[0]) is nn.Linear


def test_load_peft_adapter_refused_half_way_changes_nothing(tmp_path):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "1"]}
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name, (k, n) in {"0": (8, 8), "1": (8, 4)}.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, k)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n, 2)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = nn.Sequential(nn.Linear(8, 8), Refused())
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="not quantized yet"):
        load_peft_adapter(model, tmp_path)
    assert [p.requires_grad for p in model.parameters()] == before


# --- a save that fails half-way -----------------------------------------------------------------


def test_a_save_that_cannot_finish_leaves_the_directory_as_it_was(tmp_path):
    model = inject_lora(nn.Sequential(nn.Linear(8, 4)), ["0"], rank=2, init="seed")
    save_peft_adapter(model, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    os.remove(tmp_path / "adapter_config.json")
    os.mkdir(tmp_path / "adapter_config.json")  # where the config must go: a directory
    with torch.no_grad():
        model[0].lora_A.add_(1.0)
    with pytest.raises(IsADirectoryError, match="adapter_config.json exists and is not a file"):
        save_peft_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_rename_failing_half_way_is_rolled_back(tmp_path, monkeypatch):
    """The second rename fails (a disk error, say): the first is taken back, the old files
    restored, nothing else left behind."""
    model = inject_lora(nn.Sequential(nn.Linear(8, 4)), ["0"], rank=2, init="seed")
    save_peft_adapter(model, tmp_path)
    old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with torch.no_grad():
        model[0].lora_A.add_(1.0)
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith("adapter_config.json") and ".adapter-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == old
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(".adapter-")]


# --- tied weights, a linear under two names -----------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("merge", [merge_lora, merge_and_unload])
def test_merging_into_a_tied_weight_is_refused(merge):
    model = inject_lora(Tied(), ["head"], rank=2, init="seed")
    before = model.emb.weight.clone()
    with pytest.raises(RuntimeError, match=r"head: its base weight is shared with emb\.weight"):
        merge(model)
    assert torch.equal(model.emb.weight, before) and not model.head.merged
    assert isinstance(model.head, LoRALayer)


def test_a_linear_under_two_names_is_refused():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.GELU(), shared)
    with pytest.raises(ValueError, match=r"more than one name.*0 \(also 2\)"):
        inject_lora(model, ["0"], rank=2)
    assert model[0] is shared and model[2] is shared


# --- linears whose parent reads their weight itself ---------------------------------------------


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="reads out_proj.weight itself"):
        inject_lora(model, ["out_proj"], rank=2)
    assert type(model[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_all_linear_skips_them_with_one_warning():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="0.self_attn.out_proj, 0.linear1, 0.linear2"):
        inject_lora(model, "all-linear", rank=2)
    assert not isinstance(layer.linear1, LoRALayer) and not isinstance(layer.linear2, LoRALayer)
    with pytest.raises(ValueError, match="eval fast path reads linear1.weight"):
        inject_lora(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)), ["linear1"], rank=2)


def test_load_refuses_them_naming_the_file(tmp_path):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["out_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        "base_model.model.0.out_proj.lora_A.weight": torch.randn(2, 8),
        "base_model.model.0.out_proj.lora_B.weight": torch.randn(8, 2),
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter_model.safetensors: 0.out_proj: nn.Multihead"):
        load_peft_adapter(nn.Sequential(nn.MultiheadAttention(8, 2)), tmp_path)


# --- errors that say what is wrong, dimensions nn.Linear takes ----------------------------------


def test_target_modules_entries_must_be_names():
    with pytest.raises(TypeError, match=r"entries must be module names \(str\), got 1 \(int\)"):
        inject_lora(nn.Sequential(nn.Linear(8, 4)), [1])


@pytest.mark.parametrize(("k", "n"), [(0, 4), (4, 0), (0, 0)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_dimensions_compute_what_nn_linear_computes(k, n, backend):
    layer = LoRALayer(k, n, rank=2, init="seed")
    x = torch.randn(2, 3, k, requires_grad=True)
    y = lora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, backend=backend
    )
    assert torch.equal(y, layer.linear(x))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))


# --- our own save, our own load -----------------------------------------------------------------


def nested():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    )


def test_patterns_round_trip_when_one_name_ends_another(tmp_path):
    """A top-level ``0`` (rank 8) beside nested ``2.0`` and ``2.1`` (rank 4, the config's ``r``):
    the ``rank_pattern`` key for ``0`` must not match ``2.0`` under peft's suffix rule; both our
    loader and peft's read the save."""
    peft = pytest.importorskip("peft")
    model = inject_lora(nested(), "0", rank=8, alpha=16, init="seed")
    inject_lora(model, r"2\.[01]", rank=4, alpha=2, init="seed")
    save_peft_adapter(model, tmp_path)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
        ours = load_peft_adapter(nested(), tmp_path)
        assert ours[0].rank == 8 and ours[2][0].rank == ours[2][1].rank == 4
        assert_close("our load", ours(x), want.double(), 1e-6)
        theirs = peft.PeftModel.from_pretrained(nested(), str(tmp_path))
        assert_close("peft's load", theirs(x), want.double(), 1e-6)


@pytest.mark.parametrize("unload_fn", [merge_and_unload, unload])
def test_a_bare_layer_unloads_to_its_linear(unload_fn):
    layer = LoRALayer(8, 4, rank=2, init="seed")
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = layer(x) if unload_fn is merge_and_unload else layer.linear(x)
        linear = unload_fn(layer)
        assert type(linear) is nn.Linear and dict(linear.named_children()) == {}
        assert_close("unloaded", linear(x), want.double(), 1e-6)


def test_saving_a_bare_layer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bare LoRALayer"):
        save_peft_adapter(LoRALayer(8, 4, rank=2), tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_meta_tensors_flow_through_shapes_only(dropout):
    """As nn.Linear on the meta device (how large models are built before loading weights)."""
    layer = LoRALayer(8, 4, rank=2, dropout=dropout, device="meta")
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 4) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_A.grad.shape == (8, 2)


# --- ranks the kernels cannot hold --------------------------------------------------------------


@pytest.mark.parametrize("rank", [129, 256])
def test_ranks_over_the_kernels_limit(monkeypatch, rank):
    """``backend="triton"`` names the rank and the limit before any kernel; ``"auto"`` (here
    made to take the kernels on CPU, the interpreter standing in for the GPU) runs the torch
    path, against the float64 reference."""
    from lora_kernels import torch_path, validation

    gen = torch.Generator().manual_seed(rank)
    x, W = torch.randn(5, 16, generator=gen), torch.randn(8, 16, generator=gen)
    A, B = torch.randn(16, rank, generator=gen), torch.randn(rank, 8, generator=gen)
    with pytest.raises(ValueError, match=f"rank {rank} is over the kernels' limit of 128"):
        lora_linear(x, W, None, A, B, backend="triton")
    monkeypatch.setattr(validation, "AUTO_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    ran = []
    real = torch_path.forward
    monkeypatch.setattr(torch_path, "forward", lambda *a: ran.append(1) or real(*a))
    y = lora_linear(x, W, None, A, B, scaling=0.5)
    ref = lora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), 0.5)
    assert ran and ref.shape == y.shape
    assert_close("y", y, ref, 1e-5)


# --- smaller numerical points -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_bias_gradient_keeps_float64_precision(backend):
    """An unfrozen bias's gradient in float64 sums in float64 (it was summed in float32 on the
    Triton path: 1e-7 off)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    W, b = torch.randn(8, 16, generator=gen, dtype=torch.float64), torch.randn(8, dtype=x.dtype)
    A = torch.randn(16, 4, generator=gen, dtype=x.dtype)
    B = torch.randn(4, 8, generator=gen, dtype=x.dtype)
    dy = torch.randn(300, 8, generator=gen, dtype=x.dtype) * 1e3 + 1e4
    b.requires_grad_(True)
    lora_linear(x, W, b, A, B, scaling=0.5, backend=backend).backward(dy)
    assert_close("db", b.grad, dy.sum(0), 1e-12)


# --- the merged state ---------------------------------------------------------------------------


def test_a_merged_layers_state_loads_into_an_unmerged_one():
    """The state dict holds the unmerged base weight: the update is not counted twice."""
    torch.manual_seed(0)
    merged = LoRALayer(8, 4, rank=2, init="seed")
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = merged(x)
        merged.merge()
        fresh = LoRALayer(8, 4, rank=2)
        fresh.load_state_dict(merged.state_dict())
        assert not fresh.merged
        assert_close("fresh", fresh(x), want.double(), 1e-6)
        assert_close("merged", merged(x), want.double(), 1e-6)


def test_an_unmerged_state_loads_into_a_merged_layer():
    """A merged layer folds the update into what it loads and stays merged; unmerging gives back
    the loaded base weight (up to float32 rounding)."""
    torch.manual_seed(0)
    source = LoRALayer(8, 4, rank=2, init="seed")
    target = LoRALayer(8, 4, rank=2, init="seed")
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = source(x)
        target.merge()
        target.load_state_dict(source.state_dict())
        assert target.merged
        assert_close("merged target", target(x), want.double(), 1e-6)
        target.unmerge()
        assert_close("base", target.linear.weight, source.linear.weight.double(), 1e-6)
        assert_close("unmerged target", target(x), want.double(), 1e-6)
