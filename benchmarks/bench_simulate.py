"""Simulator throughput (images/s) with 1 and 2 workers, and user recognisability by a linear probe.

    python benchmarks/bench_simulate.py                 # full 31 x 150 set
    python benchmarks/bench_simulate.py --per-user 20   # a 31 x 20 subset
Timings depend on CPU contention; run on a quiet machine for figures you report.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdgen_helpers import physics  # noqa: E402
from mdgen_helpers import simulate as sim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=31)
    ap.add_argument("--per-user", type=int, default=150)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--probe-per-user", type=int, default=20, help="images per user for the probe (0: skip)")
    args = ap.parse_args()
    n = args.users * args.per_user
    for w in args.workers:
        out = Path(tempfile.mkdtemp(prefix="bench_sim_"))
        t0 = time.perf_counter()
        sim.simulate_dataset(out / "data", args.users, args.per_user, seed=0, workers=w, progress=False)
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        print(f"workers={w}: {n} images in {dt:.1f} s = {n / dt:.1f} images/s "
              f"(full 31x150 set would take {31 * 150 / (n / dt):.0f} s)")
    if args.probe_per_user:
        radar = sim.RadarConfig()
        rj = radar.to_json()
        x, y, idx = [], [], []
        for u in sim.draw_users(args.users, seed=0):
            for i in range(args.probe_per_user):
                rgb, _ = sim.simulate_image(u, radar, 0, i)
                x.append(physics.gait_features(rgb, rj))
                y.append(u.user_id - 1)
                idx.append(i)
        x, y, idx = np.array(x), np.array(y), np.array(idx)
        train = idx < int(0.7 * args.probe_per_user)
        acc = physics.user_probe_accuracy(x[train], y[train], x[~train], y[~train])
        print(f"linear probe on gait features: {args.users} users, {train.sum()} train / {(~train).sum()} test "
              f"images: accuracy {acc:.3f} (chance {1 / args.users:.3f})")


if __name__ == "__main__":
    main()
