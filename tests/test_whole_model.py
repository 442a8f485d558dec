"""Whole-model flows without silent failures: the peft wrapper after from_peft, modules_to_save,
injecting twice, whole-model merge and unload, and a transformers.Trainer recipe, on the real
all-MiniLM-L6-v2 and a small Llama (real_models.py)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch
from helpers import assert_close
from real_models import (
    MODEL_DIR,
    TOL,
    assert_unchanged,
    base_model,
    classifier_model,
    hidden,
    logits,
    peft,
    peft_lora,
    randomize_trainable,
    small_llama,
    snapshot,
    transformers,
)
from safetensors.torch import load_file
from torch import nn

import lora_kernels
from lora_kernels import (
    LoRALayer,
    adapters,
    from_peft,
    inject_lora,
    load_peft_adapter,
    merge_and_unload,
    merge_lora,
    save_peft_adapter,
    unload,
    unmerge_lora,
)


def trained_classifier_peft(**config):
    """A SEQ_CLS peft model whose adapters and classifier head (peft's modules_to_save) are
    all away from their initial values, as after training."""
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", **config
    )
    model = peft.get_peft_model(classifier_model(), cfg)
    randomize_trainable(model, ("lora_B", "modules_to_save"))
    return model.eval()


def file_tensors(directory):
    return load_file(os.path.join(directory, adapters.WEIGHTS_NAME))


def file_config(directory):
    with open(os.path.join(directory, adapters.CONFIG_NAME)) as f:
        return json.load(f)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- the peft wrapper after from_peft ----------------------------------------------------------

# Each peft call that would see no LoRA layer after the conversion, and the call named instead.
WRAPPER_CALLS = [
    ("merge_and_unload", (), "lora_kernels.merge_and_unload"),
    ("unload", (), "lora_kernels.unload"),
    ("merge_adapter", (), "merge_lora"),
    ("unmerge_adapter", (), "unmerge_lora"),
    ("disable_adapter", (), "lora_kernels.unload"),
]


def test_peft_wrapper_after_from_peft_refuses_naming_our_call(tmp_path):
    peft_model = peft_lora()
    expected = hidden(peft_model).detach()
    model = from_peft(peft_model)
    for method, args, instead in WRAPPER_CALLS:
        args = [tmp_path / "out" if a == "DIR" else a for a in args]
        with pytest.raises(RuntimeError, match="converted by lora_kernels.from_peft") as info:
            getattr(peft_model, method)(*args)
        assert instead in str(info.value), (method, str(info.value))
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        peft_model.base_model.merge_and_unload()  # the LoraModel inside, too
    assert not (tmp_path / "out").exists()  # no empty adapter written
    # The wrapper still runs the converted model, with the adapters it had.
    assert isinstance(peft_model, peft.PeftModel)
    assert peft_model.get_base_model() is model
    assert torch.equal(hidden(peft_model), hidden(model))
    assert_close("converted", hidden(model), expected.double(), TOL)
    with pytest.raises(ValueError, match="converted by from_peft already"):
        from_peft(peft_model)
    again = pickle.loads(pickle.dumps(peft_model))  # the swapped class survives pickling
    with pytest.raises(RuntimeError, match="converted by lora_kernels.from_peft"):
        again.merge_adapter()
    assert torch.equal(hidden(again), hidden(model))


def converted_classifier():
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    wrapper = peft.get_peft_model(classifier_model(), config)
    randomize_trainable(wrapper, ("lora_B",))
    return wrapper, from_peft(wrapper)


def test_the_converted_wrapper_saves_peft_s_adapter(tmp_path):
    """After from_peft the wrapper's save_pretrained (the Trainer's checkpoints, push_to_hub)
    writes the converted model's adapter in peft's format, with peft's task_type and
    base_model_name_or_path: peft and AutoPeftModel load it."""
    wrapper, model = converted_classifier()
    wrapper.save_pretrained(tmp_path / "adapter")
    config = file_config(tmp_path / "adapter")
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == MODEL_DIR
    expected = logits(model.eval())
    loaded = peft.PeftModel.from_pretrained(classifier_model(), tmp_path / "adapter").eval()
    assert_close("peft", logits(loaded), expected.double(), TOL)
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        tmp_path / "adapter", num_labels=3
    ).eval()
    assert_close("AutoPeftModel", logits(auto), expected.double(), TOL)
    # The state dict the Trainer passes (the wrapper's own keys), and a shard of one refused.
    state = wrapper.state_dict()
    wrapper.save_pretrained(tmp_path / "from_state", state_dict=state)
    assert file_tensors(tmp_path / "from_state").keys() == file_tensors(tmp_path / "adapter").keys()
    key = next(k for k in state if k.endswith("query.lora_A"))
    state[key] = state[key].new_empty(0)  # what a ZeRO-3 partition holds
    with pytest.raises(ValueError, match=r"has shape \(0,\), not the layer's \(384, 4\)"):
        wrapper.save_pretrained(tmp_path / "shard", state_dict=state)
    assert not (tmp_path / "shard").exists()
    wrapper.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()


def test_the_trainer_checkpoints_a_converted_wrapper(tmp_path):
    """The scenario that lost a run: from_peft keeping the wrapper, the Trainer's first
    checkpoint. It is peft's adapter now, and peft loads it."""
    wrapper, model = converted_classifier()
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(1000, 5000, (16,), generator=gen), "labels": i % 3}
        for i in range(8)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=wrapper, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    loaded = peft.PeftModel.from_pretrained(classifier_model(), checkpoint).eval()
    assert_close("checkpoint", logits(loaded), logits(model.eval()).double(), TOL)


