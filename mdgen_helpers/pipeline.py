"""The stages in order, each skipped when its inputs have not changed: one code path for the
notebooks and for `python -m mdgen_helpers pipeline`.

    python -m mdgen_helpers pipeline --data_dir D --vavae_path P --output_dir O --batch_size 32 \
        --max_epochs 50 --devices 2 --generate_user_ids 1 2 3 4 5 --num_samples_per_user 4

A work folder (`RunPaths`) holds every artifact of one run:

    WORK/data/                  simulated data set (only when asked: --simulate / SIMULATE)
    WORK/split.json             the one persisted split (+ validation.json)
    WORK/tokenizer.safetensors  the fitted stand-in tokenizer (when no VA-VAE is given)
    WORK/latents/               {train,val,test,stats}.safetensors
    WORK/run/                   ema.safetensors, config.json, checkpoints/, metrics.jsonl, previews/
    WORK/generated/             micro_doppler_userNN_KKK.png, grid, manifest.json, dataset/ID_k/
    WORK/evaluation/            metrics.json and figures

A few-shot regime (`--few_shot K`) is a run of its own in WORK/fewshot_K/ whose split keeps K
training images per user (val/test unchanged): tokenizer fit, latents, generator, all see only
those K images, so its augmentation gain is honest.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mdgen_helpers import data, env, inputs, latents, tokenizers, vavae
from mdgen_helpers import evaluate as evaluation
from mdgen_helpers import generate as gen_mod
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import read_json
from mdgen_helpers.launch import launch_training
from mdgen_helpers.profiles import Profile, get_profile
from mdgen_helpers.report import format_table, headline_table
from mdgen_helpers.settings import EvalConfig, SamplingSettings, TrainConfig, add_arguments, apply, given
from mdgen_helpers.simulate import simulate_dataset


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    data = property(lambda self: self.root / "data")
    split = property(lambda self: self.root / "split.json")
    tokenizer = property(lambda self: self.root / "tokenizer.safetensors")
    random_vavae = property(lambda self: self.root / "vavae_random_ch32.pt")
    latents = property(lambda self: self.root / "latents")
    run = property(lambda self: self.root / "run")
    generated = property(lambda self: self.root / "generated")
    evaluation = property(lambda self: self.root / "evaluation")
    report = property(lambda self: self.root / "report.html")

    def few_shot(self, k: int) -> "RunPaths":
        return RunPaths(self.root / f"fewshot_{int(k):02d}")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def resolve_inputs(data_dir: str | None = None, vavae_path: str | None = None) -> tuple[str | None, str | None]:
    """Explicit paths win; on Kaggle, an empty VA-VAE path is filled from the attached datasets.
    The data set is resolved by `ensure_data` (explicit, the one attached, or simulated when asked)."""
    data_dir = data_dir or None
    vavae_path = vavae_path or None
    if env.on_kaggle() and vavae_path is None:
        found = env.find_inputs()
        if found["vavae"]:
            vavae_path = str(found["vavae"][0])
    return data_dir, vavae_path


def ensure_data(paths: RunPaths, profile: Profile, data_dir: str | None = None, progress: bool = True,
                simulate: bool = False) -> Path:
    """The data folder: `data_dir` if given, else the one attached data set, else (only with
    `simulate=True`) a simulated set in WORK/data, reused when its users.json says it was made
    with the same settings. No data and no `simulate` is an error listing what was searched."""
    found = inputs.find_data(data_dir)
    if found is not None:
        return found
    if not simulate:
        raise inputs.no_data_error()
    users_json = paths.data / "users.json"
    wanted = {"num_users": profile.sim_users, "per_user": profile.sim_per_user, "seed": profile.sim_seed,
              "style": profile.sim_style}
    if users_json.is_file():
        have = {"style": "default", **read_json(users_json)}  # sets written before styles are the default one
        if all(have.get(k) == v for k, v in wanted.items()):
            print(f"simulated data set in {paths.data} is up to date ({profile.sim_users} users x {profile.sim_per_user}, "
                  f"style {profile.sim_style})")
            return paths.data
        raise MdgenError(f"{paths.data} holds a simulated set made with other settings "
                         f"({ {k: have.get(k) for k in wanted} }, wanted {wanted}); use another work folder or delete it")
    simulate_dataset(paths.data, profile.sim_users, profile.sim_per_user, seed=profile.sim_seed, progress=progress,
                     style=profile.sim_style)
    return paths.data


def prepare_split(paths: RunPaths, profile: Profile, data_dir: str | Path, few_shot: int | None = None,
                  full_split_path: str | Path | None = None):
    """The persisted split (created once, then only loaded and checked against the files).

    With `few_shot=K`, the split of the parent run is subsampled to K training images per user
    and saved in this run's folder.
    """
    if not few_shot:
        return data.ensure_split(data_dir, paths.split, seed=profile.split_seed, fractions=profile.split_fractions)
    full = data.ensure_split(data_dir, full_split_path, seed=profile.split_seed, fractions=profile.split_fractions)
    sub = data.subsample_split(full, int(few_shot), seed=profile.split_seed)
    if paths.split.is_file():
        old = data.load_split(paths.split)
        if old.hash == sub.hash:
            return old
    data.save_split(sub, paths.split)
    return sub


def tokenizer_path(paths: RunPaths, profile: Profile, vavae_path: str | None = None) -> Path:
    if vavae_path:
        return Path(vavae_path)
    if profile.tokenizer == "standin":
        return paths.tokenizer
    if profile.tokenizer == "random-vavae":
        return paths.random_vavae
    raise MdgenError(f"profile {profile.name!r} uses a VA-VAE tokenizer: pass its checkpoint "
                     "(VAVAE_PATH in the notebook, --vavae_path on the command line; on Kaggle attach the "
                     "vavae-f16d32 dataset)")


def prepare_tokenizer(paths: RunPaths, profile: Profile, data_dir, split, vavae_path: str | None = None,
                      device: str = "cpu"):
    """Load the VA-VAE, or fit (once per split) the stand-in, or write the CI's random VA-VAE.

    `random-vavae` (profile cpu-smoke) is a tiny randomly initialised VA-VAE saved in the official
    `.pt` layout: its latents mean nothing, but the real checkpoint-loading path runs in CI.
    """
    path = tokenizer_path(paths, profile, vavae_path)
    if not vavae_path and profile.tokenizer == "standin":
        return tokenizers.ensure_standin(data_dir, split, path, seed=profile.split_seed, device=device)
    if not vavae_path and profile.tokenizer == "random-vavae" and not path.is_file():
        vavae.write_random_checkpoint(path, seed=0, ch=32)
    return tokenizers.load_tokenizer(path, device=device)


def extract(paths: RunPaths, profile: Profile, data_dir, split, tokenizer, progress: bool = True) -> dict:
    return latents.extract_latents(data_dir, split, tokenizer, paths.latents, batch_size=profile.extract_batch_size,
                                   num_workers=profile.num_workers, progress=progress)


# --------------------------------------------------------------------------------------------
# Training, generation, evaluation
# --------------------------------------------------------------------------------------------

def train_config(paths: RunPaths, profile: Profile, tokenizer_file: str | Path | None = None, **overrides) -> TrainConfig:
    """The profile's TrainConfig with this run's folders filled in (overrides, by field name, win);
    its time budget counts from the session start. Without a tokenizer, previews are off (said once)."""
    run = dataclasses.replace(profile.train, latent_dir=str(paths.latents), output_dir=str(paths.run),
                              tokenizer=str(tokenizer_file) if tokenizer_file else None, resume=True,
                              session_start=env.session_start())
    cfg = apply(run, overrides)
    if cfg.preview_every and not cfg.tokenizer:
        print(f"previews off: no tokenizer here to decode them (preview_every {cfg.preview_every} ignored; "
              "attach the VA-VAE and set VAVAE_PATH to get preview grids)")
        cfg = dataclasses.replace(cfg, preview_every=0)
    return cfg


def generate(paths: RunPaths, profile: Profile, tokenizer_file, user_ids=None, num_samples_per_user=None,
             export_dataset: bool = True, device: str | None = None, progress: bool = True,
             sampling: SamplingSettings | None = None, run_dir=None) -> dict:
    """Generate per-user images into WORK/generated with `sampling` (default: the profile's) from
    WORK/run (or `run_dir`, e.g. notebook 02's attached output); skipped when its manifest already
    records the same checkpoint, tokenizer and settings."""
    device = device or ("cuda" if _cuda() else "cpu")
    settings = sampling or profile.sampling
    gen = gen_mod.load_generator(run_dir or paths.run, device=device, weights=settings.weights)
    n = int(num_samples_per_user or profile.num_samples_per_user)
    users = list(user_ids) if user_ids else list(gen.user_map.user_ids)
    manifest_path = paths.generated / "manifest.json"
    if manifest_path.is_file():
        old = read_json(manifest_path)
        same = (old.get("checkpoint_sha256") == gen.checkpoint_sha256 and old.get("settings") == settings.to_json()
                and old.get("user_ids") == users and old.get("num_samples_per_user") == n
                and bool(old.get("dataset_dir")) == export_dataset)
        if same:
            print(f"generation in {paths.generated} is up to date ({len(old['images'])} images)")
            return old
    tok = tokenizers.load_tokenizer(tokenizer_file, device=device)
    # WORK/generated belongs to the pipeline: a stale generation there is replaced (its files only).
    return gen_mod.generate_images(gen, tok, paths.generated, users, n, settings, export_dataset=export_dataset,
                                   tokenizer_path=str(tokenizer_file), progress=progress, overwrite=True)


def _cuda() -> bool:
    return torch.cuda.is_available()


def run_pipeline(profile: Profile, output_dir: str | Path, data_dir: str | None = None, vavae_path: str | None = None,
                 few_shot: int | None = None, user_ids=None, num_samples_per_user: int | None = None,
                 evaluate: bool = False, train_overrides: dict | None = None, simulate: bool = False) -> dict:
    """[simulate, only when asked] -> split -> tokenizer -> extract -> train -> generate [-> evaluate]."""
    base = RunPaths(output_dir)
    paths = base.few_shot(few_shot) if few_shot else base
    data_dir, vavae_path = resolve_inputs(data_dir, vavae_path)
    print(f"[pipeline] work folder {paths.root} (profile {profile.name})", flush=True)
    data_dir = ensure_data(base, profile, data_dir, simulate=simulate)
    split = prepare_split(paths, profile, data_dir, few_shot=few_shot, full_split_path=base.split)
    sizes = ", ".join(f"{len(split.files(part))} {part}" for part in ("train", "val", "test"))
    print(f"[pipeline] split {split.hash[:12]}: {split.user_map.num_users} users, {sizes}", flush=True)
    device = "cuda" if _cuda() else "cpu"
    tok = prepare_tokenizer(paths, profile, data_dir, split, vavae_path, device=device)
    print(f"[pipeline] tokenizer {tok.identity}", flush=True)
    status = extract(paths, profile, data_dir, split, tok)
    print(f"[pipeline] latents: {status}", flush=True)
    del tok
    tok_file = tokenizer_path(paths, profile, vavae_path)
    train_overrides = dict(train_overrides or {})
    n_train = len(split.files("train"))
    batch, devices = profile.train.batch_size, profile.train.devices
    if "batch_size" not in train_overrides and batch * devices > n_train:
        # a few-shot regime can hold fewer latents than one batch: use them all in every step
        train_overrides["batch_size"] = max(1, n_train // max(1, devices))
        print(f"[pipeline] batch size {batch} > {n_train} train latents: using {train_overrides['batch_size']}")
    cfg = train_config(paths, profile, tok_file, **train_overrides)
    result = launch_training(cfg, num_processes=cfg.devices)
    print(f"[pipeline] training: step {result.get('step')}, stopped by {result.get('stopped')}, "
          f"final loss {result.get('final_loss')}, EMA val loss {result.get('val_loss_ema')}", flush=True)
    manifest = generate(paths, profile, tok_file, user_ids=user_ids, num_samples_per_user=num_samples_per_user)
    out = {"work_dir": str(paths.root), "split_hash": split.hash, "latents": status, "train": result,
           "generated": str(paths.generated), "num_images": len(manifest.get("images", []))}
    if evaluate:
        # Always the full run's evaluation; few-shot regimes already generated are included.
        metrics = evaluation.evaluate(eval_config(base, profile, data_dir))
        out["evaluation"] = str(base.evaluation / "metrics.json")
        print(format_table(headline_table(metrics)))
    return out


# Profile fields the pipeline fills in itself (paths, and the few-shot seed, which is the split seed).
_PIPELINE_SET = ("name", "extra", "train.latent_dir", "train.output_dir", "train.tokenizer", "train.resume",
                 "eval.data_dir", "eval.split", "eval.output_dir", "eval.generated_dir", "eval.classifier",
                 "eval.few_shot_generated", "eval.few_shot_seed")
# The short flags of earlier versions (README commands), kept as aliases of the nested fields.
_ALIASES = {"train.batch_size": ["--batch_size"], "train.max_epochs": ["--max_epochs"], "train.max_steps": ["--max_steps"],
            "train.lr": ["--lr"], "train.preset": ["--preset"], "train.devices": ["--devices"],
            "train.precision": ["--precision"], "sampling.guidance_scale": ["--guidance_scale"],
            "sampling.num_steps": ["--num_steps"]}


def add_cli_arguments(parser) -> None:
    parser.add_argument("--profile", default=os.environ.get("MDGEN_PROFILE"),
                        help="cpu-smoke, cpu-demo or kaggle-t4x2 (default: kaggle-t4x2 on a GPU machine, cpu-demo "
                             "without one): every default below comes from it")
    parser.add_argument("--data_dir", help="ID_1..ID_N folders (required unless --simulate)")
    parser.add_argument("--simulate", action="store_true",
                        help="no data set: simulate the profile's users in OUTPUT_DIR/data (only when asked)")
    parser.add_argument("--vavae_path", help="VA-VAE checkpoint (default: the profile's tokenizer)")
    parser.add_argument("--output_dir", required=True, help="work folder for every artifact of the run")
    parser.add_argument("--generate_user_ids", type=int, nargs="*", help="1-based user ids (default: all)")
    parser.add_argument("--few_shot", type=int, help="train the generator on only K real images per user")
    parser.add_argument("--evaluate", action="store_true",
                        help="also run the evaluation suite on the full run (and any few-shot regimes already generated)")
    group = parser.add_argument_group("profile fields (override the profile's value; nested: --train.lr, --sampling.num_steps, --eval.epochs)")
    add_arguments(group, Profile, nested=True, skip=_PIPELINE_SET, aliases=_ALIASES)


def cli_profile(args) -> Profile:
    """The profile the command line asks for: named, or picked from the hardware (said once); an
    explicit --max_epochs without --max_steps is never capped by the profile's max_steps."""
    name = args.profile
    if not name:
        name = env.default_profile_name()
        print(f"[pipeline] profile {name} (picked from the hardware: "
              f"{'a CUDA GPU' if name != 'cpu-demo' else 'no CUDA GPU'}; --profile to choose)", flush=True)
    overrides = given(args, Profile, nested=True, skip=_PIPELINE_SET)
    if "train.max_epochs" in overrides and "train.max_steps" not in overrides:
        overrides["train.max_steps"] = None
        print(f"[pipeline] --max_epochs {overrides['train.max_epochs']} without --max_steps: the profile's step cap is lifted")
    return get_profile(name, **overrides)


def cli_main(args) -> int:
    if not args.data_dir and not args.simulate:
        raise MdgenError("pass --data_dir (your ID_1..ID_N folders) or --simulate for simulated users")
    profile = cli_profile(args)
    result = run_pipeline(profile, args.output_dir, args.data_dir, args.vavae_path, few_shot=args.few_shot,
                          user_ids=args.generate_user_ids, evaluate=args.evaluate, simulate=args.simulate)
    print(f"[pipeline] done: {result['num_images']} images in {result['generated']}")
    return 0


def eval_config(paths: RunPaths, profile: Profile, data_dir, **overrides) -> EvalConfig:
    """The profile's evaluation on this work folder: classifier reused from WORK/evaluation when
    present, generated set from WORK/generated, few-shot regimes from WORK/fewshot_K/generated if
    run, drawn with the profile's split seed as `prepare_split` drew them (overrides win)."""
    few = {int(k): str(paths.few_shot(k).generated) for k in profile.eval.few_shot
           if (paths.few_shot(k).generated / "manifest.json").is_file()}
    cfg = dataclasses.replace(
        profile.eval, data_dir=str(data_dir), split=str(paths.split), output_dir=str(paths.evaluation),
        generated_dir=str(paths.generated) if (paths.generated / "manifest.json").is_file() else None,
        classifier=str(paths.evaluation / "classifier.safetensors"), few_shot_generated=few,
        few_shot_seed=profile.split_seed,
    )
    return apply(cfg, overrides)
