"""Training throughput (samples/s) and peak memory per model preset and precision, through the
real `train.train` loop (data draws, AdamW, EMA, skip check, all of it) on synthetic latents.

    python benchmarks/bench_train.py                       # CPU: tiny and S/2 in fp32
    python benchmarks/bench_train.py --presets tiny S/2 B/2 --precisions 32 bf16 --batch_size 32
    python benchmarks/bench_train.py --presets tiny --model_overrides '{"patch_size": 4}' --batch_size 32 \
        --steps 300 --compile off on        # the cpu-demo model, eager vs TrainConfig.compile

Each (preset, precision) runs in a fresh subprocess (Accelerate's state is per process, and the
peak-memory reading must not carry over). samples/s is measured over the second half of the steps,
so start-up, compilation and the first (slow) steps are excluded; "train s" is the whole
`train` call, compilation (with a cold compile cache) included. Memory: CUDA peak allocated on a GPU; on
the CPU the process's peak resident set size (everything the process holds, not just training).
On a shared machine the numbers are noisy: rerun and compare on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic_latents(out: Path, n: int, users: int = 4, seed: int = 0) -> Path:
    """A latent directory in the extraction format (random latents, fake tokenizer identity)."""
    import torch

    from mdgen_helpers import latents
    from mdgen_helpers.files import atomic_save_safetensors, sha256_json
    from mdgen_helpers.users import UserMap

    g = torch.Generator().manual_seed(seed)
    umap = UserMap.from_folders([f"ID_{k + 1}" for k in range(users)])
    shape = (32, 16, 16)
    z = torch.randn((n, *shape), generator=g)
    labels = torch.arange(n) % users
    files = [f"ID_{int(y) + 1}/{i:05d}.jpg" for i, y in enumerate(labels)]
    meta = {"format": latents.FORMAT, "tokenizer": "bench", "split_hash": "bench", "user_map": umap.to_json(),
            "files": files, "part": "train", "image_size": 256, "latent_shape": list(shape)}
    atomic_save_safetensors({"latents": z, "latents_std": torch.zeros_like(z), "labels": labels},
                            out / "train.safetensors", metadata=meta)
    smeta = {"format": latents.FORMAT, "tokenizer": "bench", "split_hash": "bench", "user_map": umap.to_json(),
             "train_files_hash": sha256_json(files)}
    latents.LatentStats.of(z).save(out / "stats.safetensors", smeta)
    return out


def run_one(preset: str, precision: str, batch_size: int, steps: int, threads: int | None, compile_: bool = False,
            overrides: dict | None = None) -> dict:
    import torch

    from mdgen_helpers.train import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ldir = write_synthetic_latents(Path(tmp) / "latents", n=max(4 * batch_size, 64))
        half = max(1, steps // 2)
        cfg = TrainConfig(latent_dir=str(ldir), output_dir=str(Path(tmp) / "run"), preset=preset,
                          batch_size=batch_size, max_epochs=None, max_steps=2 * half, precision=precision,
                          warmup_steps=0, log_every=half, val_every=0, ckpt_every=0, progress=False,
                          compile=compile_, model_overrides=dict(overrides or {}))
        res = train(cfg)
        recs = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    from mdgen_helpers.dit import build_model, count_parameters

    steady = recs[-1]
    return {"preset": preset, "precision": precision, "mixed_precision": res["precision"],
            "params_m": round(count_parameters(build_model(preset, 4, **(overrides or {}))) / 1e6, 1),
            "batch_size": batch_size, "compile": res["compile"], "train_seconds": round(res["seconds"], 1),
            "samples_per_s": round(steady["samples_per_s"], 2), "peak_memory_mb": round(steady["memory_mb"]),
            "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "steps": 2 * half}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "S/2"])
    p.add_argument("--precisions", nargs="+", default=["auto"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="total steps; the second half is timed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                   help="TrainConfig.compile settings to compare (each in its own process)")
    p.add_argument("--model_overrides", type=json.loads, default={}, help='e.g. \'{"patch_size": 4}\' (the cpu-demo model)')
    p.add_argument("--one", nargs=3, metavar=("PRESET", "PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one[0], a.one[1], a.batch_size, a.steps, a.threads,
                                                     a.one[2] == "on", a.model_overrides)), flush=True)
        return 0
    print(f"{'preset':>6} {'precision':>9} {'mode':>5} {'compile':>7} {'params':>8} {'batch':>5} {'samples/s':>10} "
          f"{'train s':>8} {'peak MB':>8}  device")
    for preset in a.presets:
        for prec in a.precisions:
            for comp in a.compile:
                cmd = [sys.executable, __file__, "--one", preset, prec, comp, "--batch_size", str(a.batch_size),
                       "--steps", str(a.steps), "--model_overrides", json.dumps(a.model_overrides)] + \
                      (["--threads", str(a.threads)] if a.threads else [])
                with tempfile.TemporaryDirectory() as cache:  # a cold compile cache: what a fresh machine pays
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                          env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{preset:>6} {prec:>9} {comp:>7}  failed: {err}")
                    continue
                r = json.loads(line[7:])
                print(f"{r['preset']:>6} {r['precision']:>9} {r['mixed_precision']:>5} {comp:>7} {r['params_m']:>7}M "
                      f"{r['batch_size']:>5} {r['samples_per_s']:>10} {r['train_seconds']:>8} {r['peak_memory_mb']:>8}  "
                      f"{r['device']} ({r['threads']} threads; {r['compile']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