def test_peft_wrapping_a_lora_layer_s_linear_is_refused():
    """peft's "all-linear" over an injected model (a peft_config given to a Trainer too) would
    wrap the frozen linear inside each LoRALayer, whose adapter would never train."""
    model = inject_lora(small_llama(), "all-linear", rank=4)
    with pytest.raises(ValueError, match=r"patch_peft"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))


def test_save_peft_adapter_takes_a_task_type_and_a_path(tmp_path):
    name = MODEL_DIR
    model = inject_lora(base_model(), ["query", "value"], rank=4)
    save_peft_adapter(model, tmp_path / "a", pathlib.Path(name), task_type="FEATURE_EXTRACTION")
    config = file_config(tmp_path / "a")
    assert config["base_model_name_or_path"] == name
    assert config["task_type"] == "FEATURE_EXTRACTION"


def test_from_peft_on_the_lora_model_inside():
    peft_model = peft_lora()
    bert_class = type(peft_model.get_base_model())
    model = from_peft(peft_model.base_model)  # the LoraModel, not the PeftModel
    assert type(model) is bert_class  # the model itself keeps its class
    assert len(adapters.lora_layers(model)) == 12
    with pytest.raises(RuntimeError, match="lora_kernels.unload"):
        peft_model.base_model.unload()


def test_from_peft_refuses_disabled_adapters_and_trainable_base_parameters():
    peft_model = peft_lora()
    peft_model.base_model.disable_adapter_layers()  # peft computes the base model only
    snap = snapshot(peft_model)
    with pytest.raises(ValueError, match="adapter is disabled"):
        from_peft(peft_model)
    assert_unchanged(peft_model, snap)
    # bias="all" trains every bias, which no adapter file of ours holds.
    peft_model = peft_lora(bias="all")
    snap = snapshot(peft_model)
    with pytest.raises(ValueError, match="would not be in the adapter file.*bias"):
        from_peft(peft_model)
    assert_unchanged(peft_model, snap)


def test_from_peft_keeps_peft_frozen_adapters_frozen(tmp_path):
    peft_lora().save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "a")  # inference mode
    model = from_peft(loaded)
    assert trainable_names(model) == set()


# --- modules_to_save -----------------------------------------------------------------------------


def test_inject_lora_modules_to_save_trains_and_saves_the_module(tmp_path):
    model = inject_lora(
        classifier_model(), ["query", "value"], rank=4, modules_to_save=["classifier"]
    )
    assert set(adapters.modules_to_save_in(model)) == {"classifier"}
    assert {n for n in trainable_names(model) if "lora_" not in n} == {
        "classifier.weight",
        "classifier.bias",
    }
    logits(model).square().mean().backward()
    assert model.classifier.weight.grad is not None
    randomize_trainable(model, ("lora_B", "classifier"))
    save_peft_adapter(model, tmp_path / "a")
    assert file_config(tmp_path / "a")["modules_to_save"] == ["classifier"]
    tensors = file_tensors(tmp_path / "a")
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight)
    assert torch.equal(tensors["base_model.model.classifier.bias"], model.classifier.bias)


