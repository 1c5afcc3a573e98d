"""VA-VAE f16d32: the frozen tokenizer of LightningDiT, compatible with the official checkpoint.

The network is the LDM `AutoencoderKL` (Rombach et al. 2022) that hustvl/LightningDiT trains as
VA-VAE (Yao et al. 2025, "Reconstruction vs. Generation"): a convolutional encoder that maps a
(3, 256, 256) image in [-1, 1] to a diagonal Gaussian over (32, 16, 16) latents, and a decoder
that maps latents back to an image. Module and parameter names equal the official ones, so the
official `vavae-imagenet256-f16d32-dinov2.pt` loads key for key (`encoder.*`, `decoder.*`,
`quant_conv.*`, `post_quant_conv.*` inside its top-level `state_dict`).

Read top to bottom: building blocks, encoder, decoder, the posterior, the autoencoder, then the
checkpoint side (reading files safely, recognising wrong files, strict loading, the slim
safetensors copy, a random checkpoint in the official layout for CI, the identity string).

Differences from the official code, all deliberate:
- Loading is strict. The official loader keeps keys with `'foundation_model.model' and 'loss'
  not in k` (which only tests `'loss' not in k`) and calls `load_state_dict(strict=False)`, so a
  wrong file gives a randomly initialised VAE without a word. Here every missing, unexpected or
  misshapen key is an error, and common wrong kinds of file get a specific message.
- Pickles are read with `torch.load(weights_only=True)` only; a file that needs arbitrary
  unpickling is refused, never executed.
- Mixed precision: GroupNorm and the attention (scores, softmax, weighted sum) run in float32
  whatever the compute dtype, because fp16 (the T4 case) overflows above 65504: attention scores
  over 512 channels and GroupNorm statistics are where that happens first. Convolutions run in
  the compute dtype. Posterior statistics and decoded images are returned in float32.
- `decode` does not clamp, exactly like the official decoder (its output may leave [-1, 1]
  slightly); whoever turns it into pixels clamps.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from safetensors import SafetensorError, safe_open

from mdgen_helpers.errors import CheckpointError
from mdgen_helpers.files import atomic_save_safetensors, atomic_write_bytes, sha256_file

# The four parameter groups that inference needs; everything else in an official checkpoint
# (`loss.*`: LPIPS + discriminator, `foundation_model.*`: DINOv2, `linear_proj.*`: the VF-loss
# projection) is training-only.
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TRAINING_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
DEFAULT_ARCH: dict[str, Any] = dict(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32,
    embed_dim=32, resolution=256, in_channels=3, out_ch=3, dropout=0.0,
)
SLIM_FORMAT = "mdgen-vavae-slim-v1"


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back: fp16 statistics overflow on large activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalize(channels: int) -> GroupNorm32:
    # 32 groups, eps 1e-6: the LDM setting the official weights were trained with.
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (the LDM asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip (1x1 conv `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (used at 16x16 only), with 1x1-conv projections.

    Scores, softmax and the weighted sum run in float32: with 512 channels a dot product of
    moderately large activations already exceeds the fp16 range and the softmax turns into NaN.
    At 16x16 = 256 tokens this costs nothing.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C), in float32.
        q, k, v = (p(h).float().reshape(b, 1, c, hgt * wid).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, as the official code
        out = out.transpose(2, 3).reshape(b, c, hgt, wid).to(x.dtype)
        return x + self.proj_out(out)


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    """A container with the official attribute names `block` and `attn` (resampler added by caller)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _middle(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


# ----------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image -> 2*z_channels moments. One level per entry of ch_mult; all but the last halve the size.

    With ch_mult=(1, 1, 2, 2, 4) a 256x256 image reaches 16x16, where attention follows every
    res block (attn_resolutions=(16,)), then the middle (res, attn, res) and the output conv.
    """

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
                 in_channels, dropout):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        widths_in = (1,) + tuple(ch_mult)
        res = resolution
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * widths_in[i], ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in range(num_res_blocks)] if res in attn_resolutions else []
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        c = ch * ch_mult[-1]
        self.mid = _middle(c, dropout)
        self.norm_out = normalize(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: the encoder mirrored, with num_res_blocks + 1 res blocks per level.

    `up` is indexed like the encoder's `down` (up[0] is full resolution) but run from the last
    level to the first, which is how the official state dict numbers it.
    """

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
                 out_ch, dropout):
        super().__init__()
        c = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(c, dropout)
        levels = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out, dropout))
                c = c_out
            attns = [AttnBlock(c_out) for _ in range(num_res_blocks + 1)] if res in attn_resolutions else []
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(c)
        self.conv_out = nn.Conv2d(c, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Posterior and autoencoder
# ----------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as in the official code."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. The noise is drawn on the generator's device, so a CPU generator
        gives the same latents whatever device the model runs on."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The VA-VAE / LDM KL autoencoder. Defaults are the official f16d32 settings."""

    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions=(16,), z_channels: int = 32, embed_dim: int = 32,
                 resolution: int = 256, in_channels: int = 3, out_ch: int = 3, dropout: float = 0.0):
        super().__init__()
        ch_mult, attn_resolutions = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        self.arch = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                         attn_resolutions=list(attn_resolutions), z_channels=z_channels,
                         embed_dim=embed_dim, resolution=resolution, in_channels=in_channels,
                         out_ch=out_ch, dropout=dropout)
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, z_channels=z_channels,
                      resolution=resolution, dropout=dropout)
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.identity: str | None = None  # set by load_vavae: see vavae_identity

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/16, W/16), in float32."""
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        return DiagonalGaussianDistribution(moments.float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in float32, nominally in [-1, 1]; not clamped (as the official decoder)."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype))).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (what latent extraction + decoding does)."""
        return self.decode(self.encode(x).mode())


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files safely
# ----------------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """By content, not name: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _unsafe_globals(path: Path) -> list[str]:
    """The GLOBAL references in a zip-format pickle, listed by scanning opcodes (nothing is executed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - older torch or a legacy-format file: the list is a courtesy
        return []


def _torch_load_weights_only(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers; anything else is refused, not run."""
    # mmap (zip-format files only) means a 2 GB checkpoint is not read into memory: only the
    # tensors we keep are ever touched.
    mmap = zipfile.is_zipfile(path)
    damaged = ("The file may be truncated or corrupted (compare its size/sha256 with the source) "
               "or of another format.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch words every weights_only failure alike; the reason sits on one of the inner lines.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "global" in ln.lower()), lines[-2] if len(lines) > 1 else str(e))
        names = _unsafe_globals(path)
        if not names and "global" not in reason.lower():
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({reason[:200]}). {damaged}") from None
        found = f" It references: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}." if names else f" ({reason[:200]})"
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that needs arbitrary code to unpickle, which could "
            f"run anything on this machine, so it was not executed (torch.load weights_only=True accepts "
            f"only tensors and plain containers).{found} A genuine VA-VAE checkpoint holds only tensors. "
            f"If you trust this file, re-save just its tensors (torch.save(ckpt['state_dict'], ...)) "
            f"in a trusted environment, or convert it there with `python -m mdgen_helpers convert-vavae`."
        ) from None
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, OSError, and torch handing a
        # `.safetensors`-named file to safetensors (SafetensorError): all mean "not readable as a checkpoint"
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:200]}). {damaged}"
        ) from None


