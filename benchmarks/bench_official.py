"""Side by side on the CPU: one training step of the official LightningDiT code vs ours.

    python benchmarks/bench_official.py --presets tiny S/2 --threads 1 --warmup 2 --iters 4

Both sides train the same model config (our preset: tiny d6/h256/heads4/p2 or S/2), batch 64,
fp32, 31 labels + the null row, with the official loss (linear path, velocity prediction,
logit-normal t, + the cosine direction term, weight 1) and AdamW (lr 2e-4, betas (0.9, 0.95),
no weight decay, as the official config). Step = loss forward + backward + optimizer step.
Variants (`--variants`):

  official      hustvl/LightningDiT as shipped: `models.lightningdit.LightningDiT` (whose blocks,
                embedders and final layer carry `@torch.compile` decorators) and
                `transport.create_transport(...).training_losses`, default (foreach) AdamW
  ours-eager    our training loop's step (`mdgen_helpers.train.step_loss`, clipping, AdamW)
  ours          the same with `TrainConfig.compile` (`train.compiled_step_loss`)
  ours-fused-adamw, ours-max-autotune   candidates that lost (benchmarks/README.md): `ours` with
                AdamW(fused=True), and with inductor's max-autotune mode

The variants are timed interleaved (official, ours, official, ours, ...) after a warm-up that
includes every compilation, so a load change hits all of them alike: the ratio holds on a busy
machine even when the absolute samples/s do not. Compile seconds are reported separately.

Getting the official code (never copied into this repository or the package):

    git clone https://github.com/hustvl/LightningDiT ~/.cache/mdgen-bench/LightningDiT
    git -C ~/.cache/mdgen-bench/LightningDiT checkout 2725fed42a14898744433809949834e26957bcdd
    pip install --no-deps --target ~/.cache/mdgen-bench/site timm==1.0.12 torchdiffeq==0.2.5 einops==0.8.2
    pip install --no-deps --no-build-isolation --target ~/.cache/mdgen-bench/site fairscale==0.4.13

(its `models/lightningdit.py` imports timm's PatchEmbed and Mlp, `models/pos_embed.py` einops,
`models/rmsnorm.py` fairscale (imported, unused by the model) and the `transport` package
torchdiffeq; scipy, numpy and torchvision are this project's dependencies already. `--site` is
the install target, put on sys.path for this process only: the project's environment never
gains these packages, and nothing is stubbed.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdgen_helpers import dit  # noqa: E402
from mdgen_helpers.settings import TrainConfig  # noqa: E402

CACHE = Path.home() / ".cache" / "mdgen-bench"
OFFICIAL_COMMIT = "2725fed42a14898744433809949834e26957bcdd"
NUM_CLASSES = 31
LR, BETAS = 2e-4, (0.9, 0.95)


def import_official(official_dir: Path, site: Path):
    """(LightningDiT class, create_transport) from a checkout of hustvl/LightningDiT."""
    if not (official_dir / "models" / "lightningdit.py").is_file():
        raise SystemExit(f"no official checkout at {official_dir}: see this script's docstring for the git clone")
    for p in (str(site), str(official_dir)):
        if Path(p).is_dir() and p not in sys.path:
            sys.path.insert(0, p)
    from models.lightningdit import LightningDiT  # noqa: PLC0415
    from transport import create_transport  # noqa: PLC0415

    return LightningDiT, create_transport


def official_step(preset: str, batch: int, official_dir: Path, site: Path):
    LightningDiT, create_transport = import_official(official_dir, site)
    cfg = {k: v for k, v in dit.PRESETS[preset].items()}
    torch.manual_seed(0)
    model = LightningDiT(input_size=16, in_channels=32, num_classes=NUM_CLASSES, class_dropout_prob=0.1, **cfg)
    transport = create_transport("Linear", "velocity", None, None, None, use_cosine_loss=True, use_lognorm=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0, betas=BETAS)
    x = torch.randn(batch, 32, 16, 16)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def step():  # the official train.py loop body
        model.train()
        loss_dict = transport.training_losses(model, x, dict(y=y))
        loss = loss_dict["cos_loss"].mean() + loss_dict["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    return step, model


def our_step(preset: str, batch: int, compile_: bool, fused: bool = False, mode: str | None = None):
    """The body of `mdgen_helpers.train.train`'s loop without Accelerate's bookkeeping: the same loss
    function (`train.step_loss`, compiled by `train.compiled_step_loss` as with --compile), clipping
    at 1.0, AdamW, zero_grad(set_to_none)."""
    from mdgen_helpers import train  # noqa: PLC0415

    cfg = TrainConfig(preset=preset, batch_size=batch, lr=LR, betas=BETAS, weight_decay=0.0,
                      time_dist="logit_normal", cosine_weight=1.0, compile=compile_)
    torch.manual_seed(0)
    model = dit.build_model(preset, NUM_CLASSES, class_dropout_prob=cfg.label_dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            **({"fused": True} if fused else {}))
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, 32, 16, 16, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)

    def draws():  # fresh draws every step, as train.step_draws makes them
        return (x1, y, torch.randn(x1.shape, generator=g), torch.sigmoid(torch.randn(batch, generator=g)),
                (torch.rand(batch, generator=g) < cfg.label_dropout).long())

    model.train()
    loss_fn, note = train.step_loss, "eager"
    if mode is not None:  # a candidate only: another inductor mode than the one train uses
        loss_fn, note = torch.compile(train.step_loss, mode=mode), f"torch.compile mode={mode}"
    elif cfg.compile:
        loss_fn, note = train.compiled_step_loss(model, draws(), cfg.cosine_weight)

    def step():
        model.train()
        loss = loss_fn(model, *draws(), cfg.cosine_weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, model, note


def run(presets, variants, batch, warmup, iters, official_dir, site) -> list[dict]:
    rows = []
    for preset in presets:
        steps, compile_s, notes = {}, {}, {}
        for name in variants:
            t0 = time.perf_counter()
            if name == "official":
                fn, _ = official_step(preset, batch, official_dir, site)
            else:
                fn, _, info = our_step(preset, batch, name != "ours-eager", fused=name == "ours-fused-adamw",
                                       mode="max-autotune-no-cudagraphs" if name == "ours-max-autotune" else None)
                notes[name] = info
            for _ in range(warmup):  # compilation happens here
                fn()
            compile_s[name] = time.perf_counter() - t0
            steps[name] = fn
        times = {name: [] for name in variants}
        for _ in range(iters):  # interleaved: official, ours, official, ours, ...
            for name in variants:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        load = os.getloadavg()[0]
        med = {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}
        base = med.get("official")
        for name in variants:
            rows.append({"preset": preset, "variant": name, "batch": batch, "threads": torch.get_num_threads(),
                         "samples_per_s": round(batch / med[name], 2),
                         "ratio_vs_official": round(base / med[name], 3) if base else None,
                         "setup_and_warmup_s": round(compile_s[name], 1), "step_s": [round(t, 3) for t in times[name]],
                         "load_avg_1min": round(load, 2), **({"setup": notes[name]} if name in notes else {})})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | variant | samples/s | ours / official | warm-up incl. compile (s) | load avg |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['variant']} | {r['samples_per_s']} | {r['ratio_vs_official']} | "
                     f"{r['setup_and_warmup_s']} | {r['load_avg_1min']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "S/2"], choices=sorted(dit.PRESETS))
    ap.add_argument("--variants", nargs="+", default=["official", "ours"], choices=["official", "ours-eager", "ours", "ours-fused-adamw", "ours-max-autotune"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    ap.add_argument("--iters", type=int, default=4, help="timed steps per variant (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--official_dir", type=Path, default=CACHE / "LightningDiT")
    ap.add_argument("--site", type=Path, default=CACHE / "site", help="pip --target folder holding timm, torchdiffeq, einops, fairscale")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, CPU threads {torch.get_num_threads()}, official commit {OFFICIAL_COMMIT}")
    rows = run(args.presets, args.variants, args.batch, args.warmup, args.iters, args.official_dir, args.site)
    print(markdown(rows))
    if args.json:
        from mdgen_helpers.files import atomic_write_json  # noqa: PLC0415

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
