"""Flow matching: loss, samplers (official vectors + convergence order on an exact Gaussian flow),
classifier-free guidance (all channels; official 3-channel mode), and the trained null label."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mdgen_helpers import flow
from mdgen_helpers.dit import LightningDiT, load_weights, null_label
from mdgen_helpers.errors import MdgenError

VARIANTS = ["small_p1_swiglu_rope_rms", "small_p2_qknorm_wo_shift", "small_p2_plain"]


def official_model(ref_dir: Path, variant: str):
    path = ref_dir / f"lightningdit_{variant}_seed0.safetensors"
    with safe_open(str(path), "pt") as f:
        arch = json.loads(f.metadata()["arch"])
    tensors = load_file(str(path))
    model = LightningDiT(**arch).eval()
    load_weights(model, {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")})
    return model, tensors


@pytest.fixture(scope="module")
def small_model():
    """A tiny LightningDiT with non-zero output layers (the DiT init outputs v = 0)."""
    torch.manual_seed(0)
    m = LightningDiT(depth=1, hidden_size=64, num_heads=2, patch_size=2, num_classes=4)
    for p in m.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    return m.eval()


# ----------------------------------------------------------------------------- official vectors


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_three_channel_guidance_is_reproducible(ref_dir, variant):
    model, t = official_model(ref_dir, variant)
    x, tt, yy = t["input.cfg_x"], t["input.cfg_t"], t["input.cfg_y"]
    B = x.shape[0] // 2
    expected = t["expected.cfg_out_official_first3channels"]
    assert int(yy[B]) == null_label(model.num_classes)
    with torch.no_grad():
        v3 = flow.guided_velocity(model, yy[:B], 4.0, official_3ch=True)(x[:B], tt[:B])
        v_all = flow.guided_velocity(model, yy[:B], 4.0)(x[:B], tt[:B])
        v_u = model(x[:B], tt[:B], yy[B:])
    # The official output's first half: guided channels 0..2, conditional channels 3..31.
    torch.testing.assert_close(v3, expected[:B], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_u[:, 3:], expected[B:, 3:], rtol=1e-4, atol=1e-4)
    # Our sampler agrees on the 3 channels the official code guides, and guides the other 29 too.
    torch.testing.assert_close(v_all[:, :3], expected[:B, :3], rtol=1e-4, atol=1e-4)
    assert (v_all[:, 3:] - expected[:B, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("num_points,shift", [(10, 0.0), (25, 0.3)])
def test_euler_matches_official_sampler(ref_dir, num_points, shift):
    model, _ = official_model(ref_dir, "small_p1_swiglu_rope_rms")
    t = load_file(str(ref_dir / "sampler_euler_on_lightningdit_small_p1_swiglu_rope_rms_seed0.safetensors"))
    y = t["input.y"]
    x1, nfe = flow.sample_ode(lambda x, tt: model(x, tt, y), t["input.noise"], num_points - 1, "euler", shift)
    assert nfe == num_points - 1  # the official grid of N points is N-1 Euler steps
    torch.testing.assert_close(x1, t[f"expected.euler_steps{num_points}_shift{shift}"], rtol=1e-4, atol=1e-4)


def test_timestep_shift_convention():
    lin = torch.linspace(0, 1, 11)
    assert torch.equal(flow.time_grid(10, 0.0), lin)  # 0.0 = off (the official default)
    torch.testing.assert_close(flow.time_grid(10, 1.0), lin)  # 1.0 = identity
    s = 0.3
    torch.testing.assert_close(flow.time_grid(10, s), s * lin / (1 + (s - 1) * lin))
    assert flow.time_grid(10, s)[1] < 0.1  # s < 1 puts more steps near the noise end
    with pytest.raises(MdgenError):
        flow.sample_ode(lambda x, t: x, torch.zeros(1, 2), 4, timestep_shift=-1.0)
    with pytest.raises(MdgenError):
        flow.sample_ode(lambda x, t: x, torch.zeros(1, 2), 4, method="rk4")


# ----------------------------------------------------------------------------- exact Gaussian flow
# x0 ~ N(0, I), x1 ~ N(mu, s^2 I) (independent coupling): x_t ~ N(t mu, sig_t^2 I) with
# sig_t^2 = t^2 s^2 + (1-t)^2, and the exact velocity E[x1 - x0 | x_t = x] is
#     v(x, t) = mu + (t s^2 - (1 - t)) / sig_t^2 * (x - t mu),
# whose flow maps noise z to t mu + sig_t z: at t=1, mu + s z.

MU, S = 1.5, 0.5


def gaussian_velocity(x, t):
    t = t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


@pytest.fixture(scope="module")
def z():
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _err(x, z):
    return (x - (MU + S * z)).abs().max().item()


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_fixed_step_convergence_order(z, method, order, shift):
    """Halving the step divides the error by 2**order (log2 of the ratio ~ order). With a shifted
    grid Heun is still pre-asymptotic at these step counts (measured rate ~2.4), hence >= there."""
    errs, nfes = [], []
    for n in (16, 32, 64):
        x, nfe = flow.sample_ode(gaussian_velocity, z, n, method, shift)
        errs.append(_err(x, z))
        nfes.append(nfe)
    assert nfes == [n * order for n in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    if shift == 0.0:
        assert all(abs(r - order) < 0.25 for r in rates), (method, errs, rates)
    else:
        assert all(r > order - 0.25 for r in rates), (method, errs, rates)


def test_dopri5_reaches_tolerance_and_reports_nfe(z):
    calls = []

    def counted(x, t):
        calls.append(1)
        return gaussian_velocity(x, t)

    results = []
    for tol in (1e-4, 1e-6):  # global max error stays within 10x the local tolerance here
        calls.clear()
        x, nfe = flow.sample_ode(counted, z, 4, "dopri5", rtol=tol, atol=tol)
        assert nfe == len(calls) and (nfe - 1) % 6 == 0  # FSAL: 1 + 6 per attempted step
        results.append((_err(x, z), nfe))
        assert results[-1][0] < 10 * tol
    assert results[1][1] > results[0][1] and results[1][0] < results[0][0]
    # Same ODE integrated in shifted time: same answer.
    xs, _ = flow.sample_ode(gaussian_velocity, z, 4, "dopri5", timestep_shift=0.3, rtol=1e-6, atol=1e-6)
    assert _err(xs, z) < 2e-5
    # A tight error budget with euler-like cost is refused clearly, not silently truncated.
    with pytest.raises(MdgenError, match="more than"):
        flow.sample_ode(counted, z, 4, "dopri5", rtol=1e-12, atol=1e-12, max_nfe=50)


# ----------------------------------------------------------------------------- guidance


class CallLog(torch.nn.Module):
    """Records the batch size of every forward of a wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.batches, self.num_classes = model, [], model.num_classes

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.inner(x, t, y)


