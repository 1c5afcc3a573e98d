"""Named run profiles: every stage's parameters for one kind of machine, in one place.

A profile is what the notebooks, the `pipeline` command and the `demo` command share, so the
same run means the same settings everywhere. The notebooks read the profile name (and any
override) from environment variables, which is how CI and the demo drive them headless:

    MDGEN_PROFILE=cpu-smoke MDGEN_WORK_DIR=/tmp/w jupyter nbconvert --execute notebooks/01_*.ipynb

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
import json
import os
from dataclasses import dataclass, field
from typing import Any

from mdgen_helpers.errors import MdgenError


@dataclass
class Profile:
    name: str
    # data: simulated when no data_dir is given
    sim_users: int = 10
    sim_per_user: int = 60
    sim_seed: int = 0
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # tokenizer: "standin" (fit the weight-free stand-in), "vavae" (a checkpoint path must be given),
    # "random-vavae" (a tiny random VA-VAE in the official layout: exercises the loader, for CI)
    tokenizer: str = "standin"
    extract_batch_size: int = 32
    num_workers: int = 2
    # training
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # LightningDiT arguments on top of the preset
    batch_size: int = 32
    max_steps: int = 1000
    max_epochs: int | None = None
    lr: float = 3e-4
    warmup_steps: int = 50
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    precision: str = "auto"
    devices: int = 1
    log_every: int = 25
    val_every: int = 250
    ckpt_every: int = 500
    preview_every: int = 0
    time_budget_h: float | None = None
    # generation
    num_samples_per_user: int = 8
    guidance_scale: float = 4.0
    num_steps: int = 25
    solver: str = "heun"
    timestep_shift: float = 0.0
    guidance_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 7.0)
    gen_batch_size: int = 64
    # evaluation
    eval_image_size: int = 64
    eval_epochs: int = 15
    eval_seeds: tuple[int, ...] = (0, 1)
    synthetic_per_user: tuple[int, ...] = (0, 10, 20)
    few_shot: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    "cpu-smoke": Profile(
        name="cpu-smoke", tokenizer="random-vavae", sim_users=4, sim_per_user=12, preset="tiny",
        model_overrides={"patch_size": 4}, batch_size=16, max_steps=30,
        warmup_steps=5, log_every=5, val_every=15, ckpt_every=15, num_samples_per_user=2, num_steps=4,
        solver="euler", guidance_sweep=(1.0, 4.0), gen_batch_size=16, eval_image_size=32, eval_epochs=2,
        eval_seeds=(0,), synthetic_per_user=(0, 2), num_workers=0,
    ),
    # Tuned on 2 CPU cores (numbers in benchmarks/README.md): 16 tokens (patch 4) let the tiny model
    # learn who is who in 1200 steps (~3 min); patch 2 reached half the recognisability in 600.
    "cpu-demo": Profile(
        name="cpu-demo", model_overrides={"patch_size": 4}, max_steps=1200, lr=1e-3, warmup_steps=50,
        val_every=300, ckpt_every=600, num_samples_per_user=10, num_steps=16, solver="euler",
        eval_seeds=(0,), synthetic_per_user=(0, 10),
    ),
    "kaggle-t4x2": Profile(
        name="kaggle-t4x2", sim_users=31, sim_per_user=150, tokenizer="vavae", preset="S/2",
        batch_size=128, max_steps=40000, lr=1e-4, warmup_steps=1000, ema_decay=0.9995, devices=2,
        precision="auto", log_every=100, val_every=2000, ckpt_every=2000, preview_every=2000,
        time_budget_h=11.5, num_samples_per_user=50, num_steps=50, solver="heun",
        gen_batch_size=128, eval_image_size=128, eval_epochs=30, eval_seeds=(0, 1, 2),
        synthetic_per_user=(0, 25, 50, 100), few_shot=(5, 10, 20), extract_batch_size=64, num_workers=4,
    ),
}


def get_profile(name: str | None = None, **overrides: Any) -> Profile:
    """The named profile (default: $MDGEN_PROFILE or cpu-demo) with `overrides` applied.

    Environment variables `MDGEN_<FIELD>` (e.g. MDGEN_MAX_STEPS=200) override fields too, so a
    headless notebook run can be tuned without editing the notebook.
    """
    name = name or os.environ.get("MDGEN_PROFILE") or "cpu-demo"
    if name not in PROFILES:
        raise MdgenError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = dataclasses.replace(PROFILES[name])
    types = {f.name: f.type for f in dataclasses.fields(Profile)}
    for f in dataclasses.fields(Profile):
        env = os.environ.get(f"MDGEN_{f.name.upper()}")
        if env is not None and f.name not in ("name", "extra"):
            overrides.setdefault(f.name, _parse(env, getattr(profile, f.name)))
    for key, value in overrides.items():
        if key not in types:
                raise MdgenError(f"unknown profile field {key!r}")
        setattr(profile, key, value)
    return profile


def _parse(text: str, like: Any) -> Any:
    """Parse an environment string to the type of the field's current value."""
    if isinstance(like, dict):
        return json.loads(text)
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, tuple):
        parts = [p for p in text.replace(",", " ").split() if p]
        kind = type(like[0]) if like else float
        return tuple(kind(p) for p in parts)
    if like is None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return None if text.lower() in ("", "none") else text
    return text
