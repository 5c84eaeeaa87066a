"""Helpers shared by the test modules: thread pinning, 2-process Gloo runs and the `spec-torch` command in a
subprocess."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: the repository root, and the environment a subprocess runs the checkout's spec_torch in, offline
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m spec_torch ARGS`` in a subprocess (the checkout's code, offline), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "spec_torch", *args],
        cwd=cwd or ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (tiny tensors thrash with 2 threads on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(fn, *args, world: int, timeout_s: float) -> None:
    """Run ``fn(rank, port, *args)`` in ``world`` processes; a worker's exception is raised here (the others
    are stopped); fail, killing them, if they have not finished after ``timeout_s`` (a collective mismatch)."""
    ctx = mp.spawn(fn, args=(free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} Gloo workers did not finish in {timeout_s} s (a collective mismatch?)")


@contextmanager
def gloo_group(rank: int, port: int, world: int, timeout_s: float | None = None) -> Iterator[None]:
    """A Gloo process group for one ``spawn_gloo`` worker (one intra-op thread), destroyed on the way out,
    error or not. Without the destroy, Gloo's worker threads outlive the interpreter's teardown and the
    process can die with SIGABRT ("terminate called without an active exception"; pytorch/pytorch#190489),
    which made a passing run fail once in CI."""
    torch.set_num_threads(1)
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kwargs
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
