"""The dropout masks: a pure function of ``(seed, element position)`` on each device type, never
stored. The kernels (and the torch path on CUDA) keep an element iff a random 32-bit word is at
least ``p * 2**32``; the CPU torch path drops the positions a geometric-gap walk gives
(``drop_positions``). Kept elements are scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

# CPU masks are defined in fixed chunks of this many elements, every chunk from its own generator
# seeded by (seed, chunk index): the chunks are drawn in parallel, and the mask is the same
# whatever the thread count.
CHUNK_ELEMS = 2**20
_MASK64 = 2**64 - 1
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def keep_threshold(p: float) -> int:
    """The signed 32-bit threshold: keep iff ``word - 2**31 >= keep_threshold(p)``.

    Shifted by ``-2**31`` so it compares against words read as int32 (and is always a 32-bit
    argument to the kernels: one compiled variant).
    """
    return min(int(p * 2**32), 2**32 - 1) - 2**31


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """A dropout seed as the custom ops take it: a 0-d int64 tensor (one given stays as it is)."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def _chunk_seed(seed: int, chunk: int) -> int:
    """splitmix64 of (seed, chunk): decorrelated 64-bit seeds for the chunks' generators."""
    z = (seed * 0x9E3779B97F4A7C15 + (chunk + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked child needs threads of its own
        _pool, _pool_pid = ThreadPoolExecutor(max(1, torch.get_num_threads())), os.getpid()
    return _pool


def _chunk_positions(args) -> torch.Tensor:
    """The dropped positions of one CPU chunk (``size`` elements from ``start``), ascending.

    The gaps between drops are geometric: ``1 + floor(log(u) / log(1 - p))`` for uniforms ``u``
    in ``(0, 1)`` made from 32-bit words (``(word + 0.5) / 2**32``, in float64), so each element
    is dropped independently with probability ``p``. This draws and computes about ``p`` values per
    element instead of one word per element: at p = 0.1, a tenth of the generator's work.
    """
    start, size, p, seed = args
    gen = torch.Generator()
    gen.manual_seed(seed)
    inv_log = 1.0 / math.log1p(-p)
    end, last, parts = start + size, start - 1, []
    while last < end - 1:
        expected = (end - 1 - last) * p
        # Rarely short (then the walk draws again). Every word drawn is used, two uniforms each,
        # so the gaps are one stream whatever the batches: a shorter chunk's positions are the
        # longer one's below its end (the mask of m rows is the first m rows' of a longer x).
        words = torch.empty(int(expected + 6.0 * math.sqrt(expected)) // 2 + 8, dtype=torch.int64)
        words.random_(-(2**63), None, generator=gen)
        u = words.view(torch.int32).double().add_(2**31 + 0.5).mul_(2.0**-32)
        # NOTE: clamped before the cast: a tiny p would overflow int64 (the gap ends the chunk).
        gaps = u.log_().mul_(inv_log).clamp_(max=CHUNK_ELEMS).floor_().to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[: int(torch.searchsorted(positions, end))]


def drop_positions(n: int, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """The CPU torch path's mask as the ascending int64 positions (of ``n`` elements, row-major)
    it drops: the definition of the CPU mask. A pure function of ``(seed, position)``."""
    seed = int(seed)
    jobs = [
        (start, min(CHUNK_ELEMS, n - start), p, _chunk_seed(seed, start // CHUNK_ELEMS))
        for start in range(0, n, CHUNK_ELEMS)
    ]
    if not jobs:
        return torch.empty(0, dtype=torch.int64)
    if len(jobs) == 1:
        return _chunk_positions(jobs[0])
    return torch.cat(list(_thread_pool().map(_chunk_positions, jobs)))


def keep_mask(
    shape: tuple[int, int], p: float, seed: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The torch path's boolean keep-mask of ``shape``: a pure function of ``(seed, position)``
    (and of the device type: CPU and CUDA generators differ). ``seed``: an int or a 0-d tensor.

    On CPU: ``drop_positions``' positions are False. On CUDA: full-range 64-bit draws in one
    launch, read as two int32 words each, compared with ``keep_threshold(p)``. Eager CPU calls
    use the positions themselves (``torch_path``); torch.compile's graphs use this mask.
    Backward regenerates the mask from the same seed instead of saving it.
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    return _keep_mask_op(seed, shape[0], shape[1], p, torch.device(device))


# NOTE: a custom op, so torch.compile(fullgraph=True) sees one opaque node instead of tracing
# into torch.Generator objects (which it can't create inside a graph).
@torch.library.custom_op("lora_kernels::keep_mask", mutates_args=())
def _keep_mask_op(
    seed: torch.Tensor, rows: int, cols: int, p: float, device: torch.device
) -> torch.Tensor:
    if device.type == "meta":  # shapes only, as nn.Linear on meta tensors
        return torch.empty((rows, cols), dtype=torch.bool, device=device)
    n, seed, threshold = rows * cols, int(seed), keep_threshold(p)
    if device.type == "cpu":
        keep = torch.ones(n, dtype=torch.bool)
        keep[drop_positions(n, p, seed)] = False
        return keep.view(rows, cols)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_chunk_seed(seed, 0))
    words.random_(-(2**63), None, generator=gen)
    return words.view(torch.int32)[:n].view(rows, cols) >= threshold


@_keep_mask_op.register_fake
def _(seed, rows, cols, p, device):
    return torch.empty((rows, cols), dtype=torch.bool, device=device)
