"""One way to time a layer call, and what a measurement is written with.

``time_ms`` times a callable on the device it runs on (CUDA events through
``triton.testing.do_bench``; ``time.perf_counter`` on CPU, where the Triton interpreter's
timings mean nothing but the machinery is real). ``layer_call`` is one forward + backward of the
layer on the Triton path with a given plan, or on the torch path. ``machine_facts`` and
``write_json`` are what every measurement file carries and how it is written. Used by ``tune``,
``gpu_check`` and the benchmarks.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import torch

from . import torch_path
from ._version import __version__

# do_bench's windows (ms): enough repetitions for a stable median of a ~1 ms layer call, short
# enough that a key's dozen candidates tune in seconds (compiling them is most of the cost).
WARMUP_MS, REP_MS = 10, 50
# The interpreter runs a tiny call in ~0.1-1 s: one timed run each (the numbers mean nothing).
CPU_REPS = 1


def time_ms(fn, device: torch.device) -> float:
    """The median milliseconds of ``fn()`` on ``device``: ``do_bench`` on CUDA; on CPU one warm
    call, then the median of ``CPU_REPS`` timed ones."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    fn()  # compile / warm
    samples = []
    for _ in range(CPU_REPS):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def layer_call(plan, x, weight, bias, lora_A, lora_B, dy, dropout_p) -> None:
    """One forward + backward of the layer (x and the adapters requiring grad, as in training),
    on the Triton path with ``plan`` (a ``triton_path.Plan``), or on the torch path when
    ``plan`` is ``None``. ``weight``: a tensor, or a function giving the operand for each use (a
    4-bit base's strategy: ``triton_path.base_weight``)."""
    from . import triton_path  # Triton is optional: only a plan's call needs it

    def w():
        return weight() if callable(weight) else weight

    needs = (True, False, False, True, True)
    scaling, seed = 2.0, 1234
    if plan is None:
        _, S = torch_path.forward(x, w(), bias, lora_A, lora_B, scaling, dropout_p, seed)
        torch_path.backward(dy, x, w(), lora_A, lora_B, S, scaling, dropout_p, seed, needs)
    else:
        _, T = triton_path.forward(
            x, w(), bias, lora_A, lora_B, scaling, dropout_p, seed, plan=plan
        )
        triton_path.backward(
            dy, x, w(), lora_A, lora_B, T, scaling, dropout_p, seed, needs, plan=plan
        )


def fwd_bwd_ms(module, x, dy) -> float:
    """Milliseconds of ``module(x).backward(dy)`` (``time_ms``), gradients cleared each time."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        module(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return time_ms(step, x.device)


def peak_bytes(module, x, dy) -> int | None:
    """CUDA memory one forward + backward allocates at its peak (``None`` off CUDA)."""
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    module(x).backward(dy)
    torch.cuda.synchronize()
    x.grad = None
    return torch.cuda.max_memory_allocated() - before


def machine_facts(device: torch.device) -> dict:
    """What a measurement on ``device`` was taken with: the device (its name, and on CUDA its
    capability, SM count and memory), the CPU threads, the versions (torch, Triton, peft,
    lora_kernels, Python), the platform and the date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    device = torch.device(device)
    facts = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_bytes=props.total_memory,
        )
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    return {
        **facts,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "peft": peft_version,
        "lora_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, data) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically: a temporary file beside it, then
    ``os.replace``, so a reader (or a run killed mid-write) never sees half a file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
