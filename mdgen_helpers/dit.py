"""LightningDiT: the latent diffusion transformer that generates a chosen user's latents.

A DiT (Peebles & Xie, 2023, arXiv:2212.09748) with the LightningDiT upgrades (Yao et al., 2025,
"Reconstruction vs. Generation", arXiv:2501.01423): RMSNorm, SwiGLU MLP, 2-D rotary position
embedding (EVA-02 style) on top of the fixed sin-cos table, optional qk-norm and shift-free adaLN.
The class label is the user: label k-1 for folder ID_k, and `null_label(num_classes)` is the
"no user" label that label dropout trains and classifier-free guidance samples with.

Written to be a drop-in for the official hustvl/LightningDiT `models/lightningdit.py`: identical
state-dict keys and shapes (including the frozen `pos_embed` parameter and the persistent RoPE
buffers `feat_rope.freqs_cos/sin`) and identical numbers in float32 (tested against vectors
produced by the official code, see tests/test_dit.py). Time runs t=0 (noise) .. t=1 (data) and is
fed unscaled to the timestep embedder, as in the official model, so official weights just work.

Read top to bottom: helpers, layers, the model, presets, checkpoint loading, compilation.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from mdgen_helpers.errors import CheckpointError, MdgenError


def null_label(num_classes: int) -> int:
    """The unconditional ("no user") label: the extra last row of the label table.

    Defined once here and used by training (label dropout) and sampling (guidance), so the label
    the sampler asks for is the row training actually taught. The origin project sampled with 31
    while training dropped to 32 -- an untrained embedding row.
    """
    return int(num_classes)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; `shift=None` is the shift-free variant (LightningDiT `wo_shift`)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


#################################################################################
#                      Positional embeddings (fixed, not learned)               #
#################################################################################


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (grid_size**2, embed_dim), as in DiT/MAE: half the channels encode
    the column, half the row (the `meshgrid` puts w first, which is why emb_h uses grid[0])."""
    assert embed_dim % 4 == 0, "sin-cos position embedding needs hidden_size divisible by 4"
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1)


class RotaryEmbedding2D(nn.Module):
    """2-D rotary embedding over a (grid x grid) token layout (EVA-02 "VisionRotaryEmbeddingFast").

    The first half of each head's channels rotates with the token's row, the second half with its
    column; channels rotate in adjacent pairs (0,1), (2,3), ... The cos/sin tables are persistent
    buffers because official checkpoints store them (`feat_rope.freqs_cos/sin`, (grid**2, head_dim)).
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2  # channels per axis
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        pos = torch.arange(grid_size) / grid_size * grid_size  # official form; equals arange
        f = torch.einsum("i,f->if", pos, inv_freq).repeat_interleave(2, dim=-1)  # (grid, half)
        rows = f[:, None, :].expand(grid_size, grid_size, half)
        cols = f[None, :, :].expand(grid_size, grid_size, half)
        freqs = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, 2 * half)
        self.register_buffer("freqs_cos", freqs.cos())
        self.register_buffer("freqs_sin", freqs.sin())

    @staticmethod
    def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
        """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i on each pair."""
        x = x.unflatten(-1, (-1, 2))
        return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, heads, N, head_dim)
        # type_as: under autocast q/k stay in the compute dtype instead of promoting to float32.
        return (x * self.freqs_cos + self.rotate_pairs(x) * self.freqs_sin).type_as(x)


#################################################################################
#                                    Layers                                     #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019) with a learned gain, computed in float32 like the official
    (LLaMA) module: key `weight`, eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with a strided conv (key `proj`, as timm's PatchEmbed)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise MdgenError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256 frequencies, GLIDE/DiT) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, 1)) if dim % 2 else emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """User label -> vector, plus label dropout for classifier-free guidance.

    With dropout > 0 the table has num_classes + 1 rows; the last one, `null_label(num_classes)`,
    is what dropped labels become, and what the sampler uses as the unconditional label.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Replace a random `dropout_prob` fraction (or exactly the `force_drop_ids == 1` entries)
        with the null label. Draws come from `generator` (seeded by training) when given."""
        if force_drop_ids is None:
            dev = generator.device if generator is not None else labels.device
            u = torch.rand(labels.shape[0], generator=generator, device=dev).to(labels.device)
            drop = u < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, null_label(self.num_classes)), labels)

    def forward(self, labels, train: bool, force_drop_ids=None, generator=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, which picks the
    flash / memory-efficient / math kernel for the device (memory-efficient on a T4)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise MdgenError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        norm = (lambda: RMSNorm(self.head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): w3(silu(a) * b) with [a, b] = w12(x) (official key names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """The DiT MLP (tanh-GELU), keys `fc1`/`fc2` as timm's Mlp."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """Pre-norm of blocks and final layer: RMSNorm with gain, or affine-free LayerNorm (DiT)."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=True,
                 use_rmsnorm=True, wo_shift=False):
        super().__init__()
        self.norm1 = _norm(hidden_size, use_rmsnorm)
        self.norm2 = _norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        # SwiGLU keeps the parameter count of a GELU MLP by using 2/3 of the hidden width.
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else GeluMlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from tokens back to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = _norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                  The model                                    #
#################################################################################


