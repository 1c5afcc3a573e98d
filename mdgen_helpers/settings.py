"""Settings, one source of truth: the stage configs and the flags and overrides derived from them.

Every setting is one dataclass field with one name, one type and one default (the field's):
`TrainConfig` (train), `SamplingSettings` (generate: what changes the pixels), `EvalConfig`
(evaluate). `profiles.Profile` nests them. Command-line flags (`add_arguments`, `given`) and
`MDGEN_*` environment overrides (`env_overrides`) are derived from the fields, never written by
hand, and `apply` sets values by (dotted) name:

    --lr 1e-3                     a field of the command's config (bools: --cpu / --no_progress)
    --train.lr 1e-3               a nested field (the `pipeline` command, on a Profile)
    MDGEN_SIM_USERS=6             a top-level Profile field, in the notebooks and `demo`
    MDGEN_TRAIN__MAX_STEPS=200    a nested one: section and field joined by a double underscore

Unknown names are errors. This module imports no torch: profiles load anywhere (a bare Kaggle
bundle check, `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from mdgen_helpers.errors import MdgenError

ENV_PREFIX = "MDGEN_"
ENV_SEP = "__"
SOLVERS = {"euler": "euler", "heun": "heun", "dopri5": "dopri5", "adaptive": "dopri5"}


class SettingsError(MdgenError):
    """A setting name or value that does not exist or does not parse."""


class TrainConfigError(MdgenError):
    """A training setting or input that cannot work; the message says which and what to change."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------------------------