def test_from_peft_carries_modules_to_save_and_writes_peft_s_own_file(tmp_path):
    peft_model = trained_classifier_peft()
    expected = logits(peft_model).detach()
    peft_model.save_pretrained(tmp_path / "peft")
    wrapper = peft_model.base_model.model.classifier
    trained_head = wrapper.modules_to_save["default"]

    model = from_peft(peft_model)
    assert model.classifier is trained_head  # the trained copy, not peft's original
    assert set(adapters.modules_to_save_in(model)) == {"classifier"}
    assert {"classifier.weight", "classifier.bias"} <= trainable_names(model)
    assert_close("logits", logits(model), expected.double(), TOL)

    save_peft_adapter(model, tmp_path / "ours")
    ours, theirs = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "peft")
    assert ours.keys() == theirs.keys()  # the key names peft itself writes
    assert "base_model.model.classifier.weight" in ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert file_config(tmp_path / "ours")["modules_to_save"] == ["classifier"]


def test_modules_to_save_round_trips_with_peft_both_ways(tmp_path):
    # peft -> ours
    peft_model = trained_classifier_peft()
    expected = logits(peft_model).detach()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(classifier_model(), tmp_path / "peft").eval()
    assert set(adapters.modules_to_save_in(ours)) == {"classifier"}
    assert {"classifier.weight", "classifier.bias"} <= trainable_names(ours)
    assert_close("peft -> ours", logits(ours), expected.double(), TOL)
    # ours -> peft, after our own training step changed the head
    with torch.no_grad():
        ours.classifier.weight.add_(0.1)
    mine = logits(ours).detach()
    save_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(classifier_model(), tmp_path / "ours").eval()
    assert_close("ours -> peft", logits(theirs), mine.double(), TOL)


HEAD = "base_model.model.classifier."
# (words of the error, keys dropped from peft's file, keys added to it)
BAD_HEAD_FILES = [
    ("no weights for 'classifier'", [HEAD + "weight", HEAD + "bias"], {}),
    ("has keys ['weight'] in the file", [HEAD + "bias"], {}),
    ("has shape (3, 7) in the file", [HEAD + "weight"], {HEAD + "weight": torch.zeros(3, 7)}),
    (
        "unexpected key 'base_model.model.pooler.dense.weight'",
        [],
        {"base_model.model.pooler.dense.weight": torch.zeros(384, 384)},
    ),
]


@pytest.mark.parametrize("words, dropped, added", BAD_HEAD_FILES)
def test_load_modules_to_save_errors_leave_the_model_alone(tmp_path, words, dropped, added):
    from safetensors.torch import save_file

    trained_classifier_peft().save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / adapters.WEIGHTS_NAME
    tensors = {k: v for k, v in load_file(path).items() if k not in dropped}
    save_file({**tensors, **added}, path)
    model = classifier_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=str(path)) as info:
        load_peft_adapter(model, tmp_path / "a")
    assert words in str(info.value), str(info.value)
    assert_unchanged(model, snap)


def test_save_refuses_trained_parameters_it_would_drop(tmp_path):
    model = inject_lora(base_model(), ["query", "value"])
    model.encoder.layer[0].output.LayerNorm.requires_grad_(True)  # trained, but not declared
    with pytest.raises(ValueError, match="encoder.layer.0.output.LayerNorm.weight") as info:
        save_peft_adapter(model, tmp_path / "a")
    assert "modules_to_save" in str(info.value)
    assert not (tmp_path / "a").exists()
    model.encoder.layer[0].output.LayerNorm.requires_grad_(False)
    save_peft_adapter(model, tmp_path / "a")  # frozen again: nothing is lost


