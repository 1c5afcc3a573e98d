"""The colormap inversion, once: an RGB spectrogram pixel -> the index of its nearest LUT entry.

The simulator renders dB levels through matplotlib's 256-entry colormap (`simulate.colormap_lut`,
jet by default); reading a level back is finding the nearest entry. Both readers use this: the
physics read-off (`physics.image_to_power`) and the colormap stand-in tokenizer.
"""

from __future__ import annotations

import torch

from mdgen_helpers.errors import DataError
from mdgen_helpers.simulate import colormap_lut


def colormap_lut_tensor(colormap: str = "jet") -> torch.Tensor:
    """(256, 3) float32 in [-1, 1]: the simulator's LUT, so the inversion matches the rendering exactly."""
    try:
        lut = colormap_lut(colormap)
    except (KeyError, ValueError) as e:
        raise DataError(f"unknown colormap {colormap!r} ({e}); use a matplotlib colormap name such as 'jet'") from e
    return torch.from_numpy(lut.astype("float32")) / 127.5 - 1.0


def colormap_index(images: torch.Tensor, lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest LUT entry of every pixel of (B, 3, H, W) images in [-1, 1]: (index (B, H, W)
    int64, distance (B, H, W) in [0, 1] RGB units). Pixels are quantised to 8 bits (what images
    on disk hold) and only the distinct colours (~20k per JPEG spectrogram, not 65k pixels) are
    compared with the 256 entries, one matmul per chunk: exact, and the same code runs on a GPU."""
    q = ((images + 1.0) * 127.5).round().clamp(0, 255).long()
    key = (q[:, 0] * 256 + q[:, 1]) * 256 + q[:, 2]
    colours, inverse = torch.unique(key, return_inverse=True)
    rgb = torch.stack([colours // 65536, (colours // 256) % 256, colours % 256], 1).float() / 127.5 - 1.0
    lut = lut.to(rgb.device)
    lut_sq = (lut * lut).sum(1)
    idx = torch.empty(len(colours), dtype=torch.long, device=rgb.device)
    dist = torch.empty(len(colours), device=rgb.device)
    for i in range(0, len(colours), 1 << 16):
        c = rgb[i:i + (1 << 16)]
        d2, j = (lut_sq - 2 * c @ lut.T).min(1)
        idx[i:i + len(c)] = j
        dist[i:i + len(c)] = (d2 + (c * c).sum(1)).clamp_min(0).sqrt() / 2  # [-1, 1] units -> [0, 1]
    return idx[inverse], dist[inverse]


def run_middle_index(lut: torch.Tensor) -> torch.Tensor:
    """(256,) int64: for each LUT entry, the middle entry of the run of identical colours it
    belongs to. Neighbouring jet entries can round to the same uint8 colour, so a pixel of that
    colour stands for any index of the run; its middle is the estimate with the smallest error."""
    same = (lut[1:] == lut[:-1]).all(1).tolist()
    out = torch.empty(len(lut), dtype=torch.long)
    start = 0
    for i in range(1, len(lut) + 1):
        if i == len(lut) or not same[i - 1]:
            out[start:i] = (start + i - 1) // 2 if (i - start) % 2 else (start + i) // 2
            start = i
    return out