def _read_file(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(raw object, safetensors metadata or {}) of a .pt/.ckpt/.pth or .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VA-VAE checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; give the checkpoint file itself "
            f"(e.g. vavae-imagenet256-f16d32-dinov2.pt or a slim .safetensors copy)"
        )
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
        decoded = {}
        for k, v in meta.items():
            try:
                decoded[k] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                decoded[k] = v
        return tensors, decoded
    return _torch_load_weights_only(path), {}


# ----------------------------------------------------------------------------------------------
# From whatever was in the file to a checked VA-VAE state dict
# ----------------------------------------------------------------------------------------------


def _strip_wrappers(key: str) -> str:
    # DDP (`module.`) and wrapper modules (`model.`) prefix every key; the official file has neither.
    while key.startswith(("module.", "model.")):
        key = key.split(".", 1)[1]
    return key


def _wrong_kind(keys: list[str]) -> str | None:
    """A specific message when the keys belong to a known other kind of model."""

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("x_embedder.", "y_embedder.", "t_embedder.") or (
        not has("cls_token", "patch_embed.") and any(k.startswith("blocks.") and ".attn." in k for k in keys)
    ):
        return ("this looks like a LightningDiT checkpoint, not a VA-VAE (it has x_embedder / y_embedder / "
                "blocks.N.attn keys): give the tokenizer file, e.g. vavae-imagenet256-f16d32-dinov2.pt")
    if has("cls_token", "patch_embed."):
        return "this looks like a vision transformer (e.g. DINOv2: cls_token, patch_embed, blocks.*), not a VA-VAE"
    if has("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block."):
        return ("this looks like a diffusers-format AutoencoderKL (e.g. the SD-VAE: down_blocks/up_blocks), "
                "not the LDM-layout VA-VAE f16d32 whose latents are 32x16x16")
    return None