def test_modules_to_save_bad_names_raise_before_any_change():
    model = classifier_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'head' matches no module"):
        inject_lora(model, ["query"], modules_to_save=["head"])
    with pytest.raises(ValueError, match="modules to save.*classifier"):
        inject_lora(model, ["query", "classifier"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="modules to save.*layer.0.attention.self.query"):
        inject_lora(model, ["query"], modules_to_save=["layer.0.attention.self"])
    with pytest.raises(TypeError, match="list of module names"):
        inject_lora(model, ["query"], modules_to_save="classifier")
    assert_unchanged(model, snap)
    inject_lora(model, ["query"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match="can't hold LoRA layers.*layer.0.attention.self$"):
        inject_lora(model, ["value"], modules_to_save=["layer.0.attention.self"])
    assert_unchanged(model, snap)
    # "all-linear" leaves the modules to save to be trained in full
    inject_lora(model, "all-linear", modules_to_save=["classifier"])
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.classifier, LoRALayer)


# --- a LoRALayer is never wrapped again -------------------------------------------------------


def test_inject_twice_never_wraps_a_lora_layer():
    model = inject_lora(base_model(), "all-linear", rank=4)
    assert len(adapters.lora_layers(model)) == 37  # 6 layers x 6 linears + the pooler
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*\(37 layers already have LoRA\)"):
        inject_lora(model, "all-linear")
    with pytest.raises(ValueError, match="already have LoRA: encoder.layer.0.attention.self.query"):
        inject_lora(model, ["query"])
    with pytest.raises(ValueError, match="already have LoRA: encoder.layer.1.attention.self.value"):
        inject_lora(model, r".*layer\.1\..*value.*")  # the regex reaches value.linear too
    assert_unchanged(model, snap)
    for layer in adapters.lora_layers(model).values():
        assert type(layer.linear) is nn.Linear


def test_all_linear_after_from_peft_adds_only_the_others(tmp_path):
    model = from_peft(peft_lora())
    peft_layers = adapters.lora_layers(model)
    inject_lora(model, "all-linear", rank=2)
    layers = adapters.lora_layers(model)
    assert len(layers) == 37
    assert all(layers[n] is layer for n, layer in peft_layers.items())  # kept, not wrapped
    assert all(type(layer.linear) is nn.Linear for layer in layers.values())
    save_peft_adapter(model, tmp_path / "a")
    assert file_config(tmp_path / "a")["target_modules"] == sorted(layers)


def test_all_linear_on_a_llama_skips_the_head_and_never_wraps():
    model = inject_lora(small_llama(), "all-linear", rank=4)
    layers = adapters.lora_layers(model)
    assert len(layers) == 2 * 7  # q k v o gate up down, per decoder layer
    assert not isinstance(model.lm_head, LoRALayer)
    with pytest.raises(ValueError, match="already have LoRA"):
        inject_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="lm_head"):  # the only linear without LoRA
        inject_lora(model, "all-linear")


# --- whole-model merge and unload --------------------------------------------------------------


def trained(model_fn, targets, **kwargs):
    model = inject_lora(model_fn(), targets, rank=4, alpha=8, **kwargs)
    randomize_trainable(model, ("lora_B", "classifier"))
    return model.eval()


@pytest.mark.parametrize("kind", ["minilm", "llama"])
def test_merge_and_unload_gives_the_base_model_s_checkpoint(tmp_path, kind):
    if kind == "minilm":
        model_fn, targets, load, out = (
            base_model,
            ["query", "value"],
            transformers.AutoModel,
            hidden,
        )
    else:
        model_fn, targets, load = small_llama, "all-linear", transformers.AutoModelForCausalLM

        def out(m):
            return logits(m, vocab=300)

    model = trained(model_fn, targets)
    expected = out(model).detach()
    base_keys = set(model_fn().state_dict())
    merged = merge_and_unload(model)
    assert merged is model and not adapters.lora_layers(model)
    assert set(model.state_dict()) == base_keys
    assert_close("merged", out(model), expected.double(), TOL)
    model.save_pretrained(tmp_path / "full")
    reloaded = load.from_pretrained(tmp_path / "full").eval()
    assert_close("reloaded", out(reloaded), expected.double(), TOL)


def test_merge_and_unload_keeps_trained_modules_to_save():
    model = trained(classifier_model, ["query"], modules_to_save=["classifier"])
    expected = logits(model).detach()
    head = model.classifier
    merge_and_unload(model)
    assert model.classifier is head and not adapters.modules_to_save_in(model)
    assert_close("merged", logits(model), expected.double(), TOL)