class LightningDiT(nn.Module):
    """Velocity model v(x_t, t, y) on latents (B, in_channels, input_size, input_size)."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        learn_sigma: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        # Plain constructor arguments: saved with every artifact, rebuilt by `from_config`.
        self.config = dict(
            input_size=int(input_size), patch_size=int(patch_size), in_channels=int(in_channels),
            hidden_size=int(hidden_size), depth=int(depth), num_heads=int(num_heads),
            mlp_ratio=float(mlp_ratio), num_classes=int(num_classes),
            class_dropout_prob=float(class_dropout_prob), use_qknorm=bool(use_qknorm),
            use_swiglu=bool(use_swiglu), use_rope=bool(use_rope), use_rmsnorm=bool(use_rmsnorm),
            wo_shift=bool(wo_shift), learn_sigma=bool(learn_sigma), use_checkpoint=bool(use_checkpoint),
        )
        if num_classes < 1:
            raise MdgenError(f"num_classes must be >= 1 (the number of users), got {num_classes}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table, stored as a frozen Parameter because the official state dict has it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        grid = self.x_embedder.grid_size
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-Zero (every block starts
        as the identity) and a zero output layer (the untrained model predicts v = 0)."""
        if self.pos_embed.is_meta:  # shape-only build (key listing, parameter counts)
            return

        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        pe = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) latents at time t; t: (B,) in [0, 1] (0 noise, 1 data); y: (B,) labels.

        In train mode labels are dropped to `null_label` with probability `class_dropout_prob`,
        drawn from `generator` (or exactly where `force_drop_ids == 1`). Returns the velocity.
        """
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids, generator)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                # Recompute activations in backward: memory for compute, same numbers.
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
        x = self.unpatchify(self.final_layer(x, c))
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LightningDiT":
        """Rebuild from `model_config(model)` (e.g. the JSON saved next to EMA weights)."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise CheckpointError(f"model config has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**cfg)


def model_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable constructor arguments of a (possibly wrapped or compiled) LightningDiT."""
    return dict(unwrap(model).config)


def unwrap(model: nn.Module) -> nn.Module:
    """The LightningDiT inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


#################################################################################
#                                   Presets                                     #
#################################################################################

