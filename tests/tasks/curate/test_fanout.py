"""The model stages' fan-out over worker processes (tasks/curate/fanout.py): how many, where, same bytes.

Everything runs on this machine's CPU: GPUs are the names CUDA_VISIBLE_DEVICES gives them, and what
is checked is what each worker process really runs with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from distributed import Client

from tasks.core.stage import ParamsError
from tasks.curate import fanout
from tasks.curate.extract import Params, extract
from tasks.curate.fanout import cluster_spec, count_workers, local_cluster, map_units, visible_gpus
from tasks.curate.unconditional import unconditional
from tests.tasks.curate.test_extract import make_rows, output_bytes, write_segments

REPO = Path(__file__).resolve().parents[3]
GB = 2**30


@pytest.fixture
def segments(tmp_path, gsm_rows) -> Path:
    return write_segments(tmp_path / "segments.parquet", make_rows(gsm_rows))  # 8 traces, 2 refused


def settings(**overrides) -> Params:
    return dataclasses.replace(Params(), device="cpu", shard_size=3, max_length=120, cache_dir=None, **overrides)


def run_extract_cli(tmp_path: Path, segments: Path, model: Path, out_dir: Path, cwd: Path = REPO,
                    **overrides) -> subprocess.CompletedProcess:
    """`python -m tasks.curate.extract` as dvc.yaml runs it, from `cwd` (paths may be relative to it), with the
    extract section `overrides` changes."""
    params_file = tmp_path / f"params-{out_dir.name}.yaml"
    params_file.write_text(yaml.safe_dump({"extract": {**dataclasses.asdict(settings()), **overrides}}))
    return subprocess.run(
        [sys.executable, "-m", "tasks.curate.extract", "--params", str(params_file), "--segments", str(segments),
         "--model", str(model), "--out-dir", str(out_dir)], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "GRACE_PROGRESS": "log", "GRACE_PROGRESS_SECONDS": "0",
             "HF_HUB_OFFLINE": "1"})


def test_workers_auto_is_the_default():
    assert Params().workers == "auto"


def test_auto_takes_every_core_as_memory_and_work_allow(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(fanout, "usable_cores", lambda: 4)
    monkeypatch.setattr(fanout, "available_bytes", lambda: 64 * GB)
    assert count_workers("auto", [], n_units=10, n_traces=10_000, model=tiny_model_dir) == 4
    assert count_workers("auto", ["0", "1", "2"], 10, 10_000, tiny_model_dir) == 3  # one per GPU, not per core
    assert count_workers("auto", [], 2, 10_000, tiny_model_dir) == 2  # no more workers than units
    assert count_workers("auto", [], 10, 100, tiny_model_dir) == 2  # 100 traces: two workers' worth (64 each)
    assert count_workers("auto", [], 10, 40, tiny_model_dir) == 1  # a small pool runs in process
    per_worker = fanout.worker_bytes(tiny_model_dir)
    monkeypatch.setattr(fanout, "available_bytes", lambda: int(2.5 * per_worker / fanout.MEMORY_SHARE))
    assert count_workers("auto", [], 10, 10_000, tiny_model_dir) == 2  # what fits in memory
    monkeypatch.setattr(fanout, "available_bytes", lambda: 0)
    assert count_workers("auto", [], 10, 10_000, tiny_model_dir) == 1  # never none
    assert [count_workers(n, [], 10, 10_000, tiny_model_dir) for n in (0, 1, 3)] == [1, 1, 3]


def test_worker_memory_counts_the_model_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert fanout.worker_bytes(tmp_path) == fanout.WORKER_BASE_BYTES + fanout.MODEL_COPIES * 1000


def test_workers_gpus_without_a_gpu_names_the_setting():
    with pytest.raises(ParamsError, match="extract.workers: gpus"):
        count_workers("gpus", [], 10, 10_000, Path("."))
    assert count_workers("gpus", ["0", "1"], 10, 10_000, Path(".")) == 2
    # cpu, or a GPU the user pinned: no spreading; this test machine has no GPU, so auto finds none either
    assert visible_gpus("cpu") == visible_gpus("cuda:1") == []
    if not torch.cuda.is_available():
        assert visible_gpus("auto") == []


def test_params_refuse_other_worker_values():
    from tasks.core.stage import params_from_dict

    for good in ("auto", "gpus", 0, 3):
        assert params_from_dict(Params, "extract", {"workers": good}).workers == good
    for bad in ("all", -1, 1.5):
        with pytest.raises(ParamsError, match="extract.workers"):
            params_from_dict(Params, "extract", {"workers": bad})


def worker_gpus(spec: dict) -> list[str | None]:
    return [worker["options"].get("env", {}).get("CUDA_VISIBLE_DEVICES") for worker in spec["workers"].values()]


def test_workers_go_round_robin_over_several_gpus_and_single_threaded():
    assert worker_gpus(cluster_spec(5, ["2", "5"])) == ["2", "5", "2", "5", "2"]
    assert worker_gpus(cluster_spec(3, ["0"])) == [None] * 3  # one GPU (or the CPU): every worker sees it
    assert all(worker["options"]["nthreads"] == 1 for worker in cluster_spec(4, [])["workers"].values())


def listening(cluster) -> set[str]:
    """The interfaces a cluster's scheduler and its dashboard listen on."""
    scheduler = cluster.scheduler
    hosts = {sock.getsockname()[0] for sock in scheduler.http_server._sockets.values()}
    return hosts | {scheduler.address.split("://")[1].rsplit(":", 1)[0]}


