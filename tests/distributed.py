"""Running a test's workers as real processes: 2 ranks over gloo on CPU, with a deadline and a
stack dump, as the DDP, FSDP and DeepSpeed tests need."""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import socket
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# Workers normally finish in seconds (DeepSpeed's first run builds its CPU communication op: about
# a minute). One fresh-clone CI run (shared 2-core machine, the whole suite 2.2x slower than
# usual) hit an old 180 s deadline with no output from either worker; the stack dump says where a
# worker is if that happens again.
WORKERS_DEADLINE_S = 420
WORKER_STACK_DUMP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, args: tuple, out_dir, what: str, env: dict | None = None) -> None:
    """Run ``worker(rank, WORLD, out_dir, *args)`` in ``WORLD`` spawned processes; fail the test
    if one fails or they are not done within ``WORKERS_DEADLINE_S``. A worker saves its results
    under ``out_dir`` and returns what must not be freed before the process ends (its models:
    see ``_entry``). ``env`` is set in each
    worker before anything else runs there (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and a
    free ``MASTER_PORT`` always are, for engines that read them)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    context = mp.start_processes(
        _entry,
        args=(worker, env, str(out_dir), args),
        nprocs=WORLD,
        start_method="spawn",
        join=False,
    )
    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > WORKERS_DEADLINE_S:
            alive = [p.pid for p in context.processes if p.is_alive()]
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} workers {alive} did not finish within {WORKERS_DEADLINE_S} s")


def _entry(rank, worker, env, out_dir, args):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    # A worker still running after WORKER_STACK_DUMP_S prints its stack to stderr (which pytest
    # shows with the failure): a slow machine and a hang then read differently.
    faulthandler.dump_traceback_later(WORKER_STACK_DUMP_S)
    kept = worker(rank, WORLD, out_dir, *args)  # noqa: F841  (freed by nothing: see below)
    faulthandler.cancel_dump_traceback_later()
    # NOTE: the results are saved; leave without running destructors. Freeing a DDP model can
    # deadlock in torch's gloo teardown: the Reducer's destructor, holding the GIL, waits for the
    # process group's work thread, which waits for the GIL to free its last work (seen once here
    # with torch 2.13: a worker asleep in ~ProcessGroupGloo after its results were written).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def gloo(rank: int, world: int, out_dir: str):
    """The default process group over gloo: a file rendezvous private to the test run (no port
    to race for), and a timeout so a lost peer fails the test instead of hanging it."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