def test_guidance_all_channels_one_batched_pass(small_model):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 32, 16, 16, generator=g), torch.tensor([0.2, 0.5, 0.9])
    y = torch.tensor([0, 3, 1])
    log = CallLog(small_model).eval()
    with torch.no_grad():
        v_c = small_model(x, t, y)
        v_u = small_model(x, t, torch.full((3,), null_label(4)))
        v1 = flow.guided_velocity(log, y, 1.0)(x, t)
        v3 = flow.guided_velocity(log, y, 3.0)(x, t)
    torch.testing.assert_close(v1, v_c, rtol=1e-5, atol=1e-6)  # w = 1 is the conditional model
    torch.testing.assert_close(v3, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert log.batches == [3, 6]  # w = 1: one conditional pass; w = 3: ONE pass of [x; x]
    assert (v3 - v_c)[:, 3:].abs().max() > 1e-3  # channels beyond the first 3 are guided


def test_guidance_interval(small_model):
    x, t = torch.randn(3, 32, 16, 16), torch.tensor([0.05, 0.5, 0.95])
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        v_c = small_model(x, t, y)
        full = flow.guided_velocity(small_model, y, 4.0)(x, t)
        part = flow.guided_velocity(small_model, y, 4.0, interval=(0.11, 0.9))(x, t)
        log = CallLog(small_model).eval()
        early = flow.guided_velocity(log, y, 4.0, interval=(0.11, 1.0))(x, torch.full((3,), 0.1))
    torch.testing.assert_close(part[0], v_c[0])  # t < t_start: no guidance
    torch.testing.assert_close(part[2], v_c[2])  # t > t_end: no guidance
    torch.testing.assert_close(part[1], full[1])
    assert not torch.allclose(full[0], v_c[0])
    torch.testing.assert_close(early, small_model(x, torch.full((3,), 0.1), y).detach())
    assert log.batches == [3]  # nobody inside the interval: only the conditional half runs


def test_guidance_refuses_wrong_null_label_and_train_mode(small_model):
    y = torch.tensor([0, 1])
    with pytest.raises(MdgenError, match="null label 3"):
        flow.guided_velocity(small_model, y, 2.0, null=3)
    with pytest.raises(MdgenError, match="labels must be"):
        flow.guided_velocity(small_model, torch.tensor([4]), 2.0)
    no_null = LightningDiT(depth=1, hidden_size=64, num_heads=2, patch_size=2, num_classes=4,
                           class_dropout_prob=0.0).eval()
    with pytest.raises(MdgenError, match="without label dropout"):
        flow.guided_velocity(no_null, y, 2.0)
    flow.guided_velocity(no_null, y, 1.0)  # unguided sampling needs no null label
    small_model.train()
    try:
        with pytest.raises(MdgenError, match="eval"):
            flow.guided_velocity(small_model, y, 2.0)
    finally:
        small_model.eval()


def test_guided_sampling_end_to_end(small_model):
    noise = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    vf = flow.guided_velocity(small_model, torch.tensor([0, 2]), 2.0, interval=(0.1, 1.0))
    x, nfe = flow.sample_ode(vf, noise, 4, "heun", timestep_shift=0.3)
    assert nfe == 8 and x.shape == noise.shape and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- loss and training


def test_loss_definition_and_seeding(small_model):
    x1 = torch.randn(4, 32, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    noise, t = torch.randn(4, 32, 16, 16), torch.tensor([0.1, 0.4, 0.6, 0.99])
    with torch.no_grad():
        loss = flow.flow_matching_loss(small_model, x1, y, noise=noise, t=t, cosine_weight=0.5)
        tb = t.view(4, 1, 1, 1)
        v = small_model(tb * x1 + (1 - tb) * noise, t, y)
        target = x1 - noise
        mse = (v - target).pow(2).mean((1, 2, 3))
        cos = (v * target).sum(1) / (v.norm(dim=1) * target.norm(dim=1))
        torch.testing.assert_close(loss, mse + 0.5 * (1 - cos).mean((1, 2)), rtol=1e-5, atol=1e-6)
        assert loss.shape == (4,)
        a = flow.flow_matching_loss(small_model, x1, y, generator=torch.Generator().manual_seed(5))
        b = flow.flow_matching_loss(small_model, x1, y, generator=torch.Generator().manual_seed(5))
        c = flow.flow_matching_loss(small_model, x1, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    tl = flow.sample_time(10000, torch.Generator().manual_seed(0), "logit_normal")
    assert 0 < tl.min() and tl.max() < 1 and abs(tl.mean() - 0.5) < 0.01 and tl.std() < 0.25
    with pytest.raises(MdgenError, match="time_dist"):
        flow.sample_time(3, None, "beta")


def test_training_with_label_dropout_teaches_the_null_row():
    """A few dozen seeded steps: the loss falls, the null row (index num_classes) receives
    gradient whenever a label is dropped, and no other 'null' index exists."""
    num_classes = 3
    torch.manual_seed(0)
    model = LightningDiT(depth=1, hidden_size=64, num_heads=2, patch_size=2, num_classes=num_classes,
                         class_dropout_prob=0.3)
    table = model.y_embedder.embedding_table
    assert table.num_embeddings == num_classes + 1
    init_null = table.weight[null_label(num_classes)].detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 32, 16, 16, generator=g) * 0.5 + torch.arange(8).view(8, 1, 1, 1) % 3 - 1
    y = torch.arange(8) % num_classes
    eval_noise, eval_t = torch.randn(8, 32, 16, 16, generator=g), torch.rand(8, generator=g)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return flow.flow_matching_loss(model, x1, y, noise=eval_noise, t=eval_t).mean().item()

    before = eval_loss()
    null_grad_steps = 0
    for _ in range(30):
        model.train()
        loss = flow.flow_matching_loss(model, x1, y, generator=g, time_dist="logit_normal").mean()
        opt.zero_grad()
        loss.backward()
        null_grad_steps += int(table.weight.grad[null_label(num_classes)].abs().sum() > 0)
        opt.step()
    assert eval_loss() < 0.8 * before
    assert null_grad_steps >= 5  # label dropout at 0.3 on 8 labels hits the null row most steps
    assert not torch.allclose(table.weight[null_label(num_classes)], init_null)
    model.eval()
    with pytest.raises(IndexError):
        model(x1[:1], eval_t[:1], torch.tensor([num_classes + 1]))