def test_unload_gives_the_base_weights_back_exactly():
    reference = base_model()
    model = trained(base_model, ["query", "value"])
    merge_lora(model)
    unmerge_lora(model)  # exact up to float32 rounding
    model = trained(base_model, ["query", "value"])
    unload(model)
    assert set(model.state_dict()) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(hidden(model), hidden(reference))


def test_merge_lora_and_unmerge_lora_in_place():
    model = trained(base_model, ["query", "value"])
    expected = hidden(model).detach()
    assert merge_lora(model) is model
    assert all(layer.merged for layer in adapters.lora_layers(model).values())
    assert_close("merged", hidden(model), expected.double(), TOL)
    merge_lora(model)  # already merged: nothing more is added
    assert_close("merged twice", hidden(model), expected.double(), TOL)
    with pytest.raises(ValueError, match="merged layers can't be saved"):
        save_peft_adapter(model, "unused")
    unmerge_lora(model)
    assert not any(layer.merged for layer in adapters.lora_layers(model).values())
    assert_close("unmerged", hidden(model), expected.double(), TOL)
    unload(merge_lora(model))  # a merged layer is unmerged first: no update left
    assert_close("unloaded", hidden(model), hidden(base_model()).double(), TOL)


def test_merge_refuses_non_finite_changing_no_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    inject_lora(model, ["0", "1"], rank=2)
    with torch.no_grad():
        model[1].lora_A.fill_(200.0)
        model[1].lora_B.fill_(200.0)  # 200 * 200 * 2 = 80000 > float16's max
        model[0].lora_B.fill_(0.5)
    snap = snapshot(model)
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(RuntimeError, match="1: merge would make linear.weight non-finite"):
            merge(model)
        assert_unchanged(model, snap)  # layer 0 (fine on its own) was not merged either


def test_whole_model_functions_are_exported():
    for name in ("merge_and_unload", "unload", "merge_lora", "unmerge_lora"):
        assert name in lora_kernels.__all__ and callable(getattr(lora_kernels, name))
    with pytest.raises(ValueError, match="no LoRALayer"):
        merge_and_unload(base_model())


# --- a transformers.Trainer recipe --------------------------------------------------------------


class SaveAdapter(transformers.TrainerCallback):
    """Write the adapter beside each checkpoint Trainer saves (docs/usage.md's recipe)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "adapter")
        save_peft_adapter(model, path, base_model_name_or_path=MODEL_DIR)


def train_a_few_steps(model, output_dir):
    gen = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1000, 5000, (16,), generator=gen),
            "attention_mask": torch.ones(16, dtype=torch.long),
            "labels": i % 3,
        }
        for i in range(12)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=True,  # torch.autocast to bfloat16 (on CPU here)
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=True,
        save_strategy="steps",
        save_steps=3,
        save_only_model=True,
        report_to=[],
        disable_tqdm=True,
    )
    transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[SaveAdapter()]
    ).train()
    return output_dir / "checkpoint-3" / "adapter"


@pytest.mark.parametrize("how", ["inject_lora", "from_peft"])
def test_trainer_recipe_trains_saves_and_peft_loads(tmp_path, how):
    if how == "inject_lora":
        model = inject_lora(
            classifier_model(),
            ["query", "value"],
            rank=4,
            dropout=0.1,
            modules_to_save=["classifier"],
        )
    else:
        config = peft.LoraConfig(
            r=4, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS"
        )
        model = from_peft(peft.get_peft_model(classifier_model(), config))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = train_a_few_steps(model.train(), tmp_path)

    # Every adapter and the head trained (checkpointed layers included); nothing else moved.
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if "lora_" in n or n.startswith("classifier.")}
    assert moved == expected
    # The file holds exactly what was trained.
    tensors = file_tensors(adapter)
    params = dict(model.named_parameters())
    for name, layer in adapters.lora_layers(model).items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.t())
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.t())
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(tensors[f"base_model.model.{key}"], params[key])
    # peft loads it onto a fresh base and computes what we compute (float32, no autocast).
    ours = load_peft_adapter(classifier_model(), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(classifier_model(), adapter).eval()
    assert_close("peft loads the trained adapter", logits(theirs), logits(ours).double(), TOL)
