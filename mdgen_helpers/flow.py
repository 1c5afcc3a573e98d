"""Rectified flow in a page: the training loss, ODE samplers and classifier-free guidance.

Convention (the official LightningDiT one, so official weights work): t=0 is noise, t=1 is data,

    x_t = t * x1 + (1 - t) * x0,     x0 ~ N(0, I),  x1 = data latent,
    d x_t / dt = x1 - x0               (the velocity the model learns to predict).

Sampling integrates dx/dt = v(x, t) from t=0 (noise) to t=1 (data). Guidance mixes conditional
and unconditional velocities on ALL latent channels (the official sampler guides only the first
3 of 32, a leftover of DiT's 4-channel SD-VAE code; `official_3ch=True` reproduces it for
comparison). Every random draw comes from a passed `torch.Generator`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdgen_helpers.dit import null_label, unwrap
from mdgen_helpers.errors import MdgenError

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,...), t (B,)) -> v


#################################################################################
#                                   Training                                    #
#################################################################################


def sample_time(n: int, generator: torch.Generator | None = None, time_dist: str = "uniform") -> torch.Tensor:
    """Training times in (0, 1) on the generator's device.

    "uniform": t ~ U(0, 1). "logit_normal": t = sigmoid(u), u ~ N(0, 1) (SD3, Esser et al. 2024;
    the official LightningDiT setting), which spends more training on the middle of the path.
    """
    dev = generator.device if generator is not None else "cpu"
    if time_dist == "uniform":
        return torch.rand(n, generator=generator, device=dev)
    if time_dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=dev))
    raise MdgenError(f"unknown time_dist {time_dist!r}; use 'uniform' or 'logit_normal'")


def flow_matching_loss(
    model: Callable,
    x1: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    time_dist: str = "uniform",
    cosine_weight: float = 0.0,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss (B,): || v(x_t, t, y) - (x1 - x0) ||^2 averaged over all dimensions,
    plus `cosine_weight` * (1 - cosine similarity between predicted and target velocity across
    channels, averaged over positions) -- LightningDiT's direction term (weight 1.0 there).

    Noise, then t, are drawn from `generator` unless given; when a generator is given it is also
    passed to the model (`model(x_t, t, y, generator=generator)`), which draws its label dropout
    from it, so one seed fixes the whole step.
    """
    B = x1.shape[0]
    dev = generator.device if generator is not None else x1.device
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=dev)
    if t is None:
        t = sample_time(B, generator, time_dist)
    x0 = noise.to(x1.device, x1.dtype)
    t = t.to(x1.device, x1.dtype)
    tb = t.view(B, *([1] * (x1.dim() - 1)))
    x_t = tb * x1 + (1 - tb) * x0
    target = x1 - x0
    extra = {"generator": generator} if generator is not None else {}
    v = model(x_t, t, y, **extra)
    loss = (v.float() - target.float()).pow(2).flatten(1).mean(1)
    if cosine_weight:
        cos = F.cosine_similarity(v.float(), target.float(), dim=1)  # (B, H, W): per position
        loss = loss + cosine_weight * (1 - cos).flatten(1).mean(1)
    return loss


#################################################################################
#                                   Sampling                                    #
#################################################################################


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift t -> s t / (1 + (s - 1) t). As in the official sampler, s <= 0 means "off"
    (s = 0.0 is the default there) and s = 1 is the identity; s < 1 puts more steps near t=0
    (the noisy end, where the official XL model samples best with s = 0.3)."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def time_grid(num_steps: int, shift: float = 0.0) -> torch.Tensor:
    """num_steps + 1 points from 0 to 1 (float32), shifted."""
    return shift_time(torch.linspace(0, 1, num_steps + 1, dtype=torch.float32), shift)


class _Counted:
    """Wraps a velocity function and counts its calls: the NFE we report is the NFE we did."""

    def __init__(self, fn: VelocityFn):
        self.fn, self.calls = fn, 0

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.fn(x, tt)


