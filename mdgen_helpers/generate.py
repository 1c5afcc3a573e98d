"""Generate spectrograms of chosen users: ODE sampling with classifier-free guidance, decoding, files.

    python -m mdgen_helpers generate --dit_checkpoint RUN --vavae_path TOK --output_dir GEN \
        --user_ids 1 2 3 --num_samples_per_user 4 --guidance_scale 4.0 --num_steps 25

Everything the sampler needs (EMA weights, model config, user map, latent statistics, tokenizer
identity) comes from the checkpoint (`checkpoints.read_ema`), so nothing is guessed. Output, in GEN/:
- `micro_doppler_user01_001.png` ... (user id and sample index are 1-based, as users speak),
- `micro_doppler_grid.png` (rows = users),
- `manifest.json` (checkpoint hash, every sampling setting, each image's seed),
- with `--export_dataset`, `dataset/ID_k/gen_0001.jpg` in the real data set's layout.

Reproducibility: image k of user u starts from noise drawn on the CPU by its own torch.Generator
seeded with `image_seed(base_seed, u, k)`, a pure function. The output therefore does not depend
on the batch size, on how many processes share the work, or on the order of the work, and one
image can be regenerated alone from the manifest (`regenerate_image`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from torchvision.transforms.functional import resize
from tqdm.auto import tqdm

from mdgen_helpers import checkpoints, trust
from mdgen_helpers.dit import LightningDiT, null_label
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, MdgenError
from mdgen_helpers.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from mdgen_helpers.flow import guided_velocity, sample_ode
from mdgen_helpers.latents import LatentStats
from mdgen_helpers.settings import SOLVERS, SamplingSettings, add_arguments, apply, given, normalize_solver
from mdgen_helpers.tokenizers import load_tokenizer
from mdgen_helpers.users import UserMap, image_name
from mdgen_helpers.viz import save_figure, user_grid

MANIFEST_NAME = "manifest.json"
GRID_NAME = "micro_doppler_grid.png"
GRID_MAX_COLUMNS = 8


class UnknownUserError(MdgenError):
    """A requested user id is not one the model was trained on."""


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Generator:
    """A trained model and what it needs to sample: everything read from its checkpoint (or, for
    training previews, the EMA model in memory, which has no checkpoint file yet)."""

    model: torch.nn.Module
    user_map: UserMap
    stats: LatentStats
    tokenizer_identity: str
    model_config: dict[str, Any]
    latent_shape: tuple[int, int, int]
    checkpoint_path: Path | None = None
    checkpoint_sha256: str = ""
    step: int | None = None
    split_hash: str | None = None
    train_config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_users(self) -> int:
        return self.user_map.num_users

    def labels_of_users(self, user_ids: Sequence[int]) -> list[int]:
        """Class labels of 1-based user ids; refuses ids the model was not trained on."""
        labels = []
        for uid in user_ids:
            if isinstance(uid, bool) or int(uid) != uid or int(uid) not in self.user_map.user_ids:
                raise UnknownUserError(
                    f"user id {uid!r} is not one this model was trained on; trained user ids: "
                    f"{describe_ids(self.user_map.user_ids)} ({self.num_users} users, 1-based like "
                    f"the ID_k folders). Pick user ids from that range."
                )
            labels.append(self.user_map.label_of_user(int(uid)))
        return labels


def load_generator(path: str | Path, device: str | torch.device = "cpu",
                   weights: str = SamplingSettings.weights) -> Generator:
    """Load the EMA weights (of a run folder: its `weights` export, best or last) and the metadata
    train.py stored with them; the model is in eval mode."""
    ema = checkpoints.read_ema(path, weights)
    path, meta = ema.path, ema.meta
    trust.require_finite(ema.state_dict, f"EMA weights in {path}")
    user_map = UserMap.from_json(meta["user_map"])
    stats = LatentStats.from_json(meta)
    cfg = dict(meta["model_config"])
    if "num_classes" in cfg and int(cfg["num_classes"]) != user_map.num_users:
        raise CheckpointError(
            f"{path}: model_config has num_classes={cfg['num_classes']} but the user map has "
            f"{user_map.num_users} users; the checkpoint is inconsistent, retrain or re-export it."
        )
    model = LightningDiT.from_config(cfg)
    try:
        model.load_state_dict(ema.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its model_config: {str(e)[:500]}") from None
    model.eval().requires_grad_(False).to(device)
    size = int(cfg.get("input_size", 16))
    channels = int(cfg.get("in_channels", stats.channels))
    if stats.channels != channels:
        raise CheckpointError(f"{path}: latent statistics have {stats.channels} channels, the model {channels}.")
    return Generator(
        model=model,
        user_map=user_map,
        stats=stats,
        tokenizer_identity=str(meta["tokenizer"]),
        model_config=cfg,
        latent_shape=(channels, size, size),
        checkpoint_path=path,
        checkpoint_sha256=sha256_file(path),
        step=meta.get("step"),
        split_hash=meta.get("split_hash"),
        train_config=meta.get("train_config") or {},
    )


def check_tokenizer(gen: Generator, tokenizer) -> None:
    """Latents only mean something to the tokenizer that made the training latents."""
    if tokenizer.identity != gen.tokenizer_identity:
        raise ArtifactMismatchError(
            f"tokenizer mismatch: the model at {gen.checkpoint_path} was trained on latents of "
            f"tokenizer {gen.tokenizer_identity!r}, but {tokenizer.identity!r} was given. Pass the "
            f"same tokenizer file that `extract` used (--vavae_path / --tokenizer)."
        )


def describe_ids(ids: Sequence[int]) -> str:
    ids = sorted(int(i) for i in ids)
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids))


# --------------------------------------------------------------------------------------------
# Seeds and sampling


def image_seed(base_seed: int, user_id: int, sample_index: int) -> int:
    """Seed of image `sample_index` (1-based) of user `user_id`: a pure, platform-stable function.

    sha256 rather than Python's hash() (salted per process) or arithmetic (collides easily).
    """
    digest = hashlib.sha256(f"mdgen-image:{int(base_seed)}:{int(user_id)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """One CPU generator per image, so each image's noise is the same whatever batch it is in."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def sample_latents(
    gen: Generator,
    user_ids: Sequence[int],
    seeds: Sequence[int],
    settings: SamplingSettings,
    progress: bool = False,
    return_nfe: bool = False,
):
    """Denormalised latents (`LatentStats.denormalize`), shape (N, C, H, W) on the CPU, one per
    (user, seed), sampled with `settings` (its `seed` is not used: the seeds are given).

    Batches only group work: every image has its own noise and guidance is per sample, so the
    result equals sampling each image alone (up to float round-off of batched kernels). The
    adaptive solver (dopri5) picks its steps from an error norm over the whole batch, which would
    make an image depend on its batch mates; it therefore integrates each image on its own.
    With `return_nfe`, also a list with each image's number of model evaluations.
    """
    if len(user_ids) != len(seeds):
        raise MdgenError(f"sample_latents: {len(user_ids)} user ids but {len(seeds)} seeds")
    num_steps, batch_size, guidance_interval = settings.num_steps, settings.batch_size, settings.guidance_interval
    if num_steps < 1:
        raise MdgenError(f"num_steps must be >= 1, got {num_steps}")
    if batch_size < 1:
        raise MdgenError(f"batch_size must be >= 1, got {batch_size}")
    start_t, end_t = (float(v) for v in guidance_interval)
    if not 0.0 <= start_t <= end_t <= 1.0:
        raise MdgenError(f"guidance_interval must satisfy 0 <= START <= END <= 1 (t=0 noise, t=1 data), got {guidance_interval}")
    method = normalize_solver(settings.solver)
    labels = gen.labels_of_users(user_ids)
    null = null_label(gen.num_users)
    device = gen.device
    ode_batch = 1 if method == "dopri5" else batch_size
    out, nfes = [], []
    starts = range(0, len(labels), ode_batch)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2):
        x0 = initial_noise(seeds[start : start + ode_batch], gen.latent_shape, device)
        y = torch.tensor(labels[start : start + ode_batch], dtype=torch.long, device=device)
        velocity = guided_velocity(gen.model, y, float(settings.guidance_scale), null, interval=(start_t, end_t))
        x1, nfe = sample_ode(velocity, x0, int(num_steps), method=method, timestep_shift=float(settings.timestep_shift))
        out.append(gen.stats.denormalize(x1.float().cpu()))
        nfes.extend([int(nfe)] * len(y))
    latents = torch.cat(out) if out else torch.empty((0, *gen.latent_shape))
    return (latents, nfes) if return_nfe else latents


