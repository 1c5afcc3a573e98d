"""Tokenizers: images (3, 256, 256) in [-1, 1] <-> latents (32, 16, 16).

Two implementations share one small interface (`Tokenizer`):

* `VAVAETokenizer` wraps the official-compatible VA-VAE f16d32 (`mdgen_helpers.vavae`), the
  tokenizer LightningDiT was designed for. It needs the downloaded checkpoint.
* `PatchPCATokenizer` is the weight-free stand-in: a *linear codec*, not a learned perceptual
  VAE. Every non-overlapping 16x16x3 patch (768 numbers) is projected on the 32 leading
  principal components of training patches, so the latent grid is 16x16 with 32 channels, the
  same shape as VA-VAE's. It is fitted on the training images in seconds on a CPU and lets the
  whole pipeline run (and be tested) without any download. Its encoder is deterministic, so the
  "posterior std" it returns is all zeros.

Every tokenizer has a stable `identity` string (kind + weights hash) that is stored with every
latent file, model and generated set, so that latents from one tokenizer are never decoded with
another.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from mdgen_helpers import io
from mdgen_helpers.errors import CheckpointError, DataError

LATENT_SHAPE = (32, 16, 16)
IMAGE_SIZE = 256
STANDIN_KIND = "mdgen-standin-patch-pca-v1"


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """Compute dtype for a device: fp32 on CPU, bf16 on CUDA with compute capability >= 8 (A100,
    H100, ...), fp16 below (T4, P100). Decided by the capability, never by
    `torch.cuda.is_bf16_supported()`, which says True on a T4 where bf16 is only emulated (slow)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"tokenizer expects images of shape (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
            f"got {tuple(images.shape)}; load images with mdgen_helpers.data.load_image"
        )
    return images


def _check_latents(latents: torch.Tensor) -> torch.Tensor:
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
        raise DataError(f"tokenizer expects latents of shape (B, {', '.join(map(str, LATENT_SHAPE))}), got {tuple(latents.shape)}")
    return latents


class Tokenizer:
    """The interface every stage uses: `encode`, `decode`, `identity`, `latent_shape`, `to`.

    `encode(images) -> (mean, std)`: float32 tensors (B, 32, 16, 16) on the tokenizer's device.
    `decode(latents) -> images`: float32 (B, 3, 256, 256) clamped to [-1, 1].
    `dtype` is the compute dtype used inside encode/decode; inputs and outputs stay float32.
    """

    identity: str
    latent_shape: tuple[int, int, int] = LATENT_SHAPE
    image_size: int = IMAGE_SIZE
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "Tokenizer":
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, device={self.device}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------
# VA-VAE
# --------------------------------------------------------------------------------------------


class VAVAETokenizer(Tokenizer):
    """The frozen VA-VAE f16d32 (`mdgen_helpers.vavae`).

    Mixed precision follows `vavae`'s own design rather than torch.autocast: the weights are held
    in the compute dtype (fp16 on T4-class GPUs, bf16 on compute capability >= 8, fp32 on CPU) and
    the model keeps GroupNorm and attention in float32 internally, where fp16 would overflow.
    Half-precision weights also halve the memory next to the DiT. Inputs and outputs are float32.
    """

    def __init__(self, model: torch.nn.Module, identity: str, device="cpu", dtype: torch.dtype | None = None):
        self.model = model.eval().requires_grad_(False)
        self.identity = identity
        self._fixed_dtype = dtype
        self.to(device)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype: torch.dtype | None = None) -> "VAVAETokenizer":
        from mdgen_helpers import vavae

        model = vavae.load_vavae(path)  # float32 on the CPU; `to` picks device and dtype
        return cls(model, model.identity, device=device, dtype=dtype)

    def to(self, device) -> "VAVAETokenizer":
        self.device = torch.device(device)
        self.dtype = self._fixed_dtype or compute_dtype(self.device)
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def encode(self, images):
        images = _check_images(images).to(self.device, torch.float32)
        posterior = self.model.encode(images)
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents):
        latents = _check_latents(latents).to(self.device, torch.float32)
        return self.model.decode(latents).float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Weight-free stand-in: patch-wise PCA
