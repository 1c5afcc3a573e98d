"""Named run profiles: every stage's parameters for one kind of machine, in one place.

A profile is what the notebooks, the `pipeline` command and the `demo` command share, so the
same run means the same settings everywhere. The notebooks read the profile name (and any
override) from environment variables, which is how CI and the demo drive them headless:

    MDGEN_PROFILE=cpu-smoke MDGEN_WORK_DIR=/tmp/w jupyter nbconvert --execute notebooks/01_*.ipynb

A profile nests the stage configs (`train`, `sampling`, `eval`: the dataclasses of
`mdgen_helpers.settings`, not copies of their fields) next to the data and tokenizer settings.
Overrides use the field names: `MDGEN_SIM_USERS=6`, `MDGEN_SIM_STYLE=mmwave`, `MDGEN_TRAIN__MAX_STEPS=200`,
`get_profile(**{"train.max_steps": 200})`; unknown names are errors.

Profiles:
- `cpu-smoke`: the smallest run that still executes every code path (CI, a few minutes for all
  four notebooks on 2 cores). Its tokenizer is a tiny randomly initialised VA-VAE written in the
  official `.pt` layout, so CI runs the real checkpoint-loading path (notebook 01 also fits the
  stand-in to compare). Its numbers mean nothing.
- `cpu-demo`: the main job on a fresh machine: simulated users, stand-in tokenizer, tiny
  LightningDiT, the whole series on 2 CPU cores in about ten minutes, with quality that is
  measured (recognisability of generated images by a real-trained classifier).
- `kaggle-t4x2`: the real setting on Kaggle's dual T4: 31 users, VA-VAE latents, S/2 model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from mdgen_helpers.errors import MdgenError
from mdgen_helpers.settings import EvalConfig, SamplingSettings, TrainConfig, apply, env_overrides

# MDGEN_* variables that are notebook parameters, not profile fields.
NOTEBOOK_VARIABLES = ("PROFILE", "WORK_DIR", "DATA_DIR", "VAVAE_PATH", "SIMULATE", "RESUME_FROM", "INIT_FROM")


@dataclass
class Profile:
    name: str
    # data: simulated when no data_dir is given
    sim_users: int = 10
    sim_per_user: int = 60
    sim_seed: int = 0
    # simulate.SIM_STYLES: how the radar renders them (same users in every style); checked where the
    # data is simulated (this module stays importable without numpy, for the Kaggle bundle)
    sim_style: str = "default"
    split_seed: int = 0  # also draws the few-shot subsets (pipeline and evaluation alike)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # tokenizer: "standin" (fit the weight-free stand-in), "vavae" (a checkpoint path must be given),
    # "random-vavae" (a tiny random VA-VAE in the official layout: exercises the loader, for CI)
    tokenizer: str = "standin"
    extract_batch_size: int = 32
    num_workers: int = 2
    # the stages (latent_dir/output_dir/tokenizer, data/split/output paths are filled in by the pipeline)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    num_samples_per_user: int = 8
    guidance_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 7.0)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What the two CPU profiles share: the tiny model, trained for minutes. Eager (TrainConfig's default,
# compile off): on the demo's model the compiled step is ~1.35x faster, but a cold compile takes
# ~80 s of a ~3 min training (benchmarks/README.md), so it would not pay for itself.
_CPU_TRAIN = dict(preset="tiny", model_overrides={"patch_size": 4}, max_epochs=None, lr=3e-4, warmup_steps=50,
                  log_every=25, val_every=250, ckpt_every=500)
# Three seeds and 60 steps for every classifier (matched compute across arms): the arms, the
# 128 px classifier and the 256 px two-sample test fit the CPU demo's budget.
_CPU_EVAL = dict(image_size=64, epochs=15, steps=60, seeds=(0, 1, 2), synthetic_per_user=(0, 10))

PROFILES: dict[str, Profile] = {
    "cpu-smoke": Profile(
        name="cpu-smoke", tokenizer="random-vavae", sim_users=4, sim_per_user=12, num_workers=0,
        train=TrainConfig(**{**_CPU_TRAIN, "batch_size": 16, "max_steps": 30, "warmup_steps": 5, "log_every": 5,
                             "val_every": 15, "ckpt_every": 15}),
        sampling=SamplingSettings(num_steps=4, solver="euler", batch_size=16),
        num_samples_per_user=2, guidance_sweep=(1.0, 4.0),
        eval=EvalConfig(**{**_CPU_EVAL, "image_size": 32, "epochs": 2, "steps": None, "seeds": (0,),
                           "synthetic_per_user": (0, 2), "recognisability_sizes": (48,), "c2st_seeds": (0,)}),
    ),
    # Tuned on 2 CPU cores (numbers in benchmarks/README.md): 16 tokens (patch 4) let the tiny model
    # learn who is who in 1200 steps (~3 min); patch 2 reached half the recognisability in 600.
    "cpu-demo": Profile(
        name="cpu-demo",
        train=TrainConfig(**{**_CPU_TRAIN, "max_steps": 1200, "lr": 1e-3, "val_every": 300, "ckpt_every": 600}),
        sampling=SamplingSettings(),  # the measured default: heun, 12 steps (24 model evaluations)
        num_samples_per_user=10,
        eval=EvalConfig(**_CPU_EVAL),
    ),
    "kaggle-t4x2": Profile(
        name="kaggle-t4x2", sim_users=31, sim_per_user=150, tokenizer="vavae", extract_batch_size=64, num_workers=4,
        train=TrainConfig(preset="S/2", batch_size=128, max_steps=40000, max_epochs=None, lr=1e-4, warmup_steps=1000,
                          ema_decay=0.9995, devices=2, precision="auto", log_every=100, val_every=2000,
                          ckpt_every=2000, preview_every=2000, time_budget=11.5,
                          # compile stays off (the default): unmeasured on a T4 with Kaggle's torch, under
                          # two-process DDP (benchmarks/bench_gpu.py measures S/2 fp16 eager vs compiled:
                          # turn it on when that wins; a failed compile falls back to eager by itself).
                          ),
        sampling=SamplingSettings(num_steps=50, solver="heun", batch_size=128),
        num_samples_per_user=50,
        eval=EvalConfig(image_size=128, epochs=30, seeds=(0, 1, 2), synthetic_per_user=(0, 25, 50, 100),
                        few_shot=(5, 10, 20), recognisability_sizes=(64,)),
    ),
}


def get_profile(name: str | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Profile:
    """The named profile (default: $MDGEN_PROFILE or cpu-demo) with overrides applied: first the
    environment (`MDGEN_<FIELD>`, `MDGEN_<SECTION>__<FIELD>`, e.g. MDGEN_TRAIN__MAX_STEPS=200, so
    a headless notebook run can be tuned without editing it), then `overrides` (dotted names,
    e.g. `**{"train.max_steps": 200}`, or nested dicts). `environ` stands in for os.environ (the
    demo checks the settings its notebooks will see before it starts them)."""
    environ = os.environ if environ is None else environ
    name = name or environ.get("MDGEN_PROFILE") or "cpu-demo"
    if name not in PROFILES:
        raise MdgenError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    from_env = env_overrides(Profile, environ, ignore=NOTEBOOK_VARIABLES)
    for key in ("name", "extra"):
        if key in from_env:
            raise MdgenError(f"MDGEN_{key.upper()} cannot be set from the environment; use MDGEN_PROFILE")
    return apply(apply(PROFILES[name], from_env), overrides)
