"""What the tuner measures for a key: the tables' plan and one change of it at a time.

Each alternative changes one launch's config (``triton_path.LAUNCHES``) by one step: a tile
dimension halved, one pipeline stage fewer, or Hopper's TMA descriptors off. ``inspect
--candidates`` builds every candidate for every GPU and checks that it has no spills and uses
tensor cores; ``tune.measure`` times them greedily, each on top of the best plan so far.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

TORCH = "torch"  # the torch path: cuBLAS addmm + addmm_ (a provider, not a plan)
TRITON = "triton"
# What a key over a 4-bit weight measures (on the tables' configs): its W decoded in the fused
# kernels' K loop, dequantized into a buffer for each use, and the torch path.
FOUR_BIT_CANDIDATES = ("in_loop", "buffer", TORCH)
# One pipeline stage would leave nothing to overlap.
MIN_STAGES = 2


class Alternative(NamedTuple):
    """One launch's table config with one field changed: ``"/2"`` halves it, ``"-1"`` lowers
    it by one, never below ``floor``; ``"off"`` turns a ``TMA`` flag the tables set off (the
    pointer kernel on the same tile). ``inspect --candidates`` checks that each build has no
    spills and uses tensor cores."""

    launch: str  # the Plan field: fwd, t_only, dx, grad_dA, grad_dB
    key: str
    how: str
    why: str
    floor: int = 16  # tl.dot needs 16 in every dimension (stages: see MIN_STAGES)


ALTERNATIVES = (
    # Hopper: each launch on the pointer kernel instead of TMA descriptors (nothing has measured
    # ours yet; Triton's own GEMMs gained 13-20% from them: triton-lang/triton#5461, #5726)
    Alternative("fwd", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("t_only", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("dx", "TMA", "off", "the pointer kernel: cp.async loads, one program a tile"),
    Alternative("grad_dA", "TMA", "off", "the pointer kernel: cp.async loads"),
    Alternative("grad_dB", "TMA", "off", "the pointer kernel: cp.async loads"),
    # the fused forward (y and T) and the dx pass: the same kernel, tiled over (M, N)
    Alternative("fwd", "BLOCK_N", "/2", "twice the tiles: fills the SMs when M x N is small"),
    Alternative("fwd", "BLOCK_M", "/2", "twice the tiles along M: small token counts"),
    Alternative("fwd", "num_stages", "-1", "less shared memory: two programs an SM may fit"),
    Alternative("dx", "BLOCK_N", "/2", "dx's N is the layer's K: narrow inputs (K = 1024)"),
    Alternative("dx", "BLOCK_M", "/2", "twice the tiles along M: small token counts"),
    Alternative("dx", "num_stages", "-1", "less shared memory: two programs an SM may fit"),
    # dropout's T-only pass (one column of tiles: BLOCK_M alone sets the grid)
    Alternative("t_only", "BLOCK_M", "/2", "twice the programs: one wave needs M / 32 >= SMs"),
    Alternative("t_only", "num_stages", "-1", "less shared memory: more programs resident"),
    # the dA / dB reductions over M (BLOCK_D: output tile width, BLOCK_M: reduction step)
    Alternative("grad_dA", "BLOCK_D", "/2", "more programs when K is narrow"),
    # (16-row steps spilled 6 instructions on sm_80 at rank 64: inspect --candidates)
    Alternative("grad_dA", "BLOCK_M", "/2", "a shorter step: more programs resident", floor=32),
    Alternative("grad_dB", "BLOCK_D", "/2", "more programs when N is narrow"),
    Alternative("grad_dB", "BLOCK_M", "/2", "a shorter step: more programs resident", floor=32),
)


def altered(config: dict, alternative: Alternative) -> dict | None:
    """``config`` with ``alternative`` applied, or ``None`` where the result is no candidate."""
    if alternative.how == "off":
        return {**config, "TMA": False} if config.get("TMA") else None
    value = config[alternative.key]
    new = value // 2 if alternative.how == "/2" else value - 1
    floor = MIN_STAGES if alternative.key == "num_stages" else alternative.floor
    if new < floor:
        return None
    return {**config, alternative.key: new}


def candidates(plan, dropout: bool) -> list[tuple[str, object]]:
    """``(name, plan)`` for the table plan and each valid alternative of it (``t_only``'s only
    with dropout: the tuned call computes dx, so without dropout no T-only launch runs). A
    name is ``"tables"`` or ``"<launch> <key><how>"``: its first word is the Plan field."""
    out = [("tables", plan)]
    for alt in ALTERNATIVES:
        if alt.launch == "t_only" and not dropout:
            continue
        config = altered(getattr(plan, alt.launch), alt)
        if config is not None:
            name = f"{alt.launch} {alt.key}{alt.how}"
            out.append((name, dataclasses.replace(plan, **{alt.launch: config})))
    return out