def test_each_worker_process_runs_with_its_own_gpu_and_listens_on_loopback_only():
    """Dask's default dashboard (":8787") binds 0.0.0.0; our clusters bind 127.0.0.1 (issue 22). Workers start
    without Dask's MALLOC_TRIM_THRESHOLD_, which made every forward pass 18% slower (fanout.WORKER_CONFIG)."""
    with local_cluster(2, ["3", "7"]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert listening(cluster) == {"127.0.0.1"}
        assert {info["host"] for info in client.scheduler_info(n_workers=-1)["workers"].values()} == {"127.0.0.1"}
    assert sorted(seen.values()) == ["3", "7"]
    assert set(trim.values()) == {None}


def counted_unit(unit: int, scale: int, progress=None) -> int:
    for _ in range(unit):
        progress.update(1)
    if unit == 13:
        raise ValueError("unit 13 is unlucky")
    return unit * scale


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


@pytest.fixture(scope="module")
def two_workers():
    with local_cluster(2, []) as cluster, Client(cluster) as client:
        yield client


def test_map_units_keeps_unit_order_and_forwards_progress(two_workers):
    progress = Counter()
    assert map_units(two_workers, counted_unit, [5, 1, 3, 2], progress, 10) == [50, 10, 30, 20]
    assert progress.n == 11  # every update the workers made, counted here


def test_a_failing_unit_raises_its_own_error(two_workers):
    with pytest.raises(ValueError, match="unit 13 is unlucky"):
        map_units(two_workers, counted_unit, [1, 13, 2], Counter(), 1)


def test_cli_on_two_workers_writes_the_bytes_of_one_process(tmp_path, segments, tiny_model_dir):
    """`dvc repro` runs the CLI: extract.workers there fans the shards out, with the same files as in process."""
    extract(segments, tiny_model_dir, tmp_path / "in_process", settings(workers=0))
    done = run_extract_cli(tmp_path, segments, tiny_model_dir, tmp_path / "two", workers=2)
    assert done.returncode == 0, done.stderr
    assert "extract: 3 units on 2 worker processes" in done.stderr
    assert "extract: 8/8 traces (100%)" in done.stderr  # progress of the workers' traces, in this process's log
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert (stats["workers"], stats["traces_computed"], stats["read"], stats["kept"]) == (2, 8, 8, 6)
    assert output_bytes(tmp_path / "in_process") == output_bytes(tmp_path / "two")


def test_cli_on_a_running_dask_scheduler_and_worker(tmp_path, segments, tiny_model_dir):
    """extract.scheduler_address under the CLI: a real `dask scheduler` and `dask worker` pair, started here. The
    worker runs two threads in another working directory; the stage is given relative paths and a relative
    cache: the worker must get them absolute (and, with two threads, runs one shard at a time: fanout.UNIT_LOCK)."""
    extract(segments, tiny_model_dir, tmp_path / "in_process", settings(workers=0))
    scheduler_file = tmp_path / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the worker imports the stage's code, as a cluster's must
    elsewhere = tmp_path / "worker_home"
    elsewhere.mkdir()
    started = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--no-dashboard", "--scheduler-file",
                                 str(scheduler_file)], cwd=elsewhere, env=env, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and started[0].poll() is None, "the dask scheduler did not start"
            time.sleep(0.5)
        started.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "2",
                                         "--no-dashboard", "--host", "127.0.0.1"], cwd=elsewhere, env=env,
                                        stderr=subprocess.DEVNULL))
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=120) as client:
            client.wait_for_workers(1, timeout=120)
        done = run_extract_cli(tmp_path, Path(segments.name), Path(os.path.relpath(tiny_model_dir, tmp_path)),
                               Path("remote"), cwd=tmp_path, scheduler_address=address, cache_dir="cache")
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"extract: 3 units on the Dask scheduler at {address}" in done.stderr
    assert json.loads((tmp_path / "remote" / "stats.json").read_text())["workers"] == 1
    assert output_bytes(tmp_path / "in_process") == output_bytes(tmp_path / "remote")
    assert list((tmp_path / "cache").glob("*.parquet")) and not (elsewhere / "cache").exists()


