"""Fan the model stages' work units out over worker processes: every core (or GPU) by default.

One forward pass runs on one torch thread (tasks/curate/proxy.py: a fixed thread count gives the
same bytes on every machine), so a stage running in process uses one core of any machine. Here its
units of work (extract's shards, unconditional's chunks) go to single-threaded worker processes
instead, each with the model loaded once, and come back in order: the files are the bytes an
in-process run writes (each unit computes exactly what it computes in process).

`workers` (the extract params section, shared by every model stage):
  auto   as many workers as this machine can run side by side: its cores (one per GPU where
         extract runs on GPUs), no more than fit in the memory available now (each worker holds a
         copy of the model) and no more than there are units, or traces / TRACES_PER_WORKER (a
         worker process takes seconds to start and load the model: a small pool runs in process);
  0, 1   in process;
  N      N local workers (round-robin over the GPUs where there are several);
  gpus   one worker per visible GPU.
`scheduler_address` sends the units to an existing Dask cluster instead (the way past one machine):
its workers need this project importable and the stage's paths readable under the same absolute
names. Locally started schedulers and their dashboards listen on 127.0.0.1 only (issue 22).

Progress: workers report counts through a Dask queue; the stage's own progress line (tasks/core/
progress.py) shows them as they happen, not a unit at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.core.stage import ParamsError, module_logger

log = module_logger(__name__)
TRACES_PER_WORKER = 64  # below this many traces per worker, starting one costs more than it saves
WORKER_BASE_BYTES = 750 * 2**20  # a worker process with torch and transformers imported, before the model
MODEL_COPIES = 3  # weights + activations and autograd buffers of a batch: ~3x the weight files, measured on SmolLM2
MEMORY_SHARE = 0.8  # of the memory available when the stage starts
POLL_SECONDS = 1.0


def visible_gpus(device: str) -> list[str]:
    """The GPUs a stage may spread over, as CUDA_VISIBLE_DEVICES names them; none unless device is auto or cuda."""
    import torch

    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return []  # cpu, or a device the user pinned (cuda:N): every worker uses that one
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    return [name.strip() for name in listed.split(",")][:count] if listed else [str(i) for i in range(count)]


def usable_cores() -> int:
    """Cores this process may use: its affinity mask and a container's CPU quota (dask.system reads both)."""
    from dask.system import CPU_COUNT

    return CPU_COUNT


def worker_bytes(model: Path) -> int:
    """What one worker holds: the process, and the model's weights with a batch's buffers."""
    weights = sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt")
                  for path in Path(model).glob(pattern))
    return WORKER_BASE_BYTES + MODEL_COPIES * weights


def available_bytes() -> int:
    """Memory available now (free + reclaimable), as psutil reads it; psutil comes with Dask's distributed."""
    import psutil

    return psutil.virtual_memory().available


def count_workers(workers: int | str, gpus: list[str], n_units: int, n_traces: int, model: Path) -> int:
    """How many worker processes `workers` asks for here (1 = in process)."""
    if workers == "gpus":
        if not gpus:
            raise ParamsError("extract.workers: gpus, but no GPU is visible to extract.device; set auto or a number")
        return len(gpus)
    if workers != "auto":
        return max(int(workers), 1)
    wanted = min(len(gpus) or usable_cores(), n_units, math.ceil(n_traces / TRACES_PER_WORKER))
    if wanted <= 1:
        return 1
    by_memory = int(available_bytes() * MEMORY_SHARE // worker_bytes(model))
    if by_memory < wanted:
        log.info("extract.workers auto: %d workers, not %d: each needs ~%.1f GB and %.1f GB is available",
                 max(by_memory, 1), wanted, worker_bytes(model) / 2**30, available_bytes() / 2**30)
    return max(min(wanted, by_memory), 1)


LOOPBACK = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}  # a free port, on this machine only


