"""Past one machine: DeepSpeed ZeRO-3 and FSDP1, 2 processes over gloo on CPU, against one
process on the full batch. The base weight must be gathered as each engine expects (ZeRO-3:
an external parameter of the layer; FSDP1: a unit of its own is called), and saves hold the
whole trained adapters (or refuse)."""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import pytest
import torch
from distributed import WORLD, gloo, run_workers
from helpers import assert_close
from real_models import GRAD_TOL, peft, small_llama, transformers
from safetensors.torch import load_file
from test_machinery import small_model
from torch import nn

import lora_kernels
from lora_kernels import LoRALayer, engines, inject_lora, patch_peft, save_peft_adapter
from lora_kernels.adapters import patch

STEPS, LR = 3, 0.2
DS_ENV = {"DS_ACCELERATOR": "cpu"}
# ZeRO-3 with every parameter partitioned (a threshold of 0: small weights too, as large ones
# are on a GPU), a client SGD (whose steps carry any gradient difference into the next loss), no
# clipping, and the 16-bit (here: float32) gathered save the Trainer uses.
ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # (DeepSpeed clips to norm 1.0 unless told)
}
# What a Trainer user writes: the Trainer fills in what is "auto" from its arguments.
TRAINER_ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": ZERO3["zero_optimization"],
}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (make test installs it after torch, without build "
    "isolation: its build imports torch)",
)


def llama_ids():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 300, (2 * WORLD, 9), generator=gen)


def shard(t, rank):
    size = len(t) // WORLD
    return t[rank * size : (rank + 1) * size]


def build(how: str) -> nn.Module:
    """The tiny Llama with LoRA on it: ``inject_lora`` or a peft model (patched or not); a
    ``_dora`` suffix: DoRA layers (``use_dora=True``)."""
    return build_on(small_llama(), how)


def build_on(base: nn.Module, how: str) -> nn.Module:
    """``build``'s LoRA on the given tiny Llama."""
    dora = how.endswith("_dora")
    if how.startswith("inject"):
        return inject_lora(base, ["q_proj", "v_proj"], rank=4, alpha=8, init="gaussian",
                           use_dora=dora)  # fmt: skip
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian",
        use_dora=dora,
    )  # fmt: skip
    model = peft.get_peft_model(base, config)
    if how.startswith("peft_patched"):
        patch_peft(model)
    return model


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by clean name (wrappers' parts left out), whole."""
    return {
        engines.clean_name(n): p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def train_one_process(how: str):
    """``(losses, model)``: STEPS SGD steps on the full batch in this process."""
    model = build(how).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids, losses = llama_ids(), []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def assert_loads_in_peft(directory, trained: nn.Module) -> None:
    """peft loads the adapter onto a fresh base; its logits equal the trained model's."""
    loaded = peft.PeftModel.from_pretrained(small_llama(), str(directory)).eval()
    ids = llama_ids()
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits
    # Two op orders (peft's forward and ours) over adapters trained away from zero: the
    # logits' smallest elements differ at ~2e-5 of their scale.
    assert_close("logits of the reloaded adapter", got, want.double(), GRAD_TOL)


# --- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------


def _zero3_worker(rank, world, out_dir, how):
    with gloo(rank, world, out_dir):
        import deepspeed

        model = build(how).train()
        trained = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(trained, lr=LR), config=ZERO3
        )
        ids, losses = shard(llama_ids(), rank), []
        # First, one LoRA layer called by itself (as a submodule of a model is, outside the
        # engine's forward): only its own hooks gather, DeepSpeed's fallback for parameters read
        # without their module's call is off.
        name, (layer, _) = next(iter(_lora_layers(engine.module).items()))
        with torch.no_grad():
            direct = layer(_layer_input(layer))
        for _ in range(STEPS):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        layers = _lora_layers(engine.module)
        # what each layer reads without calling its module, registered as the layer's own
        unregistered = [
            n
            for n, (layer, reads) in layers.items()
            if any(id(p) not in layer._external_params for p in reads)
        ]
        directory = os.path.join(out_dir, "adapter")
        if how.startswith("inject"):
            save_peft_adapter(engine.module, directory)  # on every rank: it gathers
        else:  # peft's own save, as peft documents it under ZeRO-3
            with deepspeed.zero.GatheredParameters(trained, modifier_rank=None):
                engine.module.save_pretrained(directory, is_main_process=rank == 0)
        # A layer's forward outside the engine's hooks reads the partition: a clear error.
        error = None
        for layer, _ in list(layers.values())[:1]:
            try:
                type(layer).forward(layer, torch.randn(2, layer.in_features))
            except RuntimeError as e:
                error = str(e)
        result = {
            "losses": losses,
            "direct": direct,
            "unregistered": unregistered,
            "error": error,
        }
        torch.save({**result, "fallbacks": dict(patch._CALLS)}, f"{out_dir}/rank{rank}.pt")
    return engine


def _layer_input(layer):
    return torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5))