def test_unconditional_on_two_workers_matches_in_process(tmp_path, segments, tiny_model_dir):
    in_process = unconditional(segments, tiny_model_dir, tmp_path / "one", settings(workers=0))
    fanned = unconditional(segments, tiny_model_dir, tmp_path / "two", settings(workers=2))
    for name in ("losses.parquet", "quarantine.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (in_process["read"], in_process["kept"]) == (fanned["read"], fanned["kept"]) == (8, 6)
    assert pq.read_table(tmp_path / "two" / "losses.parquet").num_rows == 6


def test_the_default_fans_a_pool_out_over_every_core_with_the_bytes_of_one_process(tmp_path, tiny_model_dir):
    """No workers setting at all (auto): a pool of 130 traces in 3 shards of 64 goes to min(cores, 3) workers."""
    from tests.tasks import tiny_pipeline
    from tests.tasks.curate.test_extract_scale import gsm_rows

    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(130))
    extract(segments, tiny_model_dir, tmp_path / "in_process", dataclasses.replace(
        Params(), device="cpu", shard_size=64, cache_dir=None, workers=0))
    params_file = tmp_path / "params.yaml"  # the section as a user writes it, without workers
    params_file.write_text(yaml.safe_dump({"extract": {"device": "cpu", "shard_size": 64, "cache_dir": None}}))
    done = subprocess.run(
        [sys.executable, "-m", "tasks.curate.extract", "--params", str(params_file), "--segments", str(segments),
         "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "auto")], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, "GRACE_PROGRESS": "log", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    workers = min(fanout.usable_cores(), 3)
    assert json.loads((tmp_path / "auto" / "stats.json").read_text())["workers"] == workers
    if workers > 1:
        assert f"extract: 3 units on {workers} worker processes" in done.stderr
    assert output_bytes(tmp_path / "in_process") == output_bytes(tmp_path / "auto")


def test_a_long_lived_worker_loads_the_model_again_when_the_directory_holds_another(tmp_path, tiny_model_dir):
    """A remote worker outlives a run: a rebuilt outputs/model (another identity) must not be scored with the old."""
    import shutil

    from tasks.curate.extract import load_model

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    first = load_model(str(model_dir), "cpu")
    assert load_model(str(model_dir), "cpu") is first
    info = json.loads((model_dir / "model_info.json").read_text())
    (model_dir / "model_info.json").write_text(json.dumps({**info, "identity": "rebuilt"}))
    assert load_model(str(model_dir), "cpu") is not first