# Official sizes (hustvl/LightningDiT models/lightningdit.py, with the released config's
# SwiGLU + RoPE + RMSNorm) and smaller ones for this project's small data sets and CPUs.
_LIGHTNING = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=False, wo_shift=False)
PRESETS: dict[str, dict[str, Any]] = {
    "XL/1": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, **_LIGHTNING),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, **_LIGHTNING),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2, **_LIGHTNING),
    "B/1": dict(depth=12, hidden_size=768, num_heads=12, patch_size=1, **_LIGHTNING),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, **_LIGHTNING),
    "S/1": dict(depth=12, hidden_size=384, num_heads=6, patch_size=1, **_LIGHTNING),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, **_LIGHTNING),
    # CPU smoke/demo size (~7.6M parameters with a handful of users). Patch 2 turns the 16x16
    # latent into 64 tokens instead of 256: ~4x fewer FLOPs in the linears and ~16x fewer in
    # attention than patch 1, which is what makes a few hundred training steps fit on 2 cores;
    # width 256 with 4 heads keeps head_dim 64 (the usual SDPA kernel size) and depth 6 keeps
    # enough layers for adaLN conditioning to matter.
    "tiny": dict(depth=6, hidden_size=256, num_heads=4, patch_size=2, **_LIGHTNING),
}


def build_model(preset: str, num_classes: int, **overrides) -> LightningDiT:
    """`build_model("S/2", num_classes=num_users, class_dropout_prob=0.1)`; also accepts the
    official names ("LightningDiT-XL/1")."""
    key = preset.removeprefix("LightningDiT-")
    if key not in PRESETS:
        raise MdgenError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return LightningDiT(**{**PRESETS[key], "num_classes": num_classes, **overrides})


def count_parameters(model: nn.Module) -> int:
    """All parameters, the frozen pos_embed included (as the official counts do)."""
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                      Loading official (and our own) weights                   #
#################################################################################

_PREFIXES = ("module.", "_orig_mod.")
_LABEL_KEY = "y_embedder.embedding_table.weight"


def _read_checkpoint_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a safetensors file"
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True ({type(e).__name__}: "
            f"{str(e)[:300]}). Only plain tensor checkpoints are loaded (no arbitrary pickles); "
            "re-save it as a state dict or safetensors."
        ) from None


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, in any nesting."""
    seen: set[str] = set()
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
                    seen.add(p)
        out[k] = v
    return out, sorted(seen)


def _check_not_vavae(sd: dict, path: Path) -> None:
    if any(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in sd):
        raise CheckpointError(
            f"{path} has encoder./decoder. keys: this looks like a VA-VAE (tokenizer) checkpoint, not "
            "a LightningDiT one. Pass it as the tokenizer, and give the DiT checkpoint here."
        )


def infer_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments readable from a state dict's keys and shapes (num_heads only when
    RoPE is used, since it fixes the head size; num_classes excludes the null row)."""
    if "x_embedder.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError("state dict has no x_embedder.proj.weight / pos_embed: not a LightningDiT")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    arch: dict[str, Any] = dict(
        hidden_size=hidden, in_channels=in_ch, patch_size=p, depth=depth,
        input_size=int(round(math.sqrt(sd["pos_embed"].shape[1]))) * p,
        use_rope="feat_rope.freqs_cos" in sd,
        use_rmsnorm="blocks.0.norm1.weight" in sd,
        use_swiglu="blocks.0.mlp.w12.weight" in sd,
        use_qknorm="blocks.0.attn.q_norm.weight" in sd,
        wo_shift=sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden,
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * in_ch * p * p,
    )
    if arch["use_rope"]:
        arch["num_heads"] = hidden // sd["feat_rope.freqs_cos"].shape[1]
    if _LABEL_KEY in sd:
        arch["num_classes"] = sd[_LABEL_KEY].shape[0] - 1
    return arch