# --------------------------------------------------------------------------------------------


def images_to_patches(images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, 3*p*p), patches in row-major order (row = Doppler, col = time)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def patches_to_images(patches: torch.Tensor, patch: int = 16, channels: int = 3) -> torch.Tensor:
    """Inverse of `images_to_patches` for square images."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    x = patches.reshape(b, g, g, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, g * patch, g * patch)


class PatchPCATokenizer(Tokenizer):
    """Linear stand-in codec: latent[:, k, i, j] = <patch(i, j) - patch_mean, component_k>.

    The components are orthonormal, so decoding is the transpose and the latent space is an
    isometry of the kept pixel subspace: a latent error of size e is a pixel error of size e.
    The components are NOT whitened. Whitening here would be redundant: the pipeline normalises
    every latent channel with its train mean/std before the diffusion model (`latents.load_stats`),
    which gives the model unit-variance channels exactly as whitening would, while the stored
    latents keep their physical scale (channel k's variance is the k-th eigenvalue, so the files
    show how much image energy each channel carries). What does help the model is that PCA
    channels are decorrelated, so it does not have to learn cross-channel redundancy.

    Not a perceptual VAE: fine texture beyond 32 components per patch is lost (blur), and the
    latent space has no KL regulariser or semantic alignment. `encode` is deterministic; its
    std output is zeros.

    Measured on simulated spectrograms (31 users, benchmarks/bench_extract.py): about 22 dB PSNR,
    SSIM 0.64 on held-out images. It does not reach 25 dB, and no 32-of-768 code can by much:
    the speckle of the noise floor is independent per pixel, and a Gaussian blur of sigma 1 px
    alone already costs the same images down to ~25 dB. Variants tried and dropped: a per-position
    patch mean (no gain) and a least-squares decoder reading the 3x3 latent neighbourhood
    (+0.3 dB, not worth a second code path). The torso line and limb envelopes survive; fine speckle
    does not. Use the VA-VAE for image quality; use this to run and test the pipeline anywhere.
    """

    def __init__(self, components: torch.Tensor, patch_mean: torch.Tensor, eigenvalues: torch.Tensor,
                 meta: dict | None = None, device="cpu"):
        d, k = components.shape
        if (d, k) != (3 * 16 * 16, LATENT_SHAPE[0]) or patch_mean.shape != (d,) or eigenvalues.shape != (k,):
            raise CheckpointError(
                f"stand-in tokenizer tensors have wrong shapes: components {tuple(components.shape)} "
                f"(expected (768, 32)), patch_mean {tuple(patch_mean.shape)}, eigenvalues {tuple(eigenvalues.shape)}"
            )
        self.components = components.float().contiguous()
        self.patch_mean = patch_mean.float().contiguous()
        self.eigenvalues = eigenvalues.float().contiguous()
        self.meta = dict(meta or {})
        self.identity = f"{STANDIN_KIND}:{self._tensor_hash()}"
        self.to(device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"components": self.components, "patch_mean": self.patch_mean, "eigenvalues": self.eigenvalues}

    def _tensor_hash(self) -> str:
        """sha256 over name, shape and float32 bytes of each tensor: same weights, same identity."""
        parts = []
        for name, t in sorted(self.tensors().items()):
            t = t.detach().cpu().float().contiguous()
            parts.append(f"{name}:{tuple(t.shape)}:".encode() + t.numpy().tobytes())
        return io.sha256_bytes(b"|".join(parts))[:16]

    def to(self, device) -> "PatchPCATokenizer":
        self.device = torch.device(device)
        self.dtype = torch.float32  # a 768x32 matmul: reduced precision saves nothing and costs PSNR
        self.components = self.components.to(self.device)
        self.patch_mean = self.patch_mean.to(self.device)
        self.eigenvalues = self.eigenvalues.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, images):
        images = _check_images(images).to(self.device, torch.float32)
        z = (images_to_patches(images) - self.patch_mean) @ self.components  # (B, 256, 32)
        b = z.shape[0]
        mean = z.reshape(b, 16, 16, 32).permute(0, 3, 1, 2).contiguous()
        return mean, torch.zeros_like(mean)

    @torch.no_grad()
    def decode(self, latents):
        latents = _check_latents(latents).to(self.device, torch.float32)
        b = latents.shape[0]
        z = latents.permute(0, 2, 3, 1).reshape(b, 256, 32)
        patches = z @ self.components.T + self.patch_mean
        return patches_to_images(patches).clamp(-1.0, 1.0)

    def save(self, path) -> Path:
        meta = {"kind": STANDIN_KIND, "identity": self.identity, "latent_shape": list(LATENT_SHAPE),
                "image_size": IMAGE_SIZE, "patch_size": 16, **{k: v for k, v in self.meta.items() if k not in ("kind", "identity")}}
        return io.atomic_save_safetensors(self.tensors(), path, meta)

    @classmethod
    def load(cls, path, device="cpu") -> "PatchPCATokenizer":
        from safetensors.torch import load_file

        meta = io.load_safetensors_metadata(path)
        if meta.get("kind") != STANDIN_KIND:
            raise CheckpointError(f"{path} is not a stand-in tokenizer file (metadata kind={meta.get('kind')!r}, expected {STANDIN_KIND!r})")
        t = load_file(str(path))
        missing = {"components", "patch_mean", "eigenvalues"} - set(t)
        if missing:
            raise CheckpointError(f"stand-in tokenizer {path} lacks tensors {sorted(missing)}; refit it with `python -m mdgen_helpers fit-tokenizer`")
        tok = cls(t["components"], t["patch_mean"], t["eigenvalues"], meta=meta, device=device)
        if meta.get("identity") and meta["identity"] != tok.identity:
            raise CheckpointError(f"stand-in tokenizer {path} is corrupt: stored identity {meta['identity']} != hash of its tensors {tok.identity}")
        return tok


def _iter_images(data, num_images: int, seed: int) -> tuple[Iterable[torch.Tensor], int]:
    """Images from a map-style dataset (a seeded random subset) or from any iterable (the first
    `num_images`). Items may be tensors or tuples whose first entry is the image."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data)
        if n == 0:
            raise DataError("cannot fit the stand-in tokenizer: the training set is empty")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)[: min(num_images, n)].sort().values.tolist()
        return (data[i] for i in order), len(order)
    it = iter(data)
    return (x for _, x in zip(range(num_images), it)), num_images