def _lora_layers(model):
    """``{name: (layer, the parameters its fused call reads without calling their module)}``."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            found[name] = (m, [m.linear.weight])
        elif isinstance(m, patch.PatchedLoRA):
            reads = [m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight]
            if "default" in m.lora_magnitude_vector:  # DoRA's magnitude, read as an operand
                reads.append(m.lora_magnitude_vector["default"].weight)
            found[name] = (m, reads)
    return found


@needs_deepspeed
@pytest.mark.parametrize("how", ["inject", "peft_patched", "inject_dora", "peft_patched_dora"])
def test_zero3_trains_and_saves_as_one_process(tmp_path, how):
    """DeepSpeed ZeRO-3 over 2 ranks (every parameter partitioned): the losses of 3 SGD steps
    equal one process's on the full batch, each layer's base weight (and a patched peft layer's
    adapters and DoRA magnitude) is an external parameter of the layer, no call falls back to
    peft, the adapter saved on every rank is whole and equals the one process's trained adapter
    (DoRA's magnitudes too), peft loads it. A layer called by itself first (outside the
    engine's forward) gives the one process's output; its forward outside every hook gets an
    error naming ZeRO-3."""
    run_workers(_zero3_worker, (how,), tmp_path, f"ZeRO-3 {how}", env=DS_ENV)
    losses, single = train_one_process(how)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    ranks_mean = torch.tensor([r["losses"] for r in results], dtype=torch.float64).mean(0)
    assert_close("losses (mean over ranks)", ranks_mean, torch.tensor(losses).double(), 1e-5)
    layer = next(iter(_lora_layers(build(how)).values()))[0]
    with torch.no_grad():
        want = layer(_layer_input(layer)).double()
    for rank, result in enumerate(results):
        assert_close(f"rank {rank}: a layer called by itself", result["direct"], want, 1e-6)
        assert result["unregistered"] == [], f"rank {rank}"
        assert result["fallbacks"] == {}, f"rank {rank}: calls ran peft's forward"
        assert "DeepSpeed ZeRO-3" in result["error"], result["error"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    want = adapters(single)
    ours = how.startswith("inject")
    key = "base_model.model.{}.weight" if ours else "{}"
    assert len(saved) == len(want)
    for name, value in want.items():
        # ours: <module>.lora_A (in, r); peft's: base_model.model.<module>.lora_A.default.weight;
        # DoRA's magnitude: <module>.magnitude / ...lora_magnitude_vector.default.weight, saved
        # as peft's <module>.lora_magnitude_vector
        stored = key.format(name).replace(".default.", ".")
        stored = stored.replace(".magnitude.weight", ".lora_magnitude_vector")
        stored = stored.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        got = saved[stored].t() if ours and value.dim() == 2 else saved[stored]
        assert_close(f"saved {stored}", got, value.double(), 1e-5)
    assert_loads_in_peft(tmp_path / "adapter", single)


def _zero3_init_worker(rank, world, out_dir):
    with gloo(rank, world, out_dir):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ZERO3):
            model = small_llama()
        base = model.model.layers[0].self_attn.q_proj.weight
        partitioned = tuple(base.shape)  # (ZeRO-3's placeholder)
        model = build_on(model, "inject_dora").train()
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
        magnitudes = {n: m.magnitude.detach().clone() for n, m in layers.items()}
        weights = [m.linear.weight for m in layers.values()]
        with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
            norms = {n: m.linear.weight.detach().norm(dim=1) for n, m in layers.items()}
        trained = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(trained, lr=LR), config=ZERO3
        )
        ids, losses = shard(llama_ids(), rank), []
        for _ in range(STEPS):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result = {"partitioned": partitioned, "magnitudes": magnitudes, "norms": norms}
        torch.save({**result, "losses": losses}, f"{out_dir}/rank{rank}.pt")
    return engine


@needs_deepspeed
def test_dora_injected_into_a_model_built_under_zero3_init(tmp_path):
    """A model built under ``deepspeed.zero.Init`` (its weights partitioned from the start, as
    the Trainer's ZeRO-3 ``from_pretrained`` builds it): ``inject_lora(..., use_dora=True)``
    gathers each base weight for the magnitude's init (peft's init: with ``B = 0`` the whole
    weight's row norms, not the partition's), on every rank, and the engine trains it."""
    run_workers(_zero3_init_worker, (), tmp_path, "ZeRO-3 zero.Init DoRA", env=DS_ENV)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert all(r["partitioned"] == (0,) for r in results)
    names = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for rank, result in enumerate(results):
        assert result["magnitudes"].keys() == result["norms"].keys() >= names
        for name, norm in result["norms"].items():
            assert norm.shape == (64,) or norm.shape == (32,), name
            assert_close(f"rank {rank}: {name}", result["magnitudes"][name], norm.double(), 1e-6)
        losses = result["losses"]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def _trainer_worker(rank, world, out_dir, how):
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # NOTE: on a machine without an accelerator, accelerate finds no backend for DeepSpeed and
    # counts one process per rank, so that every rank saves as the main process. Set up its state
    # as it does where a GPU is: the process group (gloo here), then marked DeepSpeed.
    PartialState(cpu=True, backend="gloo").distributed_type = DistributedType.DEEPSPEED
    model = build(how)
    callbacks = [SaveAdapter()] if how == "inject" else []  # docs/usage.md's recipe
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=LR,
        save_strategy="steps",
        save_steps=2,
        deepspeed=TRAINER_ZERO3,
        accelerator_config={"use_configured_state": True},
        report_to=[],
        disable_tqdm=True,
    )
    assert args.world_size == world and args.should_save == (rank == 0)
    data = [{"input_ids": ids, "labels": ids} for ids in llama_ids()]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    torch.save(dict(patch._CALLS), f"{out_dir}/rank{rank}.pt")
    return trainer


class SaveAdapter(transformers.TrainerCallback):
    """docs/usage.md's callback: the adapter beside each checkpoint (on every rank: the save
    gathers a partitioned model; the main process writes)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "adapter")
        save_peft_adapter(model, path)


