"""Extract's bytes do not depend on the process's torch thread count (tasks/curate/proxy.py: fixed_threads).

How MKL and ATen split a product over threads moves float rounding on some CPUs (AVX2 code paths)
and not on others, so the check forces the AVX2 paths (MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY)
where this x86 build has them: without the fixed count, 1 and 2 threads give other shards there.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tasks.curate.extract import Params, extract
from tests.tasks import tiny_pipeline
from tests.tasks.curate.test_extract_scale import gsm_rows, output_bytes

REPO = Path(__file__).resolve().parents[2]
RUN = """
import sys, torch
from pathlib import Path
from tasks.curate.extract import main
torch.set_num_threads(int(sys.argv[1]))
main(sys.argv[2:])
"""


def test_shards_are_the_same_bytes_whatever_the_thread_count(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(12))
    params = dataclasses.replace(Params(), device="cpu", shard_size=4, cache_dir=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"extract": dataclasses.asdict(params)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "PYTHONPATH": str(REPO)}
    for threads in (1, 2):
        subprocess.run([sys.executable, "-c", RUN, str(threads), "--params", str(tmp_path / "params.yaml"),
                        "--segments", str(segments), "--model", str(tiny_model_dir),
                        "--out-dir", str(tmp_path / f"threads{threads}")], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert output_bytes(tmp_path / "threads1") == output_bytes(tmp_path / "threads2")



def test_the_callers_thread_count_is_left_as_it_was(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(2))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extract(segments, tiny_model_dir, tmp_path / "out", Params(device="cpu", cache_dir=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