# The stage configs
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every training setting. Defaults are the recommended settings for a few thousand images."""

    latent_dir: str = field(default="", metadata=_help("extraction output (train/val .safetensors + stats.safetensors)"))
    output_dir: str = field(default="", metadata=_help("run directory (checkpoints, ema.safetensors, metrics.jsonl)"))
    preset: str = field(default="S/2", metadata=_help("model size (dit.PRESETS, e.g. tiny, S/2, B/2, XL/1)"))
    model_overrides: dict[str, Any] = field(default_factory=dict,
                                            metadata=_help('JSON dict of LightningDiT arguments, e.g. \'{"depth": 2}\''))
    batch_size: int = field(default=32, metadata=_help("per process; global batch = batch_size * processes"))
    max_epochs: int | None = 100
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps (the smaller limit wins)"))
    lr: float = 1e-4
    warmup_steps: int = field(default=500, metadata=_help("linear LR warm-up, then constant (as LightningDiT)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=_help("AdamW betas (LightningDiT's)"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation micro-steps"))
    clip_norm: float = field(default=1.0, metadata=_help("gradient clipping, 0 = off (the norm is still measured)"))
    ema_decay: float = field(default=0.999, metadata=_help("small data: ~0.999; ImageNet used 0.9999"))
    ema_warmup: bool = field(default=True, metadata=_help("decay min(ema_decay, (1+n)/(10+n)) after n updates"))
    label_dropout: float = field(default=0.1, metadata=_help("label dropout for classifier-free guidance"))
    time_dist: str = field(default="uniform", metadata=_help("training t distribution: uniform | logit_normal"))
    cosine_weight: float = field(default=0.0, metadata=_help("weight of the velocity-direction loss (LightningDiT: 1.0)"))
    resample_latents: bool = field(default=False, metadata=_help("z = mean + std * eps from the stored posterior"))
    precision: str = field(default="auto", metadata=_help(
        "auto|no|32|fp16|16-mixed|bf16|bf16-mixed (auto: bf16 on cc>=8.0, fp16 on T4, fp32 on CPU)"))
    devices: int = field(default=1, metadata=_help("processes/GPUs; > 1 re-launches through `accelerate launch`"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even when a GPU is present"))
    # torch.compile of the training objective (model forward + loss, and their backward) fuses the
    # many small element-wise ops (RMSNorm, adaLN, RoPE, SwiGLU, the loss) that eager runs one by
    # one: 1.2-1.35x per step on the CPU (benchmarks/README.md). A cold compile costs 30-80 s, more
    # than the CPU demo's 3-minute training saves, and it is unmeasured on a T4, so it is off by
    # default and in every profile; turn it on for long runs. Where compilation fails (no C++
    # compiler, an unsupported platform) training says so in one line and runs eager.
    compile: bool = field(default=False, metadata=_help("torch.compile the training step (falls back to eager)"))
    seed: int = 0
    log_every: int = 50
    val_every: int = field(default=500, metadata=_help("validation loss every N steps (0 = off)"))
    ckpt_every: int = field(default=1000, metadata=_help("checkpoint every N steps (0 = only at the end / time budget)"))
    preview_every: int = field(default=0, metadata=_help("preview grid every N steps (0 = off; needs --tokenizer)"))
    keep_last: int = field(default=3, metadata=_help("checkpoints kept"))
    early_stop_patience: int = field(default=0, metadata=_help("stop after N validations without improvement (0 = off)"))
    resume: bool | str = field(default=False, metadata=_help(
        "continue from the newest complete checkpoint in --output_dir (or from the given folder)"))
    init_from: str | None = field(default=None, metadata=_help("official LightningDiT weights or one of our runs"))
    time_budget: float | None = field(default=None, metadata=_help("hours this session may run (e.g. 11.5 on Kaggle)"))
    session_start: float | None = field(default=None, metadata=_help(
        "epoch seconds the session began; the time budget counts from it (default: when training starts)"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer file (for decoding previews)"))
    preview_users: int = 8
    preview_per_user: int = 4
    preview_steps: int = 16
    preview_guidance: float = 4.0
    tensorboard: bool = field(default=False, metadata=_help("log to RUN/tensorboard"))
    progress: bool = field(default=True, metadata=_help("tqdm bar"))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}; known: {sorted(known)}")
        obj = dict(obj)
        if "betas" in obj:
            obj["betas"] = tuple(float(b) for b in obj["betas"])
        return cls(**obj)


def normalize_solver(solver: str) -> str:
    try:
        return SOLVERS[solver]
    except KeyError:
        raise MdgenError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None


# What the manifest records besides the fields: how noise and seeds are made (documentation).
_SAMPLING_NOTES = {
    "guidance_channels": "all",
    "seed_rule": "image_seed = int.from_bytes(sha256(f'mdgen-image:{seed}:{user_id}:{k}')[:8], 'little') >> 1",
    "noise": "torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(image_seed))",
}


@dataclass
class SamplingSettings:
    """Every setting that changes the pixels (batch_size is recorded but does not). Travels whole
    from the notebook/CLI to the sampler, the widgets, the sweep and the manifest."""

    guidance_scale: float = field(default=4.0, metadata=_help("1 = no guidance (conditional model)"))
    # 12 heun steps = 24 model evaluations: on the cpu-demo model they matched 250 euler steps
    # (fd_ratio 2.02 vs 2.07, recognisability 0.98 vs 0.97, same C2ST; benchmarks/README.md,
    # "Sampling: NFE against quality") at a tenth of the cost.
    num_steps: int = field(default=12, metadata=_help(
        "ODE steps: euler does this many model calls, heun twice as many, dopri5 starts with step "
        "1/num_steps and adapts (the official sampler's N grid points are N-1 steps)"))
    solver: str = field(default="heun", metadata=_help(f"one of {sorted(SOLVERS)} (adaptive = dopri5)"))
    timestep_shift: float = 0.0
    guidance_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=_help(
        "apply guidance only for t in [START, END] (t=0 noise, t=1 data)"))
    seed: int = 0
    batch_size: int = 64
    # The last EMA, not the one with the lowest validation loss (train's ema_best.safetensors): in
    # the few-shot regime, where they differ, the val-loss minimum (step 300 of 1200) gave a smaller
    # augmentation gain (+0.052 vs +0.085; 31 users: -0.016 vs +0.025) and synthetic-only accuracy
    # than the last EMA, whose val loss had risen 35% (benchmarks/README.md, "Best EMA by validation loss").
    weights: str = field(default="last", metadata=_help(
        "which EMA of a run folder: last | best (lowest EMA validation loss, ema_best.safetensors)"))

    def to_json(self) -> dict[str, Any]:
        return {
            "guidance_scale": float(self.guidance_scale),
            "num_steps": int(self.num_steps),
            "solver": normalize_solver(self.solver),
            "timestep_shift": float(self.timestep_shift),
            "guidance_interval": [float(v) for v in self.guidance_interval],
            "seed": int(self.seed),
            "batch_size": int(self.batch_size),
            "weights": str(self.weights),
            **_SAMPLING_NOTES,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "SamplingSettings":
        """Inverse of `to_json` (a manifest's "settings"); the documentation keys are ignored."""
        values = {k: v for k, v in obj.items() if k not in _SAMPLING_NOTES}
        return apply(cls(), values)


@dataclass
class EvalConfig:
    """Settings of one evaluation; defaults are the recommended ones (None = chosen per device)."""

    data_dir: str = field(default="", metadata=_help("real (or simulated) data folder ID_k/*.jpg"))
    split: str = field(default="", metadata=_help("split.json written by `split`"))
    output_dir: str = field(default="", metadata=_help("where metrics.json, headline.md, figures and classifier go"))
    generated_dir: str | None = field(default=None, metadata=_help(
        "generate output folder (manifest.json + PNGs) or its dataset/ export"))
    classifier: str | None = field(default=None, metadata=_help(
        "saved classifier .safetensors to reuse (trained and saved there if missing)"))
    pretrained: str | None = field(default=None, metadata=_help(
        "local torchvision ResNet-18 ImageNet weights (never downloaded; default: from scratch)"))
    epochs: int | None = field(default=None, metadata=_help("classifier epochs (default 15 on CPU, 30 on GPU)"))
    batch_size: int = 64
    lr: float = 1e-3
    min_steps: int = field(default=200, metadata=_help("tiny few-shot sets still get this many optimiser steps"))
    steps: int | None = field(default=None, metadata=_help(
        "optimiser steps of every classifier, so that arms compare at matched compute "
        "(default: epochs x real-train batches, at least min_steps)"))
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_help("training seeds for the augmentation runs"))
    synthetic_per_user: tuple[int, ...] = field(default=(0, 25, 50), metadata=_help(
        "synthetic images per user added to real-train (0 = real only)"))
    few_shot: tuple[int, ...] = field(default=(), metadata=_help("few-shot regimes: real train images per user"))
    few_shot_generated: dict[int, str] = field(default_factory=dict, metadata=_help(
        "generated set of each few-shot regime, K=DIR (its generator trained on that subset only)"))
    few_shot_seed: int = field(default=0, metadata=_help("the seed the few-shot subsets were drawn with (the split seed)"))
    inception_weights: str | None = field(default=None, metadata=_help("local Inception weights for FID/KID (skipped without)"))
    filter_confidence: float | None = field(default=None, metadata=_help(
        "also report augmentation with generated images kept only above this classifier confidence"))
    device: str = "auto"
    image_size: int | None = field(default=None, metadata=_help("classifier input size (default 64 on CPU, 128 on GPU)"))
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    dc_k: int = 5
    memorisation_percentile: float = 1.0
    pixel_size: int = field(default=32, metadata=_help("pixel-space memorisation distances at this resolution"))
    physics_per_user: int = field(default=20, metadata=_help("images per user read off in the physics check"))
    recognisability_sizes: tuple[int, ...] = field(default=(128,), metadata=_help(
        "extra classifier input sizes for recognisability at more detail"))
    c2st_seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_help(
        "seeds of the real-vs-generated two-sample test (none: skip it)"))
    c2st_steps: int = field(default=60, metadata=_help("optimiser steps of each two-sample-test CNN"))
    c2st_size: int = field(default=256, metadata=_help("two-sample-test image size (the files' full size)"))
    bootstrap: int = field(default=200, metadata=_help("bootstrap replicates for the intervals"))
    calibrate: str | None = field(default=None, metadata=_help(
        "'real' (half of real-val stands in for the generated set) or 'noise'"))
    figures: bool = True
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        s = dataclasses.asdict(self)
        s["few_shot_generated"] = {str(k): v for k, v in self.few_shot_generated.items()}
        return s