# Dormand-Prince 5(4) tableau (Dormand & Prince, 1980): 7 stages, the 7th stage is the
# derivative at the new point ("first same as last"), so an accepted step costs 6 evaluations.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _dopri5(f: _Counted, x: torch.Tensor, rtol: float, atol: float, h: float, max_nfe: int) -> torch.Tensor:
    """Adaptive RK45 from t=0 to t=1 with the standard error control: accept a step when the RMS
    of err / (atol + rtol * max(|x|, |x_new|)) is <= 1, then rescale h by 0.9 * err^(-1/5)."""
    t, k1 = 0.0, f(x, 0.0)
    while 1.0 - t > 1e-12:
        if f.calls > max_nfe:
            raise MdgenError(f"dopri5 needed more than {max_nfe} evaluations; loosen rtol/atol or use heun/euler")
        h = min(h, 1.0 - t)
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a)
            ks.append(f(xi, t + _DP_C[i] * h))
        x_new = xi  # stage 7 is evaluated at the 5th-order solution
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        e = (err / scale).float().pow(2).mean().sqrt().item()
        if e <= 1.0:
            t, x, k1 = (1.0 if h == 1.0 - t else t + h), x_new, ks[6]
        h = h * min(10.0, max(0.2, 0.9 * (e if e > 0 else 1e-10) ** -0.2))
    return x


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    num_steps: int,
    method: str = "euler",
    timestep_shift: float = 0.0,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    max_nfe: int = 10_000,
) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = v(x, t) from noise x0 at t=0 to t=1; returns (x1, nfe).

    euler: num_steps steps on the (shifted) grid of num_steps + 1 points, nfe = num_steps.
    heun:  the same grid, predictor-corrector (2nd order), nfe = 2 * num_steps.
    dopri5: adaptive Dormand-Prince 5(4) with rtol/atol; num_steps only sets the first step size
           (1/num_steps); with a shift it integrates the same ODE in the shifted time tau
           (dx/dtau = v(x, s(tau)) s'(tau)), so the solution is unchanged. nfe is what it used.
    The official sampler's grid of N points is our N - 1 steps.
    """
    if num_steps < 1:
        raise MdgenError(f"num_steps must be >= 1, got {num_steps}")
    if timestep_shift < 0:
        raise MdgenError(f"timestep_shift must be >= 0 (0 = off), got {timestep_shift}")
    f = _Counted(velocity_fn)
    x = x0
    if method == "euler":
        ts = time_grid(num_steps, timestep_shift).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = x + (t1 - t0) * f(x, t0)
    elif method == "heun":
        ts = time_grid(num_steps, timestep_shift).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            h = t1 - t0
            v0 = f(x, t0)
            v1 = f(x + h * v0, t1)
            x = x + 0.5 * h * (v0 + v1)
    elif method == "dopri5":
        s = timestep_shift
        if s > 0 and s != 1:
            g = f.fn

            def in_shifted_time(x_, tau):  # t = s tau / (1 + (s-1) tau), dt/dtau = s / (1 + (s-1) tau)^2
                dt_dtau = s / (1 + (s - 1) * tau) ** 2
                return g(x_, shift_time(tau, s)) * dt_dtau.view(-1, *[1] * (x_.dim() - 1))

            f.fn = in_shifted_time
        x = _dopri5(f, x, rtol, atol, 1.0 / num_steps, max_nfe)
    else:
        raise MdgenError(f"unknown ODE method {method!r}; use 'euler', 'heun' or 'dopri5'")
    return x, f.calls


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################


def guided_velocity(
    model: Callable,
    y: torch.Tensor,
    scale: float,
    null: int | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
    official_3ch: bool = False,
) -> VelocityFn:
    """Velocity function for `sample_ode` with classifier-free guidance (Ho & Salimans, 2022):

        v = v_u + w (v_c - v_u),   v_c = model(x, t, y),  v_u = model(x, t, null)

    computed in ONE batched forward of [x; x] with labels [y; null]. Inside `interval`
    (t_start <= t <= t_end; the official `cfg_interval_start` is t_start) samples are guided,
    outside they follow v_c (so no guidance while t < t_start, near pure noise). With w = 1 or no
    sample inside the interval, only the conditional half is evaluated.

    `null` defaults to `null_label(model.num_classes)` and must equal it: any other label is an
    embedding row training never taught. `official_3ch=True` guides only channels 0..2, as the
    official `forward_with_cfg` does -- for comparison with published numbers only.
    """
    base = unwrap(model) if isinstance(model, nn.Module) else model
    if isinstance(base, nn.Module) and base.training:
        raise MdgenError("guided sampling needs model.eval(): in train mode labels are randomly dropped")
    num_classes = getattr(base, "num_classes", None)
    if null is None:
        if num_classes is None:
            raise MdgenError("pass null=... (the model does not expose num_classes)")
        null = null_label(num_classes)
    if num_classes is not None:
        if null != null_label(num_classes):
            raise MdgenError(
                f"null label {null} is not the trained null label {null_label(num_classes)} of a model "
                f"with {num_classes} classes (labels 0..{num_classes - 1} are users)"
            )
        table = getattr(getattr(base, "y_embedder", None), "embedding_table", None)
        if scale != 1.0 and table is not None and table.num_embeddings <= null:
            raise MdgenError(
                "this model was built without label dropout (class_dropout_prob=0), so it has no null "
                "label and cannot be guided; sample with guidance scale 1.0 or train with label dropout"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise MdgenError(f"labels must be in 0..{num_classes - 1}, got {y.min().item()}..{y.max().item()}")
    t_start, t_end = interval
    y_null = torch.full_like(y, null)
    guided_ch = slice(0, 3) if official_3ch else slice(None)

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= t_start) & (t <= t_end)
        if scale == 1.0 or not bool(inside.any()):
            return model(x, t, y)
        B = x.shape[0]
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).split(B)
        v = v_c.clone()
        v[:, guided_ch] = v_u[:, guided_ch] + scale * (v_c[:, guided_ch] - v_u[:, guided_ch])
        return torch.where(inside.view(B, *[1] * (x.dim() - 1)), v, v_c)

    return velocity_fn