def load_official_weights(
    path: str | Path,
    num_classes: int,
    use_ema: bool = True,
    keep_null_row: bool = True,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official LightningDiT checkpoint (or one of ours) as a state dict for our users.

    Accepts a training checkpoint `{model, ema, opt, config}` (.pt, read with weights_only=True;
    `ema` is used when `use_ema`, as the official sampler does), a bare state dict, or safetensors.
    `module.` / `_orig_mod.` prefixes are stripped.

    The label table has one row per class plus the null row. When the checkpoint's class count
    differs from `num_classes` (ImageNet's 1000 classes vs our users), the class rows carry no
    meaning for us and are re-initialised N(0, 0.02) (the official init, seeded by `seed`); with
    `keep_null_row` the trained null (unconditional) row is kept as our null row, so fine-tuning
    starts from a working unconditional model. `info` reports what was done.
    """
    path = Path(path)
    obj = _read_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    info: dict[str, Any] = {"path": str(path), "reinitialised": [], "null_row_kept": False}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        _check_not_vavae(obj["state_dict"], path)
    if "ema" in obj or "model" in obj:
        which = "ema" if (use_ema and "ema" in obj) else "model"
        if which not in obj:
            raise CheckpointError(f"{path} has neither 'ema' nor 'model' weights (keys: {sorted(obj)[:10]})")
        sd = obj[which]
        info["source"] = f"training checkpoint ['{which}']"
        if isinstance(obj.get("config"), dict):
            info["checkpoint_config"] = obj["config"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, info["source"] = obj["state_dict"], "['state_dict']"
    else:
        sd, info["source"] = obj, ("safetensors" if path.suffix == ".safetensors" else "bare state dict")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: {info['source']} does not map names to tensors")
    sd, info["stripped_prefixes"] = strip_prefixes(sd)
    _check_not_vavae(sd, path)
    if _LABEL_KEY not in sd:
        raise CheckpointError(f"{path} has no {_LABEL_KEY}: not a LightningDiT checkpoint")
    info["arch"] = infer_arch(sd)

    table = sd[_LABEL_KEY]
    ckpt_classes = table.shape[0] - 1  # official models are trained with label dropout: last row = null
    info["checkpoint_classes"] = ckpt_classes
    if ckpt_classes != num_classes:
        g = torch.Generator().manual_seed(seed)
        new = torch.randn(num_classes + 1, table.shape[1], generator=g, dtype=torch.float32) * 0.02
        new = new.to(table.dtype)
        if keep_null_row:
            new[null_label(num_classes)] = table[-1]
            info["null_row_kept"] = True
        sd[_LABEL_KEY] = new
        info["reinitialised"].append(
            f"{_LABEL_KEY}: {ckpt_classes} checkpoint classes -> {num_classes} users (+ null row "
            f"{'kept from checkpoint' if keep_null_row else 're-initialised'})"
        )
    return sd, info


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
                 source: str = "state dict") -> dict[str, list[str]]:
    """Load into `model` with one clear error: missing, unexpected and shape-mismatched keys.

    Non-strict loading copies what matches and returns the rest (never silently: the caller sees
    the lists)."""
    model = unwrap(model)
    state_dict, _ = strip_prefixes(dict(state_dict))
    _check_not_vavae(state_dict, Path(source))
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape
    )
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        def show(xs):
            return ", ".join(xs[:6]) + (f" ... (+{len(xs) - 6})" if len(xs) > 6 else "")

        parts = [f"{name} {len(xs)}: {show(xs)}" for name, xs in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if xs]
        raise CheckpointError(
            f"{source} does not fit this LightningDiT ({'; '.join(parts)}). Build the model with the "
            "checkpoint's architecture (dit.infer_arch(state_dict) reads it) and the right num_classes."
        )
    # Non-strict only when the caller asked for it (strict=False): load what fits, return the rest.
    ok = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(ok, strict=False)
    return report


#################################################################################
#                                 Compilation                                   #
#################################################################################


def maybe_compile(model: nn.Module, example_inputs: tuple | None = None, **compile_kwargs) -> nn.Module:
    """torch.compile the model where it works; otherwise warn and return the eager model.

    Compilation is lazy, so failures (no C++ compiler, unsupported Python/platform, old GPU)
    usually surface at the first call: pass `example_inputs=(x, t, y)` to run that call here,
    under no_grad, and fall back to eager if it fails.
    """
    if not hasattr(torch, "compile"):
        warnings.warn("torch.compile is not available in this PyTorch; using the eager model")
        return model
    try:
        compiled = torch.compile(model, **compile_kwargs)
        if example_inputs is not None:
            with torch.no_grad():
                compiled(*example_inputs)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run eager"
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); using the eager model")
        return model