@torch.no_grad()
def decode_to_uint8(tokenizer, latents: torch.Tensor, batch_size: int = 16, device=None) -> torch.Tensor:
    """Decode latents in batches to uint8 images (N, 3, H, W) on the CPU."""
    device = device if device is not None else _tokenizer_device(tokenizer)
    images = []
    for start in range(0, len(latents), batch_size):
        x = tokenizer.decode(latents[start : start + batch_size].to(device)).float().cpu()
        trust.require_finite(x, "decoded images")
        images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(images) if images else torch.empty((0, 3, 256, 256), dtype=torch.uint8)


def _tokenizer_device(tokenizer) -> torch.device:
    dev = getattr(tokenizer, "device", None)
    if dev is not None:
        return torch.device(dev)
    params = getattr(tokenizer, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Files


def export_name(sample_index: int) -> str:
    return f"gen_{int(sample_index):04d}.jpg"


def _encode(image: torch.Tensor, fmt: str, **kw) -> bytes:
    """uint8 (3, H, W) -> file bytes with PIL (torchvision's image I/O is deprecated since 0.29)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, fmt, **kw)
    return buf.getvalue()


def write_png(path: Path, image: torch.Tensor) -> None:
    atomic_write_bytes(path, _encode(image, "PNG"))


def write_dataset_jpeg(path: Path, image: torch.Tensor) -> None:
    """256x256 RGB JPEG q95: the format of the real data set, so loaders need no glue."""
    if tuple(image.shape[-2:]) != (256, 256):
        image = resize(image, [256, 256], antialias=True)
    atomic_write_bytes(path, _encode(image, "JPEG", quality=95))


def read_png(path: str | Path) -> torch.Tensor:
    """uint8 (3, H, W) of a written image."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def generate_images(
    gen: Generator,
    tokenizer,
    output_dir: str | Path,
    user_ids: Sequence[int] | None = None,
    num_samples_per_user: int = 4,
    settings: SamplingSettings | None = None,
    export_dataset: bool = False,
    tokenizer_path: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample, decode and write images, grid and manifest; returns the manifest.

    The output folder is owned by this call: a non-empty folder is refused unless `overwrite`,
    and then only a previous generation (the files its manifest lists) may be there. Everything
    is written to a staging folder beside it and swapped in at the end, so the folder holds
    exactly what the new manifest lists, and a killed run leaves it as it was.

    Work is split over Accelerate processes (`accelerate launch` or notebook_launcher); each
    process writes its own images, the main process gathers the records and writes the grid and
    manifest. A single process is the same code path with one shard.
    """
    settings = settings or SamplingSettings()
    normalize_solver(settings.solver)
    if settings.batch_size < 1 or settings.num_steps < 1:
        raise MdgenError(f"batch_size and num_steps must be >= 1, got {settings.batch_size} and {settings.num_steps}")
    check_tokenizer(gen, tokenizer)
    user_ids = list(gen.user_map.user_ids if user_ids is None else user_ids)
    if not user_ids:
        raise MdgenError("no user ids given")
    if len(set(user_ids)) != len(user_ids):
        raise MdgenError(f"user ids repeat: {user_ids}")
    if num_samples_per_user < 1:
        raise MdgenError(f"num_samples_per_user must be >= 1, got {num_samples_per_user}")
    gen.labels_of_users(user_ids)  # refuse bad ids before any work
    final = Path(output_dir)
    state = PartialState(cpu=gen.device.type == "cpu")  # cpu=True: several CPU processes use gloo
    if state.is_main_process:
        claim_output_dir(final, overwrite)
    state.wait_for_everyone()
    out = _staging_dir(final)  # every process writes here; swapped in when complete

    jobs = [
        (uid, k, image_seed(settings.seed, uid, k)) for uid in user_ids for k in range(1, num_samples_per_user + 1)
    ]
    started = time.time()
    try:
        with state.split_between_processes(jobs) as my_jobs:
            records = _generate_shard(gen, tokenizer, out, list(my_jobs), settings, export_dataset,
                                      progress and state.is_main_process)
    except BaseException:
        if state.is_main_process:  # nothing half-made stays; the output folder was never touched
            shutil.rmtree(out, ignore_errors=True)
        raise
    records = gather_object(records) if state.num_processes > 1 else records
    state.wait_for_everyone()
    manifest: dict[str, Any] = {}
    if state.is_main_process:
        records = sorted(records, key=lambda r: (user_ids.index(r["user_id"]), r["sample_index"]))
        grid = _write_grid(out, records, user_ids, settings)
        batches: dict[str, list[str]] = {}
        for r in records:
            batches.setdefault(r["batch"], []).append(r["file"])
        manifest = {
            "checkpoint": str(gen.checkpoint_path),
            "checkpoint_sha256": gen.checkpoint_sha256,
            "checkpoint_step": gen.step,
            "split_hash": gen.split_hash,
            "tokenizer": gen.tokenizer_identity,
            "tokenizer_path": tokenizer_path,
            "user_map": gen.user_map.to_json(),
            "latent_shape": list(gen.latent_shape),
            "settings": settings.to_json(),
            "user_ids": [int(u) for u in user_ids],
            "num_samples_per_user": int(num_samples_per_user),
            "images": records,
            "batches": batches,
            "grid": grid,
            "dataset_dir": "dataset" if export_dataset else None,
            "num_processes": state.num_processes,
            "seconds": round(time.time() - started, 3),
        }
        atomic_write_json(out / MANIFEST_NAME, manifest)
        trust.fsync_tree(out)
        _swap_in(out, final)
    state.wait_for_everyone()
    return manifest


def _generate_shard(gen, tokenizer, out: Path, jobs, settings: SamplingSettings, export: bool, progress: bool):
    """Sample and decode this process's jobs batch by batch; write each image as soon as it exists."""
    rank = PartialState(cpu=gen.device.type == "cpu").process_index
    records = []
    bs = settings.batch_size
    for b, start in enumerate(tqdm(range(0, len(jobs), bs), desc="generating", unit="batch", disable=not progress)):
        batch = jobs[start : start + bs]
        latents, nfes = sample_latents(gen, [j[0] for j in batch], [j[2] for j in batch], settings, return_nfe=True)
        trust.require_finite(latents, f"sampled latents of users {sorted({j[0] for j in batch})}")
        images = decode_to_uint8(tokenizer, latents, batch_size=bs)
        for (uid, k, seed), image, nfe in zip(batch, images, nfes):
            name = image_name(uid, k)
            write_png(out / name, image)
            record = {"file": name, "user_id": int(uid), "sample_index": int(k), "seed": int(seed), "nfe": nfe,
                      "batch": f"p{rank}b{b}"}
            if export:
                folder = trust.safe_component(gen.user_map.folder_of_user(uid), "user folder name")
                rel = f"dataset/{folder}/{export_name(k)}"
                write_dataset_jpeg(trust.inside(out, rel, "export path"), image)
                record["dataset_file"] = rel
            records.append(record)
    return records


def _manifest_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest says its folder holds (relative paths)."""
    files = [MANIFEST_NAME] + ([manifest["grid"]] if manifest.get("grid") else [])
    for r in manifest.get("images", []):
        files.append(r["file"])
        if r.get("dataset_file"):
            files.append(r["dataset_file"])
    return files


def _staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def claim_output_dir(out: Path, overwrite: bool) -> Path:
    """Check that this run may own `out` and return an empty staging folder beside it.

    Refused: a file; a non-empty folder without `overwrite`; with it, files that the folder's
    manifest does not list (they are never deleted). Everything is written to the staging folder
    and swapped in by `_swap_in` at the end, so a killed run leaves `out` as it was."""
    if out.exists() and not out.is_dir():
        raise MdgenError(f"--output_dir {out} is a file; give a folder for the generated images")
    present = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
    if present and not overwrite:
        raise MdgenError(f"--output_dir {out} is not empty ({len(present)} files); pass --overwrite to replace a "
                         "previous generation there, or choose an empty folder")
    if present:
        old = read_json(out / MANIFEST_NAME) if (out / MANIFEST_NAME).is_file() else {}
        owned = {trust.inside(out, f, "manifest entry") for f in _manifest_files(old)} if old else set()
        foreign = [p for p in present if p.resolve() not in owned]
        if foreign:
            shown = ", ".join(str(p.relative_to(out)) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise MdgenError(f"--output_dir {out} holds {len(foreign)} files that no previous manifest lists ({shown}); "
                             "they are not removed: choose an empty folder or move them")
    stage = _staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)  # what a killed run left
    stage.mkdir(parents=True)
    return stage


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` (a previous generation, already checked by claim_output_dir) with `stage`."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    stage.rename(out)
    trust.fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_grid(out: Path, records, user_ids, settings: SamplingSettings) -> str:
    """Rows = users (labelled), up to GRID_MAX_COLUMNS samples each, read back from the PNGs."""
    by_user: dict[int, list] = {uid: [] for uid in user_ids}
    for r in records:
        if len(by_user[r["user_id"]]) < GRID_MAX_COLUMNS:
            by_user[r["user_id"]].append(read_png(out / r["file"]).permute(1, 2, 0).numpy())
    title = (
        f"generated: guidance {settings.guidance_scale:g}, {settings.num_steps} steps "
        f"{normalize_solver(settings.solver)}, seed {settings.seed}"
    )
    save_figure(user_grid(by_user, title), out / GRID_NAME)
    return GRID_NAME


def regenerate_image(gen: Generator, tokenizer, manifest: dict[str, Any] | str | Path, file_name: str,
                     exact: bool = True) -> torch.Tensor:
    """Recompute one image of a manifest, as uint8 (3, H, W).

    Its noise depends only on its seed, so sampling it alone gives the same image up to float
    round-off: batched CPU/GPU kernels (gemv for one row, gemm for several) sum in a different
    order, about 1e-6 in the latents, which can move a rare pixel by one grey level. With
    `exact=True` the image's original batch (recorded in the manifest) is re-sampled, which gives
    the same bytes on the same kind of device; `exact=False` samples the image alone (faster).
    """
    if not isinstance(manifest, dict):
        manifest = read_json(manifest)
    if manifest["checkpoint_sha256"] != gen.checkpoint_sha256:
        raise ArtifactMismatchError(
            f"the manifest was made with checkpoint sha256 {manifest['checkpoint_sha256'][:12]}..., "
            f"this generator is {gen.checkpoint_sha256[:12]}... ({gen.checkpoint_path})"
        )
    check_tokenizer(gen, tokenizer)
    by_file = {r["file"]: r for r in manifest["images"]}
    if file_name not in by_file:
        raise MdgenError(f"{file_name} is not listed in the manifest")
    files = manifest["batches"][by_file[file_name]["batch"]] if exact else [file_name]
    records = [by_file[f] for f in files]
    settings = dataclasses.replace(SamplingSettings.from_json(manifest["settings"]), batch_size=len(records))
    latents = sample_latents(gen, [r["user_id"] for r in records], [r["seed"] for r in records], settings)
    return decode_to_uint8(tokenizer, latents, batch_size=len(records))[files.index(file_name)]


# --------------------------------------------------------------------------------------------
# CLI


def add_cli_arguments(parser) -> None:
    parser.add_argument("--dit_checkpoint", required=True, help="training RUN directory or its ema.safetensors")
    parser.add_argument(
        "--vavae_path", "--tokenizer", dest="tokenizer", required=True,
        help="tokenizer file the model was trained with (VA-VAE checkpoint or stand-in .safetensors)",
    )
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs, grid and manifest.json")
    parser.add_argument("--user_ids", type=int, nargs="+", default=None, help="1-based user ids (default: all)")
    parser.add_argument("--num_samples_per_user", type=int, default=4)
    add_arguments(parser, SamplingSettings, types_={
        "solver": {"choices": sorted(SOLVERS)}, "weights": {"choices": list(checkpoints.WEIGHTS)},
        "guidance_interval": {"type": float, "nargs": 2, "metavar": ("START", "END")}})
    parser.add_argument("--export_dataset", action="store_true", help="also write dataset/ID_k/gen_NNNN.jpg")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous generation in --output_dir (only the files its manifest lists)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... for one process (default: Accelerate's device for each process)")
    parser.add_argument("--no_progress", action="store_true")


def cli_main(args) -> int:
    # Under `accelerate launch` / torchrun each process gets its own device from Accelerate.
    device = torch.device(args.device) if args.device else PartialState(cpu=not torch.cuda.is_available()).device
    sampling = apply(SamplingSettings(), given(args, SamplingSettings))
    gen = load_generator(args.dit_checkpoint, device, sampling.weights)
    if not Path(args.tokenizer).exists():
        raise MdgenError(f"tokenizer file {args.tokenizer} does not exist")
    tokenizer = load_tokenizer(args.tokenizer, device)
    manifest = generate_images(
        gen, tokenizer, args.output_dir, args.user_ids, args.num_samples_per_user, sampling,
        export_dataset=args.export_dataset, tokenizer_path=str(args.tokenizer), progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if manifest:
        print(f"wrote {len(manifest['images'])} images, {GRID_NAME} and {MANIFEST_NAME} to {args.output_dir}")
    return 0