def cluster_spec(n_workers: int, gpus: list[str]) -> dict:
    """distributed.SpecCluster arguments: a loopback scheduler and n single-threaded worker processes,
    worker i on gpus[i % len(gpus)] when there are several GPUs (all on the one GPU, or the CPU, otherwise)."""
    spread = len(gpus) > 1

    def worker(i: int) -> dict:
        # memory_limit 0: count_workers has sized the pool; Dask's own limit (RAM / cores per worker) would
        # pause or kill a worker holding a model bigger than that share, where one process would have worked
        options = {"nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.WARNING, "memory_limit": 0}
        if spread:  # the Nanny sets env before the worker process starts, so before CUDA does
            options["env"] = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
        return {"cls": "distributed.Nanny", "options": options}

    return {"scheduler": {"cls": "distributed.Scheduler", "options": dict(LOOPBACK)},
            "workers": {f"worker-{i}": worker(i) for i in range(n_workers)},
            "silence_logs": logging.WARNING}


# Dask's Nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the OS). Setting
# it also pins glibc's mmap threshold at 128 KiB, so every activation tensor of a forward pass is mmapped,
# page-faulted in and unmapped again: extract ran 18% slower with it (85 s -> 100 s model time on 128 traces,
# one process, the default model). Our workers hold one model and a batch, not a growing heap: leave it unset.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@contextlib.contextmanager
def local_cluster(n_workers: int, gpus: list[str]) -> Iterator[Any]:
    """A SpecCluster of cluster_spec's workers on this machine, started under WORKER_CONFIG.

    A Nanny writes its workers' pre-spawn variables (OMP_NUM_THREADS=1, ...) into this process's own
    environment before spawning; the environment is put back as it was when the cluster closes, so later
    subprocesses of a long-lived flow, and later clusters, do not inherit them."""
    import dask
    from distributed import SpecCluster

    environment = dict(os.environ)
    try:
        with dask.config.set(WORKER_CONFIG), SpecCluster(**cluster_spec(n_workers, gpus)) as cluster:
            yield cluster
    finally:
        os.environ.clear()
        os.environ.update(environment)


@contextlib.contextmanager
def worker_pool(stage: str, workers: int | str, scheduler_address: str | None, device: str, n_units: int,
                n_traces: int, model: Path) -> Iterator[Any]:
    """A Dask client to fan `stage`'s units out over, or None where they run in process."""
    from tasks.curate.proxy import resolve_device

    if scheduler_address:
        from distributed import Client

        log.info("%s: %d units on the Dask scheduler at %s", stage, n_units, scheduler_address)
        with Client(scheduler_address) as client:
            yield client
        return
    gpus = visible_gpus(device) if resolve_device(device).startswith("cuda") else []
    n_workers = count_workers(workers, gpus, n_units, n_traces, model)
    if n_workers <= 1:
        yield None
        return
    from distributed import Client

    with local_cluster(n_workers, gpus) as cluster, Client(cluster) as client:
        log.info("%s: %d units on %d worker processes%s (dashboard %s)", stage, n_units, n_workers,
                 f" over GPUs {','.join(gpus)}" if len(gpus) > 1 else "", cluster.dashboard_link)
        yield client


class QueueProgress:
    """tqdm's update(n), sent from a worker to the stage's process through a Dask queue."""

    def __init__(self, queue_name: str) -> None:
        from distributed import Queue

        self.queue = Queue(queue_name)

    def update(self, n: int = 1) -> None:
        if n:
            self.queue.put(n)


# One unit at a time per worker process: a remote `dask worker` runs one task per thread (its default is one per
# core), but a forward pass sets the process's torch thread count for its duration (proxy.fixed_threads), so
# units in threads of one process would change each other's numbers, and each load its own model copy.
UNIT_LOCK = threading.Lock()


def _run_unit(function: Callable, unit: Any, queue_name: str, args: tuple, kwargs: dict) -> Any:
    with UNIT_LOCK:
        return function(unit, *args, progress=QueueProgress(queue_name), **kwargs)


def map_units(client: Any, function: Callable, units: Sequence, progress: Any, *args: Any, **kwargs: Any) -> list:
    """function(unit, *args, progress=..., **kwargs) for every unit on the client's workers, results in
    units order; the workers' progress counts go to `progress` while they run. A unit whose worker was
    lost (pre-empted, OOM-killed) is run again by Dask itself (distributed.scheduler.allowed-failures): a
    unit writes its files atomically, so that is safe. A unit's own error is not retried: it is raised here."""
    from distributed import Queue

    queue_name = f"grace-progress-{uuid.uuid4().hex}"
    queue = Queue(queue_name, client=client)

    def drain() -> None:
        while queue.qsize():
            progress.update(sum(queue.get(batch=True)))

    futures = [client.submit(_run_unit, function, unit, queue_name, args, kwargs, pure=False) for unit in units]
    try:
        while not all(future.done() for future in futures):
            time.sleep(POLL_SECONDS)
            drain()
            for future in futures:
                if future.status == "error":
                    future.result()  # raises the unit's own exception, as in process
        results = [future.result() for future in futures]
        drain()
        return results
    finally:  # on an error or Ctrl-C: what has not started never will (a local cluster's close stops the rest)
        with contextlib.suppress(Exception):
            client.cancel(futures)
        with contextlib.suppress(Exception):
            queue.close()