@needs_deepspeed
@pytest.mark.parametrize("how", ["inject", "peft_patched", "peft_patched_dora"])
def test_zero3_trainer_checkpoint_loads_in_peft(tmp_path, how):
    """``Trainer(deepspeed=<ZeRO-3>)`` over 2 ranks: the checkpoint's adapter (peft's own with
    ``patch_peft``, DoRA's magnitudes too; the documented callback's with ``inject_lora``) is
    whole, and peft reloads it."""
    run_workers(_trainer_worker, (how,), tmp_path, f"Trainer ZeRO-3 {how}", env=DS_ENV)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    directory = checkpoint / "adapter" if how == "inject" else checkpoint
    saved = load_file(directory / "adapter_model.safetensors")
    fresh = build(how)
    # (A and B 2-D, DoRA's magnitudes 1-D: none the (0,) of a partition)
    assert saved and all(v.dim() == ("magnitude" not in k) + 1 and v.numel() > 0
                         for k, v in saved.items())  # fmt: skip
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {}, "calls ran peft's forward"
    loaded = peft.PeftModel.from_pretrained(small_llama(), str(directory))
    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(trained) == (3 if how.endswith("_dora") else 2) * len(_lora_layers(fresh))
    moved = [n for n, p in trained.items() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "the reloaded adapter is the untrained one (lora_B all zero)"


# --- FSDP1 ----------------------------------------------------------------------------------


def _fsdp1(model, unit):
    """FSDP1 over ``model``: ``unit="inner"``, a size policy small enough that each base linear
    of over 500 parameters is a unit of its own; ``"layer"``: each LoRA layer (or Llama decoder
    layer) is a unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy

    if unit == "inner":
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=500)
    else:
        policy = ModuleWrapPolicy(
            {LoRALayer, transformers.models.llama.modeling_llama.LlamaDecoderLayer}
        )
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
    )


def _fsdp1_worker(rank, world, out_dir, x, y, how, unit):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with gloo(rank, world, out_dir):
        model = _fsdp1(small_model() if how == "inject" else build(how), unit)
        if how == "inject":
            nn.functional.mse_loss(model(shard(x, rank)), shard(y, rank)).backward()
        else:
            ids = shard(llama_ids(), rank)
            model(input_ids=ids, labels=ids).loss.backward()
        units = sum(
            engines.fsdp_unit(m.linear) for m in model.modules() if isinstance(m, LoRALayer)
        )
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            grads = {engines.clean_name(n): p.grad.clone() for n, p in model.named_parameters()
                     if p.requires_grad}  # fmt: skip
        error = None
        if how == "inject" and unit == "layer":
            layer = next(m for m in model.modules() if isinstance(m, LoRALayer))
            try:  # the wrapped layer called outside its unit: its weight is a flat shard
                layer(shard(x, rank))
            except RuntimeError as e:
                error = str(e)
        if how == "inject":
            save_peft_adapter(model, os.path.join(out_dir, "adapter"))
        result = {"grads": grads, "units": units, "error": error, "fallbacks": dict(patch._CALLS)}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    return model


@pytest.mark.parametrize(
    ("how", "unit"),
    [("inject", "inner"), ("inject", "layer"), ("peft_patched", "inner"),
     ("peft_patched", "layer"), ("peft_patched_dora", "layer")],
)  # fmt: skip
def test_fsdp1_gradients_equal_full_batch(tmp_path, how, unit):
    """FSDP1 (``use_orig_params=True``) over 2 ranks, with each base linear a unit of its own
    and with the layer as the unit: the adapters' gradients equal one process's on the full
    batch. A base linear that is its own unit is called (it unshards only in its own forward):
    ``LoRALayer`` adds the LoRA term, a patched peft layer runs peft's forward (counted). The
    adapter saved on every rank is whole; a wrapped layer called outside its unit gets an error
    naming FSDP's flat shard."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 16, generator=gen), torch.randn(12, 8, generator=gen)
    run_workers(_fsdp1_worker, (x, y, how, unit), tmp_path, f"FSDP1 {how} {unit}")
    if how == "inject":
        single = small_model()
        nn.functional.mse_loss(single(x), y).backward()
        tol = 1e-6
    else:
        single, ids = build("peft_dora" if how.endswith("_dora") else "peft"), llama_ids()
        single(input_ids=ids, labels=ids).loss.backward()
        tol = GRAD_TOL
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        want = {n: p.grad for n, p in single.named_parameters() if p.requires_grad}
        assert result["grads"].keys() == want.keys()
        for name, grad in want.items():
            assert_close(f"rank {rank} {name}", result["grads"][name], grad.double(), tol)
        fallbacks = result["fallbacks"]
        if how == "inject":
            assert result["units"] == (1 if unit == "inner" else 0)
        elif unit == "inner":
            assert set(fallbacks) == {
                "base layer is an FSDP unit of its own (peft's forward calls it: it unshards)"
            }
        else:
            assert fallbacks == {}
        if how == "inject" and unit == "layer":
            assert "flat shard" in result["error"], result["error"]
    if how == "inject":
        saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        for name, layer in lora_kernels.adapters.matching.lora_layers(single).items():
            got = saved[f"base_model.model.{name}.lora_A.weight"].t()
            assert_close(f"saved {name}.lora_A", got, layer.lora_A.double(), 0)
