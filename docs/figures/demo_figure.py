"""The README's real-vs-generated figure, from a demo work folder (what notebook 03 shows, fewer users).

    PYTHONPATH=. python docs/figures/demo_figure.py mdgen_runs/demo docs/figures/demo_real_vs_generated.png
"""

import sys
from pathlib import Path

from mdgen_helpers import data, notebook, viz

work, out = Path(sys.argv[1]), Path(sys.argv[2])
users = [1, 2, 3, 4, 5]
split = data.load_split(work / "split.json")
real = notebook.examples_by_user(work / "data", split, "train", per_user=3, user_ids=users)
fake = notebook.generated_by_user(work / "generated", per_user=3, user_ids=users)
viz.save_figure(viz.side_by_side(real, fake, title="cpu-demo: real vs generated", max_per_user=3), out)
print(f"wrote {out}")