def extract_vavae_state_dict(obj: Any, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The inference tensors of a VA-VAE from an official .pt, a Lightning .ckpt or a bare state dict.

    Drops training-only groups (loss.*, foundation_model.*, linear_proj.*), strips `module.`/`model.`
    wrappers, and raises CheckpointError with a specific message for known wrong kinds of file.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found a {type(obj).__name__}")
    sd = obj
    if isinstance(obj.get("state_dict"), Mapping):  # official .pt and Lightning .ckpt
        sd = obj["state_dict"]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # Training checkpoints of other code keep weights in nested dicts: LightningDiT saves
        # {"model", "ema", "opt", "config"}; others use "module" or "net". Prefer EMA weights.
        nested = [k for k in ("ema", "model", "module", "net") if isinstance(obj.get(k), Mapping) and obj[k]]
        if nested:
            sd = obj[nested[0]]
            inner = [_strip_wrappers(str(k)) for k in sd]
            if not any(k.startswith(MODEL_PREFIXES) for k in inner):
                msg = _wrong_kind(inner) or (
                    f"this looks like a training checkpoint of another model ({'/'.join(nested)} dicts), not a VA-VAE")
                raise CheckpointError(f"{source}: {msg}")
    tensors = {_strip_wrappers(str(k)): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    kept = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIXES)}
    if not any(k.startswith(("encoder.down.", "decoder.up.")) for k in kept):  # not the LDM layout
        msg = _wrong_kind(list(tensors))
        if msg:
            raise CheckpointError(f"{source}: {msg}")
    if not kept:
        groups = sorted({k.split(".", 1)[0] for k in tensors}) or ["(no tensors)"]
        raise CheckpointError(
            f"{source}: no VA-VAE weights found (expected keys under {', '.join(MODEL_PREFIXES)}; "
            f"found top-level groups: {', '.join(groups[:12])})"
        )
    return kept


