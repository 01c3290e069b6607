"""Projected exact gradients (extract.projected, target full, k = 32) vs exact `full` on 20 traces.

    python benchmarks/fidelity_projected_full.py [WORKDIR]    # default: the repository (outputs/ under it)

The 20 traces are the ones fidelity samples (seed 0) from the 500-trace pool the fine-tune table's
projected scorer used (tasks.finetune.scorers.pooled_segments, seed 0), so the numbers line up with the
earlier `linear` run (docs/fidelity-projected-vs-full.md). Only those 20 are extracted: exact `full`
costs one full backward pass per span. Prints fidelity.md; about 40 min on 2 CPU cores.
"""
import subprocess, sys, yaml, numpy as np, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc, time
from pathlib import Path
import argparse
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("workdir", nargs="?", default=str(Path(__file__).resolve().parents[1]),
                    help="a checkout whose params.yaml and data are used; outputs/ go under it (default: this one)")
W = Path(parser.parse_args().workdir).resolve()
O = W / "outputs"; py = sys.executable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.finetune.scorers import pooled_segments
from tasks.core.stage import write_parquet
def run(*a):
    t = time.time(); print("+", " ".join(a), flush=True)
    subprocess.run([py, "-m", *a], cwd=W, check=True); print(f"  {time.time()-t:.0f} s", flush=True)
doc = yaml.safe_load((W / "params.yaml").read_text())
doc["extract"].update(projected=True, projected_target="full", cache_dir=None)
doc["fidelity"].update(targets=["full"], n_traces=20, seed=0)
(O).mkdir(exist_ok=True); (O / "fid_params.yaml").write_text(yaml.safe_dump(doc))
P = str(O / "fid_params.yaml")
if not (O / "segment/segments.parquet").exists():
    run("tasks.curate.ingest", "--params", P, "--input", "data/gsm_noisy/pool.jsonl", "--out-dir", "outputs/ingest")
    run("tasks.curate.segment", "--params", P, "--traces", "outputs/ingest/traces.parquet", "--out-dir", "outputs/segment")
if not (O / "model/model_info.json").exists():
    run("tasks.curate.model", "--params", P, "--out-dir", "outputs/model")
pool = pooled_segments(O / "segment/segments.parquet", 500, 0, O / "pool500.parquet")
table = pq.read_table(pool).sort_by("id")
cand = np.flatnonzero(table["n_steps"].to_numpy() > 0)
rows = np.random.default_rng(0).choice(cand, size=20, replace=False)
ids = table.take(pa.array(np.sort(rows)))["id"].to_pylist()
print("20 ids:", ids, flush=True)
full = pq.read_table(O / "segment/segments.parquet")
write_parquet(O / "seg20.parquet", full.filter(pc.is_in(full["id"], value_set=pa.array(ids))))
run("tasks.curate.extract", "--params", P, "--segments", "outputs/seg20.parquet", "--model", "outputs/model", "--out-dir", "outputs/extract20")
run("tasks.diagnostics.fidelity", "--params", P, "--segments", "outputs/seg20.parquet", "--extract-dir", "outputs/extract20",
    "--model", "outputs/model", "--out-dir", "outputs/fidelity_full")
print((O / "fidelity_full/fidelity.md").read_text())