def fit_standin(data, num_images: int = 512, seed: int = 0, progress: bool = True,
                batch_size: int = 32, meta: dict | None = None) -> PatchPCATokenizer:
    """Fit the patch-PCA stand-in on training images (never val/test: they must stay unseen).

    Every 16x16x3 patch of `num_images` images (a seeded random subset of a dataset, or the first
    ones of an iterable) enters a covariance accumulated batch by batch in float64; the 32 leading
    eigenvectors (torch.linalg.eigh) are the components. Signs are fixed (largest entry positive)
    so that the same images give the same file and identity on every machine.
    """
    from tqdm.auto import tqdm

    images, total = _iter_images(data, num_images, seed)
    d = 768
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    n_images = 0
    batch: list[torch.Tensor] = []

    def flush():
        nonlocal count
        x = images_to_patches(_check_images(torch.stack(batch).float())).reshape(-1, d)
        s1.add_(x.double().sum(0))
        s2.add_((x.T @ x).double())  # float32 matmul (fast), float64 running sums (exact enough)
        count += x.shape[0]
        batch.clear()

    for item in tqdm(images, total=total, desc="fit stand-in tokenizer", disable=not progress):
        img = item[0] if isinstance(item, (tuple, list)) else item
        batch.append(img)
        n_images += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n_images < 2:
        raise DataError(f"cannot fit the stand-in tokenizer on {n_images} image(s); it needs at least 2 training images")

    mu = s1 / count
    cov = s2 / count - torch.outer(mu, mu)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:32], evecs.flip(1)[:, :32]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * sign
    info = {"fit_num_images": n_images, "fit_seed": seed, "fit_num_patches": count,
            "explained_variance_fraction": float(evals.sum() / cov.diagonal().sum()), **(meta or {})}
    return PatchPCATokenizer(evecs.float(), mu.float(), evals.clamp_min(0).float(), meta=info)


