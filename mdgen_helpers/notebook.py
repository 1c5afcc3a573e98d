"""Notebook helpers: the shared setup, finding a previous stage's output, and what the cells show.

The notebooks stay thin (narrative, parameters, calls, plots); what they would otherwise repeat
lives here: `setup()` (the environment summary of the first cell), `open_run` (profile, work
folder and inputs), `load_for_sampling` (generator + the tokenizer that made its latents, used by
notebooks 03 and 04), finding a previous stage's output (the local work folder first, then the
attached Kaggle datasets), and the small tables and image dictionaries the cells display.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from IPython.display import Image

from mdgen_helpers import checkpoints, data, dit, env, inputs, pipeline
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import read_json
from mdgen_helpers.generate import Generator, check_tokenizer, load_generator, read_png
from mdgen_helpers.latents import load_latents
from mdgen_helpers.pipeline import RunPaths
from mdgen_helpers.profiles import Profile, get_profile
from mdgen_helpers.tokenizers import Tokenizer, load_tokenizer, reconstruction_report


def setup() -> None:
    """The first cell's work once the package is importable: print the environment (GPUs,
    compute capability, the precision and launcher training will use, free space)."""
    print(env.summary())


def open_run(profile: str, work_dir: str, data_dir: str = "", vavae_path: str = ""):
    """(profile, RunPaths, data_dir, vavae_path) of a notebook's parameters: the named profile
    (with MDGEN_* overrides), the work folder, and the inputs (explicit paths win; on Kaggle,
    empty ones are found among the attached datasets)."""
    cfg = get_profile(profile)
    paths = RunPaths(work_dir)
    data_dir, vavae_path = pipeline.resolve_inputs(data_dir, vavae_path)
    return cfg, paths, data_dir, vavae_path


def load_for_sampling(paths: RunPaths, profile: Profile, vavae_path: str | None = None,
                      device: str | None = None) -> tuple[Generator, Tokenizer, Path]:
    """The trained generator of WORK/run (or notebook 02's attached output) and the tokenizer that
    made its latents (here, or notebook 01's attached output; checked to be the same one), both on
    `device` (default: CUDA when present); and the tokenizer's file."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(inputs.locate("run", paths), device=device, weights=profile.sampling.weights)
    tok_file = inputs.locate_tokenizer(paths, profile, vavae_path)
    tok = load_tokenizer(tok_file, device=device)
    check_tokenizer(gen, tok)
    return gen, tok, tok_file


def examples_by_user(data_dir, split, part: str = "train", per_user: int = 4, max_users: int = 8,
                     user_ids=None) -> dict[int, list]:
    """The first `per_user` images of each user in a split part, as {user_id: [tensor, ...]}."""
    wanted = list(user_ids) if user_ids else list(split.user_map.user_ids)[:max_users]
    out: dict[int, list] = {u: [] for u in wanted}
    for rel, label in zip(split.files(part), split.labels(part)):
        uid = split.user_map.user_of_label(label)
        if uid in out and len(out[uid]) < per_user:
            out[uid].append(data.load_image(Path(data_dir) / rel))
    return out


def generated_by_user(generated_dir, per_user: int = 4, user_ids=None) -> dict[int, list]:
    """Generated PNGs listed in a manifest, as {user_id: [uint8 HxWx3 array, ...]}."""
    manifest = read_json(Path(generated_dir) / "manifest.json")
    wanted = set(user_ids) if user_ids else None
    out: dict[int, list] = {}
    for rec in manifest["images"]:
        uid = int(rec["user_id"])
        if (wanted is None or uid in wanted) and len(out.setdefault(uid, [])) < per_user:
            out[uid].append(read_png(Path(generated_dir) / rec["file"]).permute(1, 2, 0).numpy())
    return out


def find_latents(paths: RunPaths) -> Path:
    """WORK/latents if notebook 01 ran here, else notebook 01's attached output (by marker)."""
    return inputs.locate("latents", paths)


def find_tokenizer(paths: RunPaths, profile: Profile, vavae_path: str | None = None) -> Path | None:
    """The tokenizer file of this run, or None when it is not here (previews are then skipped)."""
    _, vavae_path = pipeline.resolve_inputs(None, vavae_path)
    try:
        path = pipeline.tokenizer_path(paths, profile, vavae_path)
    except MdgenError:
        return None
    return path if path.is_file() else None


def adopt_previous_run(paths: RunPaths, source: str | None = None) -> Path | None:
    """Copy a previous session's run (e.g. the read-only attached `mdgen-checkpoints`) into
    WORK/run so training resumes from its newest complete checkpoint: only when `source` names it.

    An attached run may be someone else's, so it is never adopted by itself: without `source`,
    runs found among the attached datasets are listed with how to adopt them. `copy_run` scans
    the checkpoint before copying and prints its path and sha256. Nothing is copied when WORK/run
    already has a checkpoint of its own. Returns the source used, or None."""
    if checkpoints.latest_checkpoint(paths.run) is not None:
        return None
    if not source:
        for src in (env.find_inputs()["checkpoint"] if env.on_kaggle() else []):
            if checkpoints.latest_checkpoint(src) is not None:
                print(f"an attached run was found at {src}; it is not adopted automatically. To resume from it, "
                      f"set RESUME_FROM = \"{src}\" (MDGEN_RESUME_FROM) after checking where it comes from")
        return None
    if checkpoints.copy_run(source, paths.run) is None:
        raise MdgenError(f"{source} holds no complete checkpoint (checkpoints/step_*/complete.json) to resume from")
    return Path(source)



def describe_training(cfg) -> str:
    """Data size per user, model size and the step budget, before any training work."""
    train_set = load_latents(cfg.latent_dir, "train")
    val_set = load_latents(cfg.latent_dir, "val")
    um = train_set.user_map
    per_user = {um.user_of_label(int(l)): int((train_set.labels == l).sum()) for l in train_set.labels.unique()}
    model = dit.build_model(cfg.preset, um.num_users, **(cfg.model_overrides or {}))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"users      : {um.num_users} (ids {um.user_ids[0]}..{um.user_ids[-1]})",
        f"latents    : {len(train_set.labels)} train, {len(val_set.labels)} val, shape {tuple(train_set.latents.shape[1:])}",
        f"per user   : min {min(per_user.values())}, max {max(per_user.values())} train latents",
        f"model      : LightningDiT {cfg.preset}, {params / 1e6:.2f} M trainable parameters",
        f"training   : batch {cfg.batch_size}/process, lr {cfg.lr}, max_steps {cfg.max_steps}, max_epochs {cfg.max_epochs}, "
        f"EMA {cfg.ema_decay}, label dropout {cfg.label_dropout}, precision {cfg.precision}",
    ]
    return "\n".join(lines)


def latest_preview(paths: RunPaths):
    """The newest preview grid written during training, for display; None when there is none."""
    previews = sorted((paths.run / "previews").glob("*.png"))
    if not previews:
        print("no preview grids (set preview_every > 0 and give a tokenizer to get them)")
        return None
    return Image(filename=str(previews[-1]))


def reconstruction_check(paths: RunPaths, profile: Profile, data_dir, split, tokenizer, per_user: int = 4) -> dict:
    """Encode + decode validation images of every user: PSNR/SSIM per user.

    When the tokenizer in use is not the stand-in (a VA-VAE), the stand-in is fitted too and both
    are reported side by side: it tells whether the ImageNet VA-VAE serves these spectrograms
    better than a linear codec fitted on them.
    """
    part = "val" if split.files("val") else "train"
    dataset = data.ImageDataset(data_dir, split, part)
    candidates = {tokenizer.identity: tokenizer}
    if not tokenizer.identity.startswith("mdgen-standin"):
        standin = pipeline.prepare_tokenizer(paths, dataclasses.replace(profile, tokenizer="standin"), data_dir, split)
        candidates[standin.identity] = standin
    reports = {name: reconstruction_report(tok, dataset, split.user_map, per_user=per_user)
               for name, tok in candidates.items()}
    names = list(reports)
    lines = [f"{part} reconstruction, PSNR dB / SSIM per user", "user  " + "  ".join(f"{n[:34]:>34}" for n in names)]
    for uid in reports[names[0]]["per_user"]:
        cells = [f"{reports[n]['per_user'][uid]['psnr']:6.2f} / {reports[n]['per_user'][uid]['ssim']:.3f}" for n in names]
        lines.append(f"{uid:>4}  " + "  ".join(f"{c:>34}" for c in cells))
    lines.append("all   " + "  ".join(f"{reports[n]['psnr']:6.2f} / {reports[n]['ssim']:.3f}".rjust(34) for n in names))
    return {"reports": reports, "table": "\n".join(lines), "in_use": tokenizer.identity}


def show_figures(metrics: dict, out_dir) -> list:
    """The evaluation's saved figures, for display in a notebook (one IPython Image each)."""
    return [Image(filename=str(Path(out_dir) / name)) for name in metrics.get("figures", [])]
