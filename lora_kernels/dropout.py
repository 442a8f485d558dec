"""The dropout mask both backends share the definition of: keep iff a random 32-bit word is at
least ``p * 2**32``. Kept elements are scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# CPU masks are drawn in chunks of this many 64-bit words (two elements each), every chunk from
# its own generator seeded by (seed, chunk index): the chunks fill in parallel, and the mask is
# the same whatever the thread count. 2**18 words = 2 MiB, a chunk that stays in cache.
CHUNK_WORDS = 2**18
_MASK64 = 2**64 - 1
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def keep_threshold(p: float) -> int:
    """The signed 32-bit threshold: keep iff ``word - 2**31 >= keep_threshold(p)``.

    Shifted by ``-2**31`` so it compares against words read as int32 (and is always a 32-bit
    argument to the kernels: one compiled variant).
    """
    return min(int(p * 2**32), 2**32 - 1) - 2**31


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


_scratch = threading.local()


def _fill_chunk(args) -> None:
    """One CPU chunk: draw its words into this thread's scratch buffer, compare into ``keep``."""
    keep, seed, threshold = args
    words = getattr(_scratch, "words", None)
    if words is None:
        # NOTE: one CHUNK_WORDS buffer per pool thread, reused: fresh (M x K / 2)-word tensors
        # per call can cost page faults on top of the drawing (a copy into a fresh 16 MiB
        # tensor took 21 ms in one profile on our 2-core machine).
        words = _scratch.words = torch.empty(CHUNK_WORDS, dtype=torch.int64)
    n = keep.numel()
    words = words[: (n + 1) // 2]
    gen = torch.Generator()
    gen.manual_seed(seed)
    words.random_(-(2**63), None, generator=gen)
    torch.ge(words.view(torch.int32)[:n], threshold, out=keep)


def keep_mask(
    shape: tuple[int, int], p: float, seed: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The torch path's boolean keep-mask of ``shape``: a pure function of ``(seed, position)``
    (and of the device type: CPU and CUDA generators differ). ``seed``: an int or a 0-d tensor.

    Full-range 64-bit draws read as two int32 words each, compared with ``keep_threshold(p)``.
    On CPU the words come in fixed chunks filled by a thread pool; on CUDA in one launch.
    Backward calls this again with the same seed instead of saving a mask.
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
    n, seed, threshold = rows * cols, int(seed), keep_threshold(p)
    if device.type == "cpu":
        # NOTE: out of inference mode, which is per thread: the pool's threads run outside it
        # and could not write into an inference tensor made by a caller inside it.
        with torch.inference_mode(False):
            keep = torch.empty(n, dtype=torch.bool)
            per_chunk = 2 * CHUNK_WORDS
            jobs = [
                (keep[start : start + per_chunk], _chunk_seed(seed, start // per_chunk), threshold)
                for start in range(0, n, per_chunk)
            ]
            if len(jobs) == 1:
                _fill_chunk(jobs[0])
            else:
                list(_thread_pool().map(_fill_chunk, jobs))
            return keep.view(rows, cols)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_chunk_seed(seed, 0))
    words.random_(-(2**63), None, generator=gen)
    return words.view(torch.int32)[:n].view(rows, cols) >= threshold


@_keep_mask_op.register_fake
def _(seed, rows, cols, p, device):
    return torch.empty((rows, cols), dtype=torch.bool, device=device)


# dropped() reads this many columns of the mask a call: its adapters have this rank, so the
# kernels run a small-rank config whatever K is (rank K adapters would not fit a GPU's registers).
READ_COLUMNS = 64


def dropped(x: torch.Tensor, p: float, seed: int, backend: str) -> torch.Tensor:
    """``dropout(x)`` as ``lora_linear``'s LoRA branch sees it on ``backend``, read through
    ``lora_linear`` itself: how tests and the GPU check learn the mask a call drew, without a
    second implementation of it. With a zero base weight and ``A`` the identity's columns
    ``j .. j + 64``, ``B`` the identity, the output is those columns of ``dropout(x)``: the mask
    depends on the element's position only, not on the adapters."""
    from .function import lora_linear

    k = x.shape[-1]
    columns = []
    for j in range(0, k, READ_COLUMNS):
        width = min(READ_COLUMNS, k - j)
        eye = torch.eye(width, dtype=x.dtype, device=x.device)
        lora_A = torch.zeros(k, width, dtype=x.dtype, device=x.device)
        lora_A[j : j + width] = eye
        zeros = torch.zeros(width, k, dtype=x.dtype, device=x.device)
        columns.append(
            lora_linear(x, zeros, None, lora_A, eye, 1.0, dropout_p=p, seed=seed, backend=backend)
        )
    return torch.cat(columns, dim=-1)


def drawn_mask(m: int, k: int, p: float, seed: int, backend: str, device) -> torch.Tensor:
    """The boolean ``(m, k)`` keep-mask a call with ``seed`` draws on ``backend`` (it depends on
    the element's position only, so any call of ``m`` rows and ``k`` columns draws this one)."""
    return dropped(torch.ones(m, k, device=device), p, seed, backend) != 0
