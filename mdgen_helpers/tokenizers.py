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
* `ColormapPCATokenizer` is the default stand-in for colormapped spectrograms: it inverts the
  colormap (nearest LUT colour) to one scalar per pixel, does the same patch PCA on 16x16 scalar
  patches, and decodes the scalar back to colour through a decode table fitted on the training
  images. Same latent contract, ~2 dB better PSNR and colours that stay on the colormap.

Every tokenizer has a stable `identity` string (kind + weights hash) that is stored with every
latent file, model and generated set, so that latents from one tokenizer are never decoded with
another.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mdgen_helpers import data, vavae
from mdgen_helpers.colormap import colormap_index, colormap_lut_tensor
from mdgen_helpers.env import mixed_precision_for
from mdgen_helpers.errors import CheckpointError, DataError
from mdgen_helpers.files import atomic_save_safetensors, load_safetensors_metadata, read_json, sha256_bytes
from mdgen_helpers.metrics import psnr, ssim

LATENT_SHAPE = (32, 16, 16)
IMAGE_SIZE = 256
STANDIN_KIND = "mdgen-standin-patch-pca-v1"  # the RGB patch-PCA stand-in (kind="rgb-pca")
COLORMAP_STANDIN_KIND = "mdgen-standin-colormap-pca-v1"  # the colormap-aware stand-in (kind="colormap-pca")
STANDIN_KINDS = {"rgb-pca": STANDIN_KIND, "colormap-pca": COLORMAP_STANDIN_KIND}
DEFAULT_STANDIN = "colormap-pca"
# Mean distance (RGB in [0, 1]) from the fit images' pixels to the nearest colormap colour above
# which the colormap stand-in warns. Simulated JPEG jet spectrograms measure ~0.04 (JPEG chroma
# subsampling moves colours off the curve); uniform random colours measure ~0.2.
COLORMAP_FIT_WARN_DISTANCE = 0.1


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """Compute dtype for a device: fp32 on CPU; on CUDA the project's one rule
    (`env.mixed_precision_for`: bf16 on compute capability >= 8, fp16 below, e.g. a T4)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    mode = mixed_precision_for(torch.cuda.get_device_capability(device))
    return torch.bfloat16 if mode == "bf16" else torch.float16


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

    def _store(self, kind: str, tensors: dict[str, torch.Tensor], meta: dict | None, device) -> None:
        """Keep a fitted tokenizer's tensors (float32, contiguous) and its metadata; its identity is
        `kind` plus the hash of those tensors, so equal tensors mean the same latents."""
        for name, t in tensors.items():
            setattr(self, name, t.float().contiguous())
        self.meta = dict(meta or {})
        self.identity = f"{kind}:{_tensor_hash(self.tensors())}"
        self.to(device)


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


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over name, shape and float32 bytes of each tensor: same weights, same identity."""
    parts = []
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().float().contiguous()
        parts.append(f"{name}:{tuple(t.shape)}:".encode() + t.numpy().tobytes())
    return sha256_bytes(b"|".join(parts))[:16]


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
    std output is zeros. For jet-like spectrograms `ColormapPCATokenizer` (the default stand-in)
    does better; this one stays for images of any colours (`fit_standin(kind="rgb-pca")`).

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
        self._store(STANDIN_KIND, {"components": components, "patch_mean": patch_mean, "eigenvalues": eigenvalues},
                    meta, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"components": self.components, "patch_mean": self.patch_mean, "eigenvalues": self.eigenvalues}

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
        return atomic_save_safetensors(self.tensors(), path, meta)

    @classmethod
    def load(cls, path, device="cpu") -> "PatchPCATokenizer":
        meta = load_safetensors_metadata(path)
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


# --------------------------------------------------------------------------------------------
# Weight-free stand-in for colormapped spectrograms: patch PCA of the colormap scalar
# --------------------------------------------------------------------------------------------

TABLE_BINS = (256, 16)  # decode table: decoded scalar bins x local-mean (9x9) bins
TABLE_BLUR = 9


def arc_length_scalar(lut: torch.Tensor) -> torch.Tensor:
    """(256,) in [0, 1]: distance travelled along the colormap curve up to each LUT entry. A
    scalar error then costs about the same RGB error anywhere on the curve (jet's middle third
    moves two channels at once and would otherwise be under-weighted by the PCA)."""
    step = (lut[1:] - lut[:-1]).norm(dim=1)
    arc = torch.cat([torch.zeros(1), step.cumsum(0)])
    return arc / arc[-1] if arc[-1] > 0 else torch.linspace(0, 1, len(lut))


