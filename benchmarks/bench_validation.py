"""Time validate_dataset + make_split on 4,650 synthetic 256x256 JPEGs (15 users x 310).

    python benchmarks/bench_validation.py [DATA_DIR]   # default /tmp/mdgen_bench_validation (made if missing)
"""
import sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from mdgen_helpers import data

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mdgen_bench_validation")
if not root.exists():
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8)
    for u in range(1, 16):
        (root / f"ID_{u}").mkdir(parents=True)
        for k in range(310):
            a = np.stack([base, np.roll(base, k, 0), np.roll(base, u, 1)], -1)
            a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"ID_{u}" / f"ID_{u}_{k:04d}.jpg", quality=95)
for workers in (1, 4, None):
    t = time.perf_counter(); rep = data.validate_dataset(root, workers=workers); dt = time.perf_counter() - t
    print(f"validate_dataset workers={workers}: {len(rep.records)} files in {dt:.2f} s")
t = time.perf_counter(); s = data.make_split(rep); print(f"make_split: {time.perf_counter() - t:.3f} s")
t = time.perf_counter(); [data.load_image(root / f) for f in s.files("val")[:300]]
print(f"load_image: {(time.perf_counter() - t) / 300 * 1e3:.2f} ms/image")
