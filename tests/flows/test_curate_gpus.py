"""One Dask worker per GPU: which GPU each local worker gets, and that its process sees only that one.

No GPU is needed: GPUs are the names CUDA_VISIBLE_DEVICES gives them, handed to dask_task_runner,
and what is checked is the CUDA_VISIBLE_DEVICES each worker process really runs with.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import Client, SpecCluster
from prefect import flow, task
from prefect_dask import DaskTaskRunner

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate.extract import Params
from flows.curate import LOOPBACK, dask_task_runner, gpu_cluster_kwargs, visible_gpus


def worker_gpus(runner: DaskTaskRunner) -> list[str]:
    return [spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for spec in runner.cluster_kwargs["workers"].values()]


def test_workers_gpus_starts_one_single_threaded_worker_per_gpu():
    runner = dask_task_runner(Params(workers="gpus"), gpus=["0", "1", "2", "3"])
    assert runner.cluster_class == "distributed.SpecCluster" and runner.address is None
    assert worker_gpus(runner) == ["0", "1", "2", "3"]
    assert all(spec["options"]["nthreads"] == 1 for spec in runner.cluster_kwargs["workers"].values())


def test_more_workers_than_gpus_go_round_robin_and_one_gpu_is_shared():
    assert worker_gpus(dask_task_runner(Params(workers=5), gpus=["2", "5"])) == ["2", "5", "2", "5", "2"]
    for workers, n_workers in [(3, 3), ("gpus", 1)]:  # a single GPU: a plain LocalCluster, all workers on it
        runner = dask_task_runner(Params(workers=workers), gpus=["0"])
        assert runner.cluster_class is None and runner.cluster_kwargs == {"n_workers": n_workers,
                                                                          "threads_per_worker": 1, **LOOPBACK}
    assert dask_task_runner(Params(workers=0), gpus=["0", "1"]) is None  # in process, whatever the GPUs


def test_workers_gpus_without_a_gpu_names_the_setting():
    with pytest.raises(ParamsError, match="extract.workers: gpus"):
        dask_task_runner(Params(workers="gpus"), gpus=[])
    # cpu, or a GPU the user pinned: no spreading; this test machine has no GPU, so auto finds none either
    assert visible_gpus("cpu") == visible_gpus("cuda:1") == []
    if not torch.cuda.is_available():
        assert visible_gpus("auto") == []


def test_params_take_gpus_and_refuse_other_values():
    assert params_from_dict(Params, "extract", {"workers": "gpus"}).workers == "gpus"
    for bad in ("all", -1, 1.5):
        with pytest.raises(ParamsError, match="extract.workers"):
            params_from_dict(Params, "extract", {"workers": bad})


def test_each_worker_process_runs_with_its_own_gpu():
    with SpecCluster(**gpu_cluster_kwargs(2, ["3", "7"])) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["3", "7"]


@task
def visible_devices(_: int) -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_prefect_maps_tasks_onto_the_gpu_workers(prefect_api):
    @flow
    def spread() -> list[str | None]:
        return visible_devices.map(range(6)).result()

    runner = dask_task_runner(Params(workers="gpus"), gpus=["0", "1"])
    seen = spread.with_options(task_runner=runner)()
    assert len(seen) == 6 and set(seen) <= {"0", "1"}
