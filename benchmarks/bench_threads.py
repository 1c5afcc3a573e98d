"""OpenMP thread count and wait policy on a quiet and on a shared CPU (issue #17).

Why: torch's OpenMP threads spin while they wait for each other; when another process holds a
core, that spinning burns the share the run needs. This runs the demo's training step (the real
`train` loop via bench_train.py: tiny, patch 4, batch 32) under each policy, first on the quiet
machine, then with one other CPU-bound process (`while True: pass`) running, interleaved, and
prints samples/s, so `env.cpu_thread_policy` can choose from measurements.

    PYTHONPATH=. python benchmarks/bench_threads.py --steps 120
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

POLICIES = {  # name: (threads, extra environment)
    "2 threads, default waits": (2, {}),
    "2 threads, PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}),
    "1 thread": (1, {}),
}


def run(threads: int, extra: dict, steps: int) -> float:
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
           **extra, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_train.py")), "--presets", "tiny",
                          "--model_overrides", '{"patch_size": 4}', "--batch_size", "32", "--steps", str(steps),
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=True).stdout
    row = [line.split() for line in out.splitlines() if line.split()[:1] == ["tiny"]][0]
    return float(row[6])  # preset precision mode compile params batch samples/s ...


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args(argv)
    print("| policy | quiet samples/s | with one busy process | slowdown |\n|---|---|---|---|")
    quiet = {name: run(t, e, args.steps) for name, (t, e) in POLICIES.items()}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = {name: run(t, e, args.steps) for name, (t, e) in POLICIES.items()}
    finally:
        busy.kill()
    for name in POLICIES:
        print(f"| {name} | {quiet[name]:.1f} | {loaded[name]:.1f} | {quiet[name] / loaded[name]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