def _blur(s: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(s.unsqueeze(1), TABLE_BLUR, 1, TABLE_BLUR // 2, count_include_pad=False)[:, 0]


def _table_keys(s: torch.Tensor) -> torch.Tensor:
    """Decode-table row of each pixel from its decoded scalar and the 9x9 mean around it."""
    n1, n2 = TABLE_BINS
    b1 = (s.clamp(0, 1) * (n1 - 1)).round().long()
    b2 = (_blur(s).clamp(0, 1) * (n2 - 1)).round().long()
    return b1 * n2 + b2


class ColormapPCATokenizer(Tokenizer):
    """Stand-in codec for colormapped images: latent[:, k, i, j] = <s_patch(i, j) - patch_mean,
    component_k>, where s is the colormap scalar (nearest LUT colour, as arc length along the
    colormap) and the components are the 32 leading principal components of 16x16 scalar patches.

    Why: a jet spectrogram's colours lie on a 1-D curve in RGB, so RGB patch PCA spends components
    on that curvature and decodes to colours off the colormap. Here the 32 numbers per patch
    describe one scalar per pixel (256 dims, 97% of the variance kept instead of spreading over
    768). Decoding maps the scalar back to colour with a table fitted on the training images: the
    mean training colour for each (decoded scalar, 9x9 local mean of the decoded scalar) bin,
    shrunk towards the colormap colour where few pixels fell. That table is the MSE-optimal
    colour for what the latent still knows (it blends colours where speckle made the scalar
    uncertain, and learns JPEG's colour shifts), and it is why the PSNR gain is ~2 dB rather than
    0 (re-rendering the decoded scalar through the plain LUT gives no PSNR gain, only SSIM).
    Decoding is not differentiable (table lookup) and a latent edit reaches 4 px beyond its patch.

    Assumes images rendered through a jet-like colormap: any RGB image is accepted (each pixel
    takes its nearest colormap colour), but colours far from the colormap are lost; `fit_standin`
    warns when the training images are far from it. Use kind="rgb-pca" for such data.

    Measured on simulated spectrograms (6 users x 30, benchmarks/bench_extract.py): ~24.9 dB
    PSNR, SSIM 0.85 on held-out images, against ~22.7 dB / 0.67 for the RGB stand-in fitted on the
    same images. Still short of 25 dB: speckle is independent per pixel, and even the exact scalar
    re-rendered through the LUT is capped near 27 dB by JPEG's off-curve colours. Tried and dropped:
    a clamp-aware iterative encoder (+0.1 dB) and a 1-D decode table (-0.5 dB).
    """

    def __init__(self, components: torch.Tensor, patch_mean: torch.Tensor, eigenvalues: torch.Tensor,
                 lut: torch.Tensor, scalar_of_index: torch.Tensor, decode_table: torch.Tensor,
                 meta: dict | None = None, device="cpu"):
        shapes = {"components": (components.shape, (256, 32)), "patch_mean": (patch_mean.shape, (256,)),
                  "eigenvalues": (eigenvalues.shape, (32,)), "lut": (lut.shape, (256, 3)),
                  "scalar_of_index": (scalar_of_index.shape, (256,)),
                  "decode_table": (decode_table.shape, (TABLE_BINS[0] * TABLE_BINS[1], 3))}
        bad = {k: (tuple(got), want) for k, (got, want) in shapes.items() if tuple(got) != want}
        if bad:
            raise CheckpointError(f"colormap stand-in tensors have wrong shapes (got, expected): {bad}")
        self._store(COLORMAP_STANDIN_KIND, {"components": components, "patch_mean": patch_mean, "eigenvalues": eigenvalues,
                                            "lut": lut, "scalar_of_index": scalar_of_index, "decode_table": decode_table},
                    meta, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"components": self.components, "patch_mean": self.patch_mean, "eigenvalues": self.eigenvalues,
                "lut": self.lut, "scalar_of_index": self.scalar_of_index, "decode_table": self.decode_table}

    def to(self, device) -> "ColormapPCATokenizer":
        self.device = torch.device(device)
        self.dtype = torch.float32
        for name, t in self.tensors().items():
            setattr(self, name, t.to(self.device))
        return self

    def image_to_scalar(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) in [-1, 1] -> (B, 256, 256) colormap scalar in [0, 1]."""
        idx, _ = colormap_index(_check_images(images).to(self.device, torch.float32), self.lut)
        return self.scalar_of_index[idx]

    def decode_scalar(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 256, 256) decoded scalar, clamped to the colormap's range [0, 1]."""
        latents = _check_latents(latents).to(self.device, torch.float32)
        b = latents.shape[0]
        patches = latents.permute(0, 2, 3, 1).reshape(b, 256, 32) @ self.components.T + self.patch_mean
        return patches_to_images(patches, channels=1)[:, 0].clamp(0.0, 1.0)

    @torch.no_grad()
    def encode(self, images):
        s = self.image_to_scalar(images)
        z = (images_to_patches(s.unsqueeze(1)) - self.patch_mean) @ self.components  # (B, 256, 32)
        mean = z.reshape(z.shape[0], 16, 16, 32).permute(0, 3, 1, 2).contiguous()
        return mean, torch.zeros_like(mean)

    @torch.no_grad()
    def decode(self, latents):
        rgb = self.decode_table[_table_keys(self.decode_scalar(latents))]  # (B, H, W, 3)
        return rgb.permute(0, 3, 1, 2).contiguous().clamp(-1.0, 1.0)

    def save(self, path) -> Path:
        meta = {"kind": COLORMAP_STANDIN_KIND, "identity": self.identity, "latent_shape": list(LATENT_SHAPE),
                "image_size": IMAGE_SIZE, "patch_size": 16, "table_bins": list(TABLE_BINS), "table_blur": TABLE_BLUR,
                **{k: v for k, v in self.meta.items() if k not in ("kind", "identity")}}
        return atomic_save_safetensors(self.tensors(), path, meta)

    @classmethod
    def load(cls, path, device="cpu") -> "ColormapPCATokenizer":
        meta = load_safetensors_metadata(path)
        if meta.get("kind") != COLORMAP_STANDIN_KIND:
            raise CheckpointError(f"{path} is not a colormap stand-in file (metadata kind={meta.get('kind')!r}, "
                                  f"expected {COLORMAP_STANDIN_KIND!r})")
        t = load_file(str(path))
        names = ("components", "patch_mean", "eigenvalues", "lut", "scalar_of_index", "decode_table")
        missing = set(names) - set(t)
        if missing:
            raise CheckpointError(f"colormap stand-in {path} lacks tensors {sorted(missing)}; refit it with "
                                  "`python -m mdgen_helpers fit-tokenizer --kind colormap-pca`")
        tok = cls(*(t[n] for n in names), meta=meta, device=device)
        if meta.get("identity") and meta["identity"] != tok.identity:
            raise CheckpointError(f"colormap stand-in {path} is corrupt: stored identity {meta['identity']} != hash of its tensors {tok.identity}")
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


def _check_kind(kind: str) -> str:
    if kind not in STANDIN_KINDS:
        raise DataError(f"unknown stand-in kind {kind!r}; choose one of {sorted(STANDIN_KINDS)}")
    return kind


def _patch_moments(images: Iterable, total: int, d: int, to_patches, progress: bool, batch_size: int):
    """Sum and second-moment matrix of the patch vectors `to_patches(batch)` returns, accumulated
    batch by batch in float64 (float32 matmuls: fast; float64 running sums: exact enough)."""
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    n_images = 0
    batch: list[torch.Tensor] = []

    def flush():
        nonlocal count
        x = to_patches(_check_images(torch.stack(batch).float())).reshape(-1, d)
        s1.add_(x.double().sum(0))
        s2.add_((x.T @ x).double())
        count += x.shape[0]
        batch.clear()

    for item in tqdm(images, total=total, desc="fit stand-in tokenizer", disable=not progress):
        batch.append(item[0] if isinstance(item, (tuple, list)) else item)
        n_images += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n_images < 2:
        raise DataError(f"cannot fit the stand-in tokenizer on {n_images} image(s); it needs at least 2 training images")
    return s1, s2, count, n_images


def _principal_components(s1, s2, count):
    """(mean, cov, eigenvalues[:32], eigenvectors[:, :32]) with signs fixed (largest entry
    positive), so the same images give the same file and identity on every machine."""
    mu = s1 / count
    cov = s2 / count - torch.outer(mu, mu)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:32], evecs.flip(1)[:, :32]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    return mu, cov, evals, evecs * sign


def fit_standin(data, num_images: int = 512, seed: int = 0, progress: bool = True,
                batch_size: int = 32, meta: dict | None = None, kind: str = DEFAULT_STANDIN,
                colormap: str = "jet", table_images: int = 64) -> PatchPCATokenizer | ColormapPCATokenizer:
    """Fit a stand-in tokenizer on training images (never val/test: they must stay unseen).

    `kind="colormap-pca"` (default, for colormapped spectrograms) or `"rgb-pca"` (any images).
    Every patch of `num_images` images (a seeded random subset of a dataset, or the first ones of
    an iterable) enters a covariance accumulated batch by batch; the 32 leading eigenvectors
    (torch.linalg.eigh) are the components. For "colormap-pca" the patches are 16x16 colormap
    scalars, and the first `table_images` images (kept as 8-bit index maps, ~64 kB each) then fit
    the decode table; a warning says when the images are far from `colormap`.
    """
    _check_kind(kind)
    images, total = _iter_images(data, num_images, seed)
    info = {"fit_seed": seed, **(meta or {})}
    if kind == "rgb-pca":
        s1, s2, count, n_images = _patch_moments(images, total, 768, images_to_patches, progress, batch_size)
        mu, cov, evals, evecs = _principal_components(s1, s2, count)
        info = {"fit_num_images": n_images, "fit_num_patches": count,
                "explained_variance_fraction": float(evals.sum() / cov.diagonal().sum()), **info}
        return PatchPCATokenizer(evecs.float(), mu.float(), evals.clamp_min(0).float(), meta=info)

    lut = colormap_lut_tensor(colormap)
    scalar_of_index = arc_length_scalar(lut)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (index map uint8, image uint8) for the decode table
    dist_sum = 0.0
    n_pixels = 0

    def to_patches(x):
        nonlocal dist_sum, n_pixels
        idx, dist = colormap_index(x, lut)
        dist_sum += float(dist.double().sum())
        n_pixels += dist.numel()
        for i in range(min(len(x), table_images - len(kept))):
            kept.append((idx[i].to(torch.uint8), ((x[i] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)))
        return images_to_patches(scalar_of_index[idx].unsqueeze(1))

    s1, s2, count, n_images = _patch_moments(images, total, 256, to_patches, progress, batch_size)
    mu, cov, evals, evecs = _principal_components(s1, s2, count)
    mean_dist = dist_sum / n_pixels
    if mean_dist > COLORMAP_FIT_WARN_DISTANCE:
        warnings.warn(
            f"colormap stand-in: the training images are far from the {colormap!r} colormap (mean RGB distance "
            f"{mean_dist:.3f} to the nearest colormap colour, > {COLORMAP_FIT_WARN_DISTANCE}); this stand-in assumes "
            f"images rendered through a jet-like colormap and will lose their colours. Fit kind='rgb-pca' instead "
            f"(`fit-tokenizer --kind rgb-pca`).", UserWarning, stacklevel=2)

    # decode table: mean training colour per (decoded scalar, local mean) bin, shrunk towards the
    # colormap colour at that scalar with the weight of one pixel (empty bins get the colormap)
    tok = ColormapPCATokenizer(evecs.float(), mu.float(), evals.clamp_min(0).float(), lut, scalar_of_index,
                               torch.zeros(TABLE_BINS[0] * TABLE_BINS[1], 3))
    n_rows = TABLE_BINS[0] * TABLE_BINS[1]
    sums = torch.zeros(n_rows, 3, dtype=torch.float64)
    counts = torch.zeros(n_rows, dtype=torch.float64)
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        s = scalar_of_index[torch.stack([k[0] for k in chunk]).long()]
        z = (images_to_patches(s.unsqueeze(1)) - tok.patch_mean) @ tok.components
        keys = _table_keys(tok.decode_scalar(z.reshape(len(chunk), 16, 16, 32).permute(0, 3, 1, 2))).reshape(-1)
        rgb = torch.stack([k[1] for k in chunk]).permute(0, 2, 3, 1).reshape(-1, 3).double() / 127.5 - 1.0
        sums.index_add_(0, keys, rgb)
        counts.index_add_(0, keys, torch.ones_like(keys, dtype=torch.float64))
    centres = torch.linspace(0, 1, TABLE_BINS[0]).repeat_interleave(TABLE_BINS[1]).double()
    prior = torch.stack([torch.from_numpy(np.interp(centres.numpy(), scalar_of_index.double().numpy(),
                                                    lut[:, c].double().numpy())) for c in range(3)], 1)
    table = ((sums + prior) / (counts + 1.0).unsqueeze(1)).float()
    info = {"fit_num_images": n_images, "fit_num_patches": count, "colormap": colormap,
            "explained_variance_fraction": float(evals.sum() / cov.diagonal().sum()),
            "colormap_fit_distance": mean_dist, "table_num_images": len(kept), **info}
    return ColormapPCATokenizer(tok.components, tok.patch_mean, tok.eigenvalues, lut, scalar_of_index, table, meta=info)


def standin_is_current(path, split, seed: int = 0, num_images: int = 512, kind: str = DEFAULT_STANDIN) -> bool:
    """True if `path` is a stand-in of this kind fitted on `split`'s train part with this seed and size."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = load_safetensors_metadata(path)
    except Exception:  # unreadable: refit over it
        return False
    return (meta.get("kind") == STANDIN_KINDS[_check_kind(kind)] and meta.get("split_hash") == split.hash
            and meta.get("fit_seed") == seed and meta.get("fit_requested_images") == num_images)


def ensure_standin(data_dir, split, path, seed: int = 0, num_images: int = 512, device="cpu",
                   progress: bool = True, force: bool = False,
                   kind: str = DEFAULT_STANDIN) -> PatchPCATokenizer | ColormapPCATokenizer:
    """Load `path` if it is a stand-in of this kind fitted on this split's train part with these
    settings, else fit it on the train images and save it (atomically). Refitting gives the same
    file, so this only saves time; a changed split, seed or kind refits, so stale weights are
    never reused."""
    path = Path(path)
    if not force and standin_is_current(path, split, seed, num_images, kind):
        return load_tokenizer(path, device=device)
    data.check_split(split, data_dir)
    fit_meta = {"split_hash": split.hash, "user_map": split.user_map.to_json(), "fit_requested_images": num_images}
    colormap = "jet"
    radar_file = Path(data_dir) / "users.json"  # simulated data sets record their colormap
    if kind == "colormap-pca" and radar_file.is_file():
        try:
            colormap = str(read_json(radar_file).get("radar", {}).get("colormap", "jet"))
        except Exception:
            colormap = "jet"
    tok = fit_standin(data.ImageDataset(data_dir, split, "train"), num_images=num_images, seed=seed, progress=progress,
                      meta=fit_meta, kind=kind, colormap=colormap)
    tok.save(path)
    return tok.to(device)


# --------------------------------------------------------------------------------------------
# Loading by content
# --------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict, list[str]] | None:
    """(metadata, keys) if `path` is a safetensors file, else None."""
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
        if meta.get("kind") == COLORMAP_STANDIN_KIND:
            return ColormapPCATokenizer.load(path, device=device)
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


def _dataset_labels(dataset) -> list[int]:
    """Labels without decoding images when the dataset lists them (data.ImageDataset.file_labels)."""
    for attr in ("file_labels", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset):
            return [int(l) for l in labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]


@torch.no_grad()
def reconstruction_report(tokenizer: Tokenizer, dataset, user_map, per_user: int = 4, batch_size: int = 16,
                          num_examples: int = 8) -> dict:
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
        key = str(user_map.user_of_label(lab))
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
    parser.add_argument("--kind", choices=sorted(STANDIN_KINDS), default=DEFAULT_STANDIN,
                        help="colormap-pca (default): for jet-like colormapped spectrograms; rgb-pca: any RGB images")
    parser.add_argument("--report_per_user", type=int, default=2, help="val images per user for the PSNR/SSIM printout (0: skip)")
    parser.add_argument("--force", action="store_true", help="refit even if --out was fitted with the same inputs")


def cli_main(args) -> int:
    split = data.load_split(args.split)
    data.check_split(split, args.data_dir)
    out = Path(args.out)
    kind = getattr(args, "kind", DEFAULT_STANDIN)
    if not args.force and standin_is_current(out, split, args.seed, args.num_images, kind):
        print(f"{out} already fitted on this split with these settings "
              f"(identity {load_tokenizer(out).identity}); use --force to refit")
        return 0
    tok = ensure_standin(args.data_dir, split, out, seed=args.seed, num_images=args.num_images, force=True, kind=kind)
    print(f"wrote {out}: identity {tok.identity}, {tok.meta['fit_num_images']} train images, "
          f"explained variance {tok.meta['explained_variance_fraction']:.4f}")
    if args.report_per_user > 0 and split.files("val"):
        rep = reconstruction_report(tok, data.ImageDataset(args.data_dir, split, "val"),
                                    per_user=args.report_per_user, user_map=split.user_map)
        print(f"val reconstruction ({rep['num_images']} images): PSNR {rep['psnr']:.2f} dB "
              f"(min {rep['psnr_min']:.2f}), SSIM {rep['ssim']:.4f}")
    return 0
