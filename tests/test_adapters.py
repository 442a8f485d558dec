"""Model-level LoRA: inject_lora, from_peft, and adapters in peft's format, on a real model
(all-MiniLM-L6-v2, see real_models.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close
from real_models import (
    GRAD_TOL,
    TOL,
    assert_unchanged,
    base_model,
    hidden,
    peft,
    peft_lora,
    randomize_lora_B,
    snapshot,
)
from torch import nn

from lora_kernels import LoRALayer, adapters
from lora_kernels.adapters import (
    from_peft,
    inject_lora,
    load_peft_adapter,
    save_peft_adapter,
)

# --- inject_lora -------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8)})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 5)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        return self.lm_head(self.norm(self.encoder["query"](x) + self.encoder["value"](x)))


def test_inject_lora_matches_like_peft_and_freezes():
    model = Toy()
    query = model.encoder["query"]
    inject_lora(model, ["query"], rank=2, alpha=4)
    assert isinstance(model.encoder["query"], LoRALayer)
    assert model.encoder["query"].linear is query  # shares the weight, no copy
    assert isinstance(model.encoder["value"], nn.Linear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["encoder.query.lora_A", "encoder.query.lora_B"]
    assert model.encoder["query"].scaling == 2.0


def test_inject_lora_all_linear_skips_the_head():
    model = inject_lora(Toy(), "all-linear", rank=2)
    assert set(adapters.lora_layers(model)) == {"encoder.query", "encoder.value"}
    assert isinstance(model.lm_head, nn.Linear)


def test_inject_lora_regex_and_full_names():
    assert set(adapters.lora_layers(inject_lora(Toy(), r"encoder\.(query|value)"))) == {
        "encoder.query",
        "encoder.value",
    }
    assert set(adapters.lora_layers(inject_lora(Toy(), ["encoder.value"]))) == {"encoder.value"}


def test_inject_lora_errors_leave_the_model_alone():
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match="matched no nn.Linear.*encoder.query, encoder.value, lm_head"
    ):
        inject_lora(model, ["key"])
    with pytest.raises(ValueError, match="not nn.Linear: norm \\(LayerNorm\\)"):
        inject_lora(model, ["norm", "query"])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        inject_lora(model, ["query"], rank=0)
    assert_unchanged(model, snap)


def test_inject_lora_on_minilm_trains_only_lora():
    model = inject_lora(base_model(), ["query", "value"], rank=4, alpha=8)
    assert len(adapters.lora_layers(model)) == 12
    reference = base_model()
    assert_close("fresh adapter = base model", hidden(model), hidden(reference).double(), TOL)
    hidden(model).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


# --- from_peft -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"value": 4}, "alpha_pattern": {"layer.0.attention.self.query": 32}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_from_peft_same_outputs_and_gradients(config):
    peft_model = peft_lora(**config)
    y_peft = hidden(peft_model)
    y_peft.square().mean().backward()
    peft_grads = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            peft_grads[name] = (
                module.lora_A["default"].weight.grad.t(),
                module.lora_B["default"].weight.grad.t(),
            )
            base_weight = module.base_layer.weight

    model = from_peft(peft_model)
    layers = adapters.lora_layers(model)
    assert set(layers) == set(peft_grads) and len(layers) == 12
    assert any(layer.linear.weight is base_weight for layer in layers.values())  # same object
    y = hidden(model)
    assert_close("hidden states", y, y_peft.detach().double(), TOL)
    y.square().mean().backward()
    for name, layer in layers.items():
        assert_close(f"{name} dA", layer.lora_A.grad, peft_grads[name][0].double(), GRAD_TOL)
        assert_close(f"{name} dB", layer.lora_B.grad, peft_grads[name][1].double(), GRAD_TOL)


def test_from_peft_converts_dora_over_both_bases():
    """peft's DoRA layers convert, over an nn.Linear and over a 4-bit Linear4bit (numbers:
    tests/test_patch_peft.py, tests/test_qdora.py)."""
    converted = from_peft(peft_lora(use_dora=True))
    assert all(m.use_dora for m in converted.modules() if isinstance(m, LoRALayer))
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential()
    model.add_module("proj", bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32).to("cpu"))
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: peft's bnb layers
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=True)
    magnitude = peft.get_peft_model(model, config).base_model.model.proj.lora_magnitude_vector
    expected = magnitude["default"].weight.detach().clone()
    layer = from_peft(model).proj
    assert isinstance(layer, LoRALayer) and layer.use_dora
    assert torch.equal(layer.magnitude.detach(), expected)


def test_from_peft_rejects_non_linear_layers():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)

    model = peft.get_peft_model(
        WithEmbedding(), peft.LoraConfig(r=2, target_modules=["emb", "proj"])
    )
    with pytest.raises(ValueError, match="'emb'.*Embedding is not supported"):
        from_peft(model)


# --- adapters in peft's format ---------------------------------------------------------------


def ours_with_adapter():
    model = inject_lora(base_model(), ["query", "value"], rank=8, alpha=16)
    randomize_lora_B(model)
    return model.eval()


def test_our_adapter_loads_in_peft(tmp_path):
    ours = ours_with_adapter()
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="all-MiniLM-L6-v2")
    config = json.loads((tmp_path / "adapter" / adapters.CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    loaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    assert_close("peft loads ours", hidden(loaded), hidden(ours).detach().double(), TOL)


def test_peft_adapter_loads_in_ours(tmp_path):
    peft_model = peft_lora(rank_pattern={"value": 4}, lora_dropout=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_peft_adapter(base_model(), tmp_path / "adapter")
    layers = adapters.lora_layers(model)
    assert len(layers) == 12 and layers["encoder.layer.3.attention.self.value"].rank == 4
    assert layers["encoder.layer.3.attention.self.query"].dropout == 0.1
    assert_close(
        "ours loads peft's", hidden(model.eval()), hidden(peft_model).detach().double(), TOL
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}" for n in layers for ab in "AB"
    }


def test_round_trip_through_our_files(tmp_path):
    ours = ours_with_adapter()
    save_peft_adapter(ours, tmp_path / "a")
    again = load_peft_adapter(base_model(), tmp_path / "a")
    assert_close("round trip", hidden(again.eval()), hidden(ours).detach().double(), 1e-6)


def corrupt(directory, how):
    config_path = directory / adapters.CONFIG_NAME
    weights_path = directory / adapters.WEIGHTS_NAME
    if how == "no weights":
        weights_path.unlink()
    elif how == "no config":
        config_path.unlink()
    elif how == "truncated weights":
        weights_path.write_bytes(weights_path.read_bytes()[:100])
    elif how == "bad json":
        config_path.write_text("{not json")
    elif how in ("wrong shape", "unknown module", "missing B"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights_path)
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        if how == "wrong shape":
            tensors[key] = torch.zeros(8, 7)
        elif how == "unknown module":
            for k in (key, key.replace("lora_A", "lora_B")):
                tensors[k.replace("query", "nonexistent")] = tensors.pop(k)
        else:
            del tensors[key.replace("lora_A", "lora_B")]
        save_file(tensors, weights_path)
    elif how == "dora":
        config = json.loads(config_path.read_text())
        config["use_dora"] = True
        config_path.write_text(json.dumps(config))
    return {"no weights": weights_path, "no config": config_path, "bad json": config_path}.get(
        how, weights_path
    )


@pytest.mark.parametrize(
    "how, words",
    [
        ("no weights", "missing"),
        ("no config", "missing"),
        ("truncated weights", "not a readable safetensors file"),
        ("bad json", "not valid JSON"),
        ("wrong shape", "don't fit nn.Linear(384, 384)"),
        ("unknown module", "has no module"),
        ("missing B", "has no lora_B weight"),
        ("dora", "has no lora_magnitude_vector (use_dora)"),  # a DoRA config, no magnitudes
    ],
)
def test_bad_adapter_fails_cleanly(tmp_path, how, words):
    save_peft_adapter(ours_with_adapter(), tmp_path / "a")
    bad_file = corrupt(tmp_path / "a", how)
    model = base_model()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        load_peft_adapter(model, tmp_path / "a")
    assert str(bad_file) in str(info.value) and words in str(info.value), str(info.value)
    assert_unchanged(model, snap)


def test_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "a"
    save_peft_adapter(ours_with_adapter(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(inject_lora(Toy(), ["query"]), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging directory left behind
    with pytest.raises(OSError):
        save_peft_adapter(inject_lora(Toy(), ["query"]), tmp_path / "new")
    assert not (tmp_path / "new").exists()


# --- float32 adapters on a bfloat16 model (peft's default) -------------------------------------


def bf16_peft_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).bfloat16()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])
    peft_model = peft.get_peft_model(model, config)  # autocast_adapter_dtype: float32 adapters
    randomize_lora_B(peft_model)
    return peft_model.eval()


def test_from_peft_keeps_float32_adapters():
    peft_model = bf16_peft_model()
    x = torch.randn(5, 16).bfloat16()
    expected = peft_model(x)
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert {w.dtype for w in weights.values()} == {torch.float32}
    model = from_peft(peft_model)
    for i in (0, 2):
        layer = model[i]
        assert layer.linear.weight.dtype == torch.bfloat16
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert torch.equal(layer.lora_A, weights[f"base_model.model.{i}.lora_A.default.weight"].t())
        assert torch.equal(layer.lora_B, weights[f"base_model.model.{i}.lora_B.default.weight"].t())
    got = model(x)
    assert got.dtype == torch.bfloat16
    # peft runs the LoRA branch in float32, ours in bfloat16 (as autocast would): equal up to
    # bfloat16 rounding.
    assert_close("y", got, expected.double(), 2e-2)


def test_float32_adapters_round_trip_through_files(tmp_path):
    model = from_peft(bf16_peft_model())
    save_peft_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / adapters.WEIGHTS_NAME)
    assert {t.dtype for t in saved.values()} == {torch.float32}

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).bfloat16()

    kept = load_peft_adapter(fresh(), tmp_path / "a", adapter_dtype=torch.float32)
    default = load_peft_adapter(fresh(), tmp_path / "a")
    for i in (0, 2):
        assert kept[i].lora_A.dtype == torch.float32
        assert torch.equal(kept[i].lora_A, model[i].lora_A)
        assert torch.equal(kept[i].lora_B, model[i].lora_B)
        assert default[i].lora_A.dtype == torch.bfloat16  # the linear's dtype, as before
    with pytest.raises(TypeError, match="adapter_dtype"):
        load_peft_adapter(fresh(), tmp_path / "a", adapter_dtype="float32")