def standin_is_current(path, split, seed: int = 0, num_images: int = 512) -> bool:
    """True if `path` is a stand-in fitted on `split`'s train part with this seed and size."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = io.load_safetensors_metadata(path)
    except Exception:  # unreadable: refit over it
        return False
    return (meta.get("kind") == STANDIN_KIND and meta.get("split_hash") == split.hash
            and meta.get("fit_seed") == seed and meta.get("fit_requested_images") == num_images)


def ensure_standin(data_dir, split, path, seed: int = 0, num_images: int = 512, device="cpu",
                   progress: bool = True, force: bool = False) -> PatchPCATokenizer:
    """Load `path` if it is a stand-in fitted on this split's train part with these settings,
    else fit it on the train images and save it (atomically). Refitting gives the same file, so
    this only saves time; a changed split or seed refits, so stale weights are never reused."""
    from mdgen_helpers import data

    path = Path(path)
    if not force and standin_is_current(path, split, seed, num_images):
        return PatchPCATokenizer.load(path, device=device)
    data.check_split(split, data_dir)
    tok = fit_standin(data.ImageDataset(data_dir, split, "train"), num_images=num_images, seed=seed, progress=progress,
                      meta={"split_hash": split.hash, "user_map": split.user_map.to_json(),
                            "fit_requested_images": num_images})
    tok.save(path)
    return tok.to(device)


# --------------------------------------------------------------------------------------------
# Loading by content
# --------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict, list[str]] | None:
    """(metadata, keys) if `path` is a safetensors file, else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception:
        return None


def load_tokenizer(path, device="cpu") -> Tokenizer:
    """Open a tokenizer file by its content, not its name: a stand-in `.safetensors` (metadata
    kind), a VA-VAE safetensors (encoder/decoder keys), or an official VA-VAE `.pt`/`.ckpt`
    (a torch zip or pickle, read by `vavae.load_vavae` with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"tokenizer file {path} does not exist; pass the VA-VAE checkpoint (vavae-imagenet256-f16d32-dinov2.pt "
            "or its safetensors copy) or fit the stand-in with `python -m mdgen_helpers fit-tokenizer`"
        )
    header = _safetensors_header(path)
    if header is not None:
        meta, keys = header
        if meta.get("kind") == STANDIN_KIND:
            return PatchPCATokenizer.load(path, device=device)
        if any(k.startswith(("encoder.", "decoder.", "state_dict.encoder.", "model.encoder.")) for k in keys):
            return VAVAETokenizer.from_checkpoint(path, device=device)
        raise CheckpointError(
            f"{path} is a safetensors file but neither a stand-in tokenizer (metadata kind={meta.get('kind')!r}) "
            f"nor a VA-VAE (no encoder.*/decoder.* keys; first keys: {keys[:3]})"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # torch zip archive or legacy pickle
        return VAVAETokenizer.from_checkpoint(path, device=device)
    raise CheckpointError(
        f"{path} is not a tokenizer file this project knows (not safetensors, not a torch checkpoint); "
        "expected the VA-VAE f16d32 checkpoint or a stand-in written by `fit-tokenizer`"
    )


# --------------------------------------------------------------------------------------------
# Reconstruction quality
# --------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak = 1 after mapping to [0, 1])."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03,
    data range 1 (images mapped from [-1, 1] to [0, 1]), valid-window mean over pixels and
    channels. Same formula as skimage's `structural_similarity(gaussian_weights=True)` up to border handling.
    Computed in float64: var = E[x^2] - E[x]^2 cancels, and float32 round-off is then not
    negligible next to C2 = 9e-4 (it shifts SSIM in the 4th digit). Returned as float32."""
    a = (a.double() + 1) / 2
    b = (b.double() + 1) / 2
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g).expand(c, 1, window, window).contiguous()

    def filt(t):
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def _dataset_labels(dataset) -> list[int]:
    """Labels without decoding images when the dataset lists them (data.ImageDataset.file_labels)."""
    for attr in ("file_labels", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset):
            return [int(l) for l in labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]