# --------------------------------------------------------------------------------------------
# Values: parsing text, replacing fields (nested, by dotted name)
# --------------------------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def parse_text(text: str, tp) -> Any:
    """An environment string as a value of field type `tp` (lists: comma or space separated,
    dicts: JSON, None: 'none' or empty for optional fields)."""
    base, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("", "none"):
        return None
    origin = typing.get_origin(base)
    try:
        if base is bool:
            return text.strip().lower() in ("1", "true", "yes", "on")
        if typing.get_origin(base) is typing.Union:  # bool | str (resume)
            low = text.strip().lower()
            return True if low in ("1", "true", "yes") else False if low in ("0", "false", "no") else text
        if base in (int, float, str):
            return base(text)
        if origin is tuple:
            args = typing.get_args(base)
            kind = args[0] if args else float
            return tuple(kind(p) for p in text.replace(",", " ").split())
        if origin is dict or base is dict:
            return {int(k) if typing.get_args(base)[:1] == (int,) else k: v for k, v in json.loads(text).items()}
    except (ValueError, json.JSONDecodeError) as e:
        raise SettingsError(f"cannot read {text!r} as {tp}: {e}") from None
    raise SettingsError(f"no parser for settings of type {tp}")


def apply(obj, values: Mapping[str, Any]):
    """A copy of dataclass `obj` with `values` applied; keys may be dotted ("train.lr") or nested
    dicts ({"train": {"lr": ...}}). Unknown names are a SettingsError naming the known ones."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in known:
            raise SettingsError(f"unknown setting {key!r} of {type(obj).__name__}; known: {sorted(known)}")
        sub = getattr(obj, head)
        if rest or (isinstance(value, Mapping) and dataclasses.is_dataclass(sub)):
            if not dataclasses.is_dataclass(sub):
                raise SettingsError(f"{type(obj).__name__}.{head} has no fields; got {key!r}")
            nested.setdefault(head, {}).update({rest: value} if rest else dict(value))
        else:
            flat[head] = value
    for head, sub_values in nested.items():
        flat[head] = apply(getattr(obj, head), sub_values)
    return dataclasses.replace(obj, **flat)


def env_overrides(cls, environ: Mapping[str, str] | None = None, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """{dotted name: value} from `MDGEN_<FIELD>` / `MDGEN_<SECTION>__<FIELD>` variables for the
    fields of dataclass `cls`; other `MDGEN_*` names (except `ignore`) are a SettingsError."""
    environ = os.environ if environ is None else environ
    ignore = tuple(i.upper() for i in ignore)
    out: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var[len(ENV_PREFIX):] in ignore:
            continue
        path = var[len(ENV_PREFIX):].lower().split(ENV_SEP.lower())
        owner, tp = cls, None
        for i, part in enumerate(path):
            hints = _hints(owner) if dataclasses.is_dataclass(owner) else {}
            if part not in hints:
                raise SettingsError(f"unknown setting {var}; known: {', '.join(env_names(cls, ignore))}")
            tp = hints[part]
            if i < len(path) - 1:
                owner = tp
        if dataclasses.is_dataclass(tp):
            raise SettingsError(f"{var} names a section; set one of its fields, e.g. {var}{ENV_SEP}<FIELD>")
        out[".".join(path)] = parse_text(text, tp)
    return out


def env_names(cls, ignore: Iterable[str] = ()) -> list[str]:
    """Every environment variable name `env_overrides` accepts for `cls`, plus `ignore`."""
    names = [ENV_PREFIX + i for i in ignore]
    for name, _ in _leaves(cls):
        names.append(ENV_PREFIX + name.upper().replace(".", ENV_SEP))
    return names


def _leaves(cls, prefix: str = ""):
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


# --------------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (), required: Iterable[str] = (),
                  aliases: Mapping[str, Iterable[str]] | None = None, types_: Mapping[str, Any] | None = None,
                  nested: bool = False) -> None:
    """One flag per field of dataclass `cls` (nested dataclass fields as --section.field when
    `nested`), default None so only given flags override. Bools: --name when the default is
    False, --no_name when it is True; tuples: nargs; dicts: JSON. `aliases` adds old flag
    names, `types_` replaces a field's parser (e.g. K=DIR pairs)."""
    skip, required, aliases, types_ = set(skip), set(required), dict(aliases or {}), dict(types_ or {})
    leaves = list(_leaves(cls)) if nested else [(f.name, f) for f in dataclasses.fields(cls)]
    hints_by_name = {}
    for name, f in leaves:
        owner = cls
        for part in name.split(".")[:-1]:
            owner = _hints(owner)[part]
        hints_by_name[name] = _hints(owner)[f.name]
    for name, f in leaves:
        if name in skip:
            continue
        tp = hints_by_name[name]
        base, optional = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default {default!r})" if help_text else f"default {default!r}"
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        flags = [f"--{name}", *aliases.get(name, ())]
        if name in types_:
            kw.update(types_[name])
        elif base is bool:
            if default is True:
                stem = name.rpartition(".")[0] + "." if "." in name else ""
                flags = [f"--{stem}no_{f.name}", *aliases.get(name, ())]
                kw.update(action="store_false")
            else:
                kw.update(action="store_true")
        elif typing.get_origin(base) is typing.Union:  # bool | str: a flag with an optional value
            kw.update(nargs="?", const=True)
        elif typing.get_origin(base) is tuple:
            args = typing.get_args(base)
            kw.update(type=args[0], nargs="*" if (len(args) == 2 and args[1] is Ellipsis) else len(args))
        elif typing.get_origin(base) is dict or base is dict:
            kw.update(type=json.loads, metavar="JSON")
        else:
            kw.update(type=_none_or(base) if optional else base)
        if name in required:
            kw.update(required=True)
        parser.add_argument(*flags, **kw)


class _ExplicitNone:
    """What `--field none` parses to: argparse's None already means "flag not given"."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _none_or(base):
    """The flag parser of an optional scalar field: 'none' clears it (e.g. --max_epochs none)."""
    def parse(text: str):
        return EXPLICIT_NONE if text.strip().lower() == "none" else base(text)
    parse.__name__ = f"{base.__name__} or none"  # argparse names it in its error message
    return parse


def given(args: argparse.Namespace, cls, nested: bool = False, skip: Iterable[str] = ()) -> dict[str, Any]:
    """{dotted name: value} of the flags of `cls` that were given on the command line."""
    skip = set(skip)
    names = [n for n, _ in _leaves(cls)] if nested else [f.name for f in dataclasses.fields(cls)]
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None and name not in skip:
            out[name] = None if value is EXPLICIT_NONE else tuple(value) if isinstance(value, list) else value
    return out
