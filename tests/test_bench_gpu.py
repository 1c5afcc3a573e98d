"""The prepared GPU benchmark's code paths, run on the CPU at tiny sizes (`--smoke`), so CI
exercises what a GPU session will run: every throughput row, and the simulate -> VA-VAE extract ->
`train.train` -> guided sampling chain."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_every_stage_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert res["smoke"] and res["device"] == "cpu"
    assert {r["what"] for r in res["throughput"]} == {"train step", "forward only"}
    assert all(r["samples_per_s"] > 0 for r in res["throughput"])
    chain = res["chain"]
    assert chain["train_steps"] == 6 and chain["non_finite_losses"] == 0 and chain["all_finite"]
    assert chain["extract_images_per_s"] > 0 and chain["sample_images_per_s"] > 0
    assert "| guided sampling" in (tmp_path / "bench_gpu.md").read_text()