@torch.no_grad()
def reconstruction_report(tokenizer: Tokenizer, dataset, per_user: int = 4, batch_size: int = 16,
                          user_map=None, num_examples: int = 8) -> dict:
    """Encode+decode the first `per_user` images of each user of `dataset` (items (image, label,
    index)); PSNR/SSIM per user and overall. `examples` holds up to `num_examples` (original,
    reconstruction) pairs (float tensors in [-1, 1], one per user first) for plotting; every
    other entry is JSON-able."""
    labels = _dataset_labels(dataset)
    chosen: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        if len(chosen.setdefault(lab, [])) < per_user:
            chosen[lab].append(i)
    order = [i for lab in sorted(chosen) for i in chosen[lab]]
    if not order:
        raise DataError("reconstruction_report: the dataset is empty")
    scores_p, scores_s, labs, origs, recs = [], [], [], [], []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        items = [dataset[i] for i in idx]
        x = torch.stack([it[0] for it in items]).float()
        mean, _ = tokenizer.encode(x)
        y = tokenizer.decode(mean).cpu()
        scores_p.append(psnr(x, y))
        scores_s.append(ssim(x, y))
        labs += [int(it[1]) for it in items]
        origs.append(x)
        recs.append(y)
    p, s = torch.cat(scores_p), torch.cat(scores_s)
    labs_t = torch.tensor(labs)
    per = {}
    for lab in sorted(chosen):
        m = labs_t == lab
        key = str(user_map.user_of_label(lab)) if user_map is not None else str(lab + 1)
        per[key] = {"label": lab, "n": int(m.sum()), "psnr": float(p[m].mean()), "ssim": float(s[m].mean())}
    # examples: one image per user first, so a small grid shows every user
    first = [labs.index(lab) for lab in sorted(chosen)]
    ex = (first + [i for i in range(len(labs)) if i not in first])[:num_examples]
    origs_t, recs_t = torch.cat(origs), torch.cat(recs)
    return {
        "tokenizer": tokenizer.identity,
        "num_images": len(labs),
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "psnr_min": float(p.min()),
        "per_user": per,
        "examples": {"original": origs_t[ex], "reconstruction": recs_t[ex], "labels": [labs[i] for i in ex]},
    }


# --------------------------------------------------------------------------------------------
# CLI: fit-tokenizer
# --------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", required=True, help="data set root with ID_k/ folders")
    parser.add_argument("--split", required=True, help="persisted split.json (the stand-in is fitted on its train part only)")
    parser.add_argument("--out", required=True, help="output .safetensors path, e.g. WORK/tokenizer.safetensors")
    parser.add_argument("--num_images", type=int, default=512, help="training images used for the fit (seeded random subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_per_user", type=int, default=2, help="val images per user for the PSNR/SSIM printout (0: skip)")
    parser.add_argument("--force", action="store_true", help="refit even if --out was fitted with the same inputs")


def cli_main(args) -> int:
    from mdgen_helpers import data

    split = data.load_split(args.split)
    data.check_split(split, args.data_dir)
    out = Path(args.out)
    if not args.force and standin_is_current(out, split, args.seed, args.num_images):
        print(f"{out} already fitted on this split with these settings "
              f"(identity {PatchPCATokenizer.load(out).identity}); use --force to refit")
        return 0
    tok = ensure_standin(args.data_dir, split, out, seed=args.seed, num_images=args.num_images, force=True)
    print(f"wrote {out}: identity {tok.identity}, {tok.meta['fit_num_images']} train images, "
          f"explained variance {tok.meta['explained_variance_fraction']:.4f}")
    if args.report_per_user > 0 and split.files("val"):
        rep = reconstruction_report(tok, data.ImageDataset(args.data_dir, split, "val"),
                                    per_user=args.report_per_user, user_map=split.user_map)
        print(f"val reconstruction ({rep['num_images']} images): PSNR {rep['psnr']:.2f} dB "
              f"(min {rep['psnr_min']:.2f}), SSIM {rep['ssim']:.4f}")
    return 0