def infer_arch(sd: Mapping[str, torch.Tensor], resolution: int = DEFAULT_ARCH["resolution"]) -> dict[str, Any]:
    """Architecture read off the tensor shapes, so any width (a tiny CI model too) loads.

    Only what the shapes say is returned; what they cannot say (resolution, dropout) keeps the
    defaults. Attention placement is read from which encoder levels have `attn` blocks.
    """
    arch: dict[str, Any] = {}
    try:
        if "encoder.conv_in.weight" in sd:
            arch["ch"], arch["in_channels"] = (int(s) for s in sd["encoder.conv_in.weight"].shape[:2])
        if "encoder.conv_out.weight" in sd:
            arch["z_channels"] = int(sd["encoder.conv_out.weight"].shape[0]) // 2
        if "quant_conv.weight" in sd:
            arch["embed_dim"] = int(sd["quant_conv.weight"].shape[0]) // 2
        if "decoder.conv_out.weight" in sd:
            arch["out_ch"] = int(sd["decoder.conv_out.weight"].shape[0])
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        if levels == list(range(len(levels))) and levels and "ch" in arch:
            arch["ch_mult"] = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // arch["ch"] for i in levels]
            arch["num_res_blocks"] = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
            arch["attn_resolutions"] = [resolution // 2**i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd)]
    except (KeyError, IndexError, ValueError):
        pass  # incomplete file: the strict load below names exactly what is missing
    return arch


def _check_against(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """One error listing every missing, unexpected and misshapen key (not just the first)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if not (missing or unexpected or shapes):
        return

    def show(title: str, items: list[str]) -> str:
        return f"\n  {len(items)} {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else "") if items else ""

    arch = getattr(model, "arch", {})
    raise CheckpointError(
        f"{source} does not match the VA-VAE architecture {json.dumps(arch)}:"
        + show("missing keys", missing) + show("unexpected keys", unexpected) + show("shape mismatches", shapes)
        + "\nThe file is incomplete or not a VA-VAE f16d32 tokenizer; pass architecture overrides "
        "(e.g. ch=..., ch_mult=...) only if it is a VA-VAE of another size."
    )


def _state_dict_and_arch(path_or_obj: Any, **arch_overrides) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(inference state dict, architecture, file metadata) from a path or an in-memory object."""
    if isinstance(path_or_obj, (str, os.PathLike)):
        raw, meta = _read_file(path_or_obj)
        source = str(path_or_obj)
    else:
        raw, meta, source = path_or_obj, {}, "<state dict>"
    sd = extract_vavae_state_dict(raw, source)
    stored = meta["arch"] if isinstance(meta.get("arch"), Mapping) else {}
    resolution = arch_overrides.get("resolution", stored.get("resolution", DEFAULT_ARCH["resolution"]))
    arch = {**DEFAULT_ARCH, **infer_arch(sd, resolution), **stored, **arch_overrides}
    return sd, arch, meta | {"source": source}


def _build_checked(sd: Mapping[str, torch.Tensor], arch: dict[str, Any], source: str, adopt: bool = True) -> AutoencoderKL:
    """Build on the meta device (no wasted init), check every key, then adopt the tensors.

    The tensors are copied so that the model never points into a memory-mapped checkpoint.
    """
    try:
        with torch.device("meta"):
            model = AutoencoderKL(**arch)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: invalid VA-VAE architecture {arch}: {e}") from None
    _check_against(model, sd, source)
    if adopt:
        model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------
# Public loading, identity, conversion
# ----------------------------------------------------------------------------------------------


def _hash_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def _identity_string(sd: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> str:
    f = 2 ** (len(arch["ch_mult"]) - 1)
    return f"vavae-f{f}d{arch['embed_dim']}-ch{arch['ch']}:{_hash_state_dict(sd)[:16]}"


def vavae_identity(path_or_state_dict: Any) -> str:
    """`vavae-f16d32-ch128:<16 hex>`: sha256 over the sorted inference tensors (as float32 bytes).

    It depends only on the weights, not on the container, so the official .pt and its fp32 slim
    copy share it (an fp16 copy has other weights, hence another identity). Latent files record
    it, so latents from one tokenizer are never decoded with another.
    """
    sd, arch, _ = _state_dict_and_arch(path_or_state_dict)
    return _identity_string(sd, arch)


def load_vavae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **arch_overrides) -> AutoencoderKL:
    """A frozen VA-VAE (eval mode, requires_grad False) from .pt / .ckpt / bare state dict / .safetensors.

    The architecture comes from, in increasing priority: the f16d32 defaults, the tensor shapes,
    the slim file's `arch` metadata, `arch_overrides`. Loading is strict. dtype=None gives float32
    (whatever the file stores); torch.float16 / torch.bfloat16 set the compute dtype.
    """
    sd, arch, meta = _state_dict_and_arch(path, **arch_overrides)
    model = _build_checked(sd, arch, meta["source"])
    model.identity = _identity_string(sd, arch)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    model.requires_grad_(False)
    return model


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, fp16: bool = False) -> dict[str, Any]:
    """Write the slim copy: inference tensors only (~280 MB fp32 instead of 2.15 GB), atomically.

    The metadata holds the architecture (so loading needs no inference), the source file's name
    and sha256, the stored dtype and the identity of the written weights. Returns that metadata.
    """
    sd, arch, meta = _state_dict_and_arch(src)
    _build_checked(sd, arch, meta["source"], adopt=False)  # refuse to write a copy that would not load
    dtype = torch.float16 if fp16 else torch.float32
    out = {k: v.detach().to(dtype).contiguous() for k, v in sorted(sd.items())}
    info = {
        "format": SLIM_FORMAT,
        "arch": {k: arch[k] for k in DEFAULT_ARCH},
        "dtype": str(dtype).replace("torch.", ""),
        "source_name": Path(src).name,
        "source_sha256": sha256_file(src),
        "identity": _identity_string(out, arch),
    }
    atomic_save_safetensors(out, dst, metadata=info)
    return info


# ----------------------------------------------------------------------------------------------
# Random weights in the official layout (for CI and benchmarks)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from an explicit generator (the global RNG is untouched).

    Convs get N(0, 1/fan_in) so activations stay O(1) through the depth; norm scales and all
    biases get small noise, so a test that swaps two parameters or misses an affine sees it.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            value = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith(".weight"):  # GroupNorm scale
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            value = 0.05 * torch.randn(p.shape, generator=g)
        if p.is_meta:
            setattr(_owner(model, name), name.rsplit(".", 1)[1], nn.Parameter(value.to(p.dtype)))
        else:
            p.copy_(value)
    return model


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def write_random_checkpoint(path: str | os.PathLike, seed: int = 0, **arch) -> Path:
    """A seeded random VA-VAE saved like the official file: {"state_dict": {...}} including a few
    training-only `loss.*` / `foundation_model.*` / `linear_proj.*` keys, so CI runs the real path.

    `ch` defaults to 32 (about 17 MB) rather than 128 (280 MB); pass ch=128 for the full size.
    """
    arch = {"ch": 32, **arch}
    with torch.device("meta"):
        model = AutoencoderKL(**arch)
    init_random_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = dict(model.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)
    sd["foundation_model.model.cls_token"] = torch.randn(1, 1, 16, generator=g)
    sd["foundation_model.model.blocks.0.attn.qkv.weight"] = torch.randn(48, 16, generator=g)
    sd["linear_proj.weight"] = torch.randn(16, arch.get("embed_dim", 32), 1, 1, generator=g)
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 0}, buf)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# CLI: python -m mdgen_helpers convert-vavae --src X.pt --dst Y.safetensors [--fp16]
# ----------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="official .pt, Lightning .ckpt, state dict or .safetensors")
    parser.add_argument("--dst", required=True, help="output .safetensors (written atomically)")
    parser.add_argument("--fp16", action="store_true", help="store float16 (~140 MB; changes the identity)")


def cli_main(args: argparse.Namespace) -> int:
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise CheckpointError("--dst must differ from --src (the source is never overwritten)")
    info = convert_to_safetensors(args.src, args.dst, fp16=args.fp16)
    size_mb = Path(args.dst).stat().st_size / 1e6
    print(f"wrote {args.dst} ({size_mb:.1f} MB, {info['dtype']}); identity {info['identity']}")
    print(f"arch {json.dumps(info['arch'])}; source sha256 {info['source_sha256']}")
    return 0
