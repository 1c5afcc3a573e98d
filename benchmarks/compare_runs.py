"""Are two demo/pipeline work folders the same result? (issue #14: "same command, same numbers")

Compares, between work folders A and B: every value of `evaluation/metrics.json` (except times,
paths and the hashes of files that record their own paths), `evaluation/headline.md` byte for
byte, every generated PNG byte for byte, and every tensor of `run/ema.safetensors`.

    PYTHONPATH=. python benchmarks/compare_runs.py mdgen_runs/demo mdgen_runs/demo2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SKIP = ("seconds", "path", "dir", "output_dir", "data_dir", "split", "generated_dir", "classifier", "users_json",
        "torch_threads", "checkpoint_sha256", "manifest_sha256")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def main(argv=None) -> int:
    a, b = (Path(p) for p in (argv or sys.argv[1:]))
    ma, mb = (flat(json.loads((w / "evaluation" / "metrics.json").read_text())) for w in (a, b))
    keys = sorted(set(ma) | set(mb))
    compared = [k for k in keys if not k.endswith(SKIP)]
    differ = [k for k in compared if ma.get(k) != mb.get(k)]
    print(f"metrics.json: {len(compared)} of {len(keys)} values compared, {len(differ)} differ {differ[:10]}")
    same_headline = (a / "evaluation/headline.md").read_bytes() == (b / "evaluation/headline.md").read_bytes()
    print(f"headline.md identical: {same_headline}")
    pngs = sorted(p.name for p in (a / "generated").glob("*.png"))
    png_diff = [n for n in pngs if (a / "generated" / n).read_bytes() != (b / "generated" / n).read_bytes()]
    print(f"generated PNGs: {len(pngs)}, {len(png_diff)} differ")
    ea, eb = (load_file(str(w / "run" / "ema.safetensors")) for w in (a, b))
    ema_diff = [k for k in ea if k not in eb or not torch.equal(ea[k], eb[k])]
    print(f"EMA tensors: {len(ea)}, {len(ema_diff)} differ")
    return 0 if not differ and same_headline and not png_diff and not ema_diff else 1


if __name__ == "__main__":
    raise SystemExit(main())
