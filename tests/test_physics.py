"""Read-offs from images: colormap inversion, velocity axis, torso line, envelopes, step rate, probe."""

import numpy as np
import pytest

from mdgen_helpers import physics
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.simulate import SIM_STYLES, RadarConfig, colormap_lut, get_style, render

RADAR = RadarConfig().to_json()


def _image_from_db(db: np.ndarray) -> np.ndarray:
    """Render a dB image (0 = max) exactly as the simulator does."""
    return render(10 ** (db / 10), RadarConfig())


def test_image_to_power_inverts_the_colormap():
    db = np.tile(np.linspace(-50, 0, 256)[:, None], (1, 256))
    img = _image_from_db(db)
    back = physics.image_to_power(img, RADAR["db_range"])
    assert back.shape == (256, 256)
    # within two colour steps (a few neighbouring jet entries round to the same uint8 colour)
    assert np.max(np.abs(back - db)) <= 2 * 50 / 255 + 1e-9
    assert np.mean(np.abs(back - db)) < 0.2
    # the same image as a float tensor-like array (3, H, W) in [-1, 1]
    as_float = img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(physics.image_to_power(as_float, RADAR["db_range"]), back)
    assert colormap_lut().shape == (256, 3)


@pytest.mark.parametrize("style", sorted(SIM_STYLES))
def test_image_to_power_inverts_every_styles_colour_scaling(style):
    radar = get_style(style).radar
    r = radar.to_json()
    db = np.tile(np.linspace(-r["db_range"], 0, 256)[:, None], (1, 8))
    back = physics._power(render(10 ** (db / 10), radar), r)  # the scale users.json records
    assert np.mean(np.abs(back - db)) < 0.2
    if r["color_gamma"] != 1.0:  # read as if linear, the levels are off by ~5 dB
        assert np.mean(np.abs(physics._power(render(10 ** (db / 10), radar), {**r, "color_gamma": 1.0}) - db)) > 3.0


def test_bad_image_is_a_clear_error():
    with pytest.raises(MdgenError, match="expected a uint8"):
        physics.image_to_power(np.zeros((256, 256), dtype=np.float32))


def test_row_velocities_follow_users_json_axis():
    v = physics.row_velocities(RADAR)
    assert v[0] == pytest.approx(RADAR["v_max"]) and v[-1] == pytest.approx(RADAR["v_min"])
    assert np.diff(v) == pytest.approx(-RADAR["velocity_per_row"])


def _synthetic_walker(torso_v=1.0, step_hz=1.8, foot_v=3.5):
    """A torso line plus a periodic upper edge, drawn straight into the dB image."""
    v = physics.row_velocities(RADAR)[:, None]
    t = RADAR["column_t0_s"] + np.arange(256)[None, :] * physics.column_dt(RADAR)
    edge = torso_v + (foot_v - torso_v) * np.maximum(np.sin(2 * np.pi * step_hz * t), 0.0) ** 2
    db = np.full((256, 256), -45.0)
    db = np.where((v > 0) & (v < edge), -20.0, db)
    db = np.where(np.abs(v - torso_v) < 0.03, 0.0, db)
    return _image_from_db(db)


def test_torso_envelope_and_step_rate_on_a_drawn_walker():
    img = _synthetic_walker(torso_v=1.2, step_hz=1.8, foot_v=3.6)
    assert physics.torso_velocity(img, RADAR) == pytest.approx(1.2, abs=2 * RADAR["velocity_per_row"])
    up = physics.envelope(img, RADAR, 0.99)
    assert np.nanmax(up) == pytest.approx(3.6, abs=0.15)
    assert physics.step_rate(img, RADAR) == pytest.approx(1.8, rel=0.04)
    with pytest.raises(MdgenError):
        physics.envelope(img, RADAR, 1.5)


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(5, 10))
    y = np.repeat(np.arange(5), 20)
    x = centres[y] + rng.normal(0, 1, size=(100, 10))
    train = np.arange(100) % 4 != 0
    acc = physics.user_probe_accuracy(x[train], y[train], x[~train], y[~train])
    assert acc >= 0.9
    # and it is at chance on labels that carry no information
    acc_noise = physics.user_probe_accuracy(rng.normal(size=(80, 10)), y[:80] % 5, rng.normal(size=(40, 10)), y[:40] % 5)
    assert acc_noise < 0.6
