"""The simulator writes a real-data-like set, deterministically, and its images obey the physics.

Every physical check reads the rendered image back through `mdgen_helpers.physics` (the same
read-offs the evaluation uses), against the ground truth the simulator reports.
"""

import json

import numpy as np
import pytest
from PIL import Image

from mdgen_helpers import physics
from mdgen_helpers import simulate as sim
from mdgen_helpers.errors import MdgenError

RADAR_CFG = sim.RadarConfig()
RADAR = RADAR_CFG.to_json()
ROW = RADAR["velocity_per_row"]


@pytest.fixture(scope="module")
def users():
    return sim.draw_users(10, seed=3)


def _db(rgb):
    return physics.image_to_power(rgb, RADAR["db_range"])


def test_dataset_layout_and_determinism_for_any_worker_count(tmp_path):
    a = sim.simulate_dataset(tmp_path / "a", 2, 2, seed=11, workers=1, progress=False)
    b = sim.simulate_dataset(tmp_path / "b", 2, 2, seed=11, workers=2, progress=False)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.jpg"))
    assert files == ["ID_1/ID_1_0000.jpg", "ID_1/ID_1_0001.jpg", "ID_2/ID_2_0000.jpg", "ID_2/ID_2_0001.jpg"]
    for f in files + ["users.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    img = Image.open(a / files[0])
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 256)
    meta = json.loads((a / "users.json").read_text())
    assert meta["seed"] == 11 and set(meta["users"]) == {"1", "2"}
    r = meta["radar"]
    assert r["carrier_hz"] == 24e9 and r["window"] == "hamming" and r["colormap"] == "jet"
    assert r["v_max"] == pytest.approx(-r["v_min"], abs=2 * r["velocity_per_row"]) and 4.5 < r["v_max"] < 5.5
    assert r["prf_hz"] == pytest.approx(4 * 5.0 / r["wavelength_m"])  # +-5 m/s unaliased
    for key in ("height_m", "speed_mps", "cadence_hz", "step_rate_hz", "arm_swing"):
        assert key in meta["users"]["1"]
    # a different seed gives different images; rerunning into the same folder is allowed and
    # idempotent, writing into a folder holding something else is refused
    c = sim.simulate_dataset(tmp_path / "c", 2, 2, seed=12, workers=1, progress=False)
    assert (c / files[0]).read_bytes() != (a / files[0]).read_bytes()
    sim.simulate_dataset(a, 2, 2, seed=11, workers=1, progress=False)
    assert (a / files[0]).read_bytes() == (b / files[0]).read_bytes()
    with pytest.raises(MdgenError, match="not empty"):
        sim.simulate_dataset(a, 2, 2, seed=99, workers=1, progress=False)


def test_cli_help_and_bad_input(tmp_path, capsys):
    from mdgen_helpers.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    assert "--carrier-ghz" in capsys.readouterr().out
    assert main(["simulate", "--out", str(tmp_path / "x"), "--users", "0", "--no-progress"]) == 2


def test_users_are_distinct_and_some_barely_swing_arms():
    us = sim.draw_users(31, seed=0)
    z = np.array([[getattr(u, k) for k in sim.USER_RANGES] for u in us])
    z = (z - z.min(0)) / (z.max(0) - z.min(0))
    d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.eye(31) * 9
    assert d.min() > 0.2
    assert any(u.arm_swing < 0.15 for u in us) and any(u.arm_swing > 1.0 for u in us)
    assert sim.draw_users(5, seed=0) == us[:5]  # users do not depend on how many are drawn after


@pytest.mark.parametrize("aspect", [0.0, 12.0])
def test_torso_line_sits_at_two_v_cos_theta_over_lambda(users, aspect):
    for u in users[:4]:
        rgb, truth = sim.simulate_image(u, RADAR_CFG, 0, 1, aspect_deg=aspect)
        expected_v = truth["speed_mps"] * np.cos(np.deg2rad(aspect))
        doppler_hz = 2 * expected_v / RADAR["wavelength_m"]
        measured_hz = 2 * physics.torso_velocity(rgb, RADAR) / RADAR["wavelength_m"]
        row_hz = RADAR["prf_hz"] / RADAR["nfft"]
        assert abs(measured_hz - doppler_hz) <= 2 * row_hz, (u.user_id, measured_hz, doppler_hz)


def test_upper_envelope_period_is_the_step_rate(users):
    for u in users[:4]:
        rgb, truth = sim.simulate_image(u, RADAR_CFG, 0, 2)
        assert physics.step_rate(rgb, RADAR) == pytest.approx(truth["step_rate_hz"], rel=0.06), u.user_id


def test_feet_reach_three_to_four_and_a_half_times_torso_and_nothing_wraps(users):
    ratios = []
    for u in users:
        # fastest corner of the per-sample jitter: the feet are at their fastest
        rgb, truth = sim.simulate_image(u, RADAR_CFG, 0, 3, speed_scale=1.1, cadence_scale=1.1, aspect_deg=0.0)
        db = _db(rgb)
        ratios.append(np.nanmax(physics.envelope(rgb, RADAR, 0.97)) / physics.torso_velocity(rgb, RADAR))
        hot = db > np.median(db) + 12.0  # clearly above the noise floor
        assert hot[:2].mean() < 0.01 and hot[-2:].mean() < 0.01, (u.user_id, hot[:2].mean(), hot[-2:].mean())
        assert truth["max_radial_mps"] < RADAR["v_max"]
    assert 3.0 <= np.median(ratios) <= 4.5, ratios
    # slow walkers swing their feet relatively faster (Boulic: joint amplitudes barely shrink with RV)
    assert 2.5 <= min(ratios) and max(ratios) <= 6.0, ratios


def test_arm_band_empties_without_arm_swing(users):
    v = physics.row_velocities(RADAR)
    gains = []
    for u in users[:3]:
        band_db = []
        for arm in (0.0, 1.5):
            rgb, _ = sim.simulate_image(sim.replace(u, arm_swing=arm), RADAR_CFG, 0, 4)
            tv = physics.torso_velocity(rgb, RADAR)
            band = (v > 1.3 * tv) & (v < 2.0 * tv)  # hands swing forward up to ~2x the torso speed
            band_db.append(10 * np.log10(np.mean(10 ** (_db(rgb)[band] / 10))))
        gains.append(band_db[1] - band_db[0])
    assert min(gains) > 1.0 and np.mean(gains) > 2.0, gains


def test_doubling_speed_doubles_torso_doppler(users):
    u = users[0]
    tv = [physics.torso_velocity(sim.simulate_image(sim.replace(u, speed_mps=s), RADAR_CFG, 0, 5, aspect_deg=0.0,
                                                    speed_scale=1.0)[0], RADAR) for s in (0.5, 1.0)]
    assert tv[1] == pytest.approx(2 * tv[0], abs=3 * ROW), tv


def test_other_carriers_render_the_same_axis(users):
    for ghz in (5.8, 77.0):
        cfg = sim.RadarConfig(carrier_ghz=ghz)
        r = cfg.to_json()
        rgb, truth = sim.simulate_image(users[1], cfg, 0, 6, aspect_deg=0.0)
        assert rgb.shape == (256, 256, 3)
        assert physics.torso_velocity(rgb, r) == pytest.approx(truth["speed_mps"], abs=3 * r["velocity_per_row"])


def test_a_small_probe_recognises_users_well_above_chance_but_not_perfectly():
    us = sim.draw_users(8, seed=5)
    x, y, idx = [], [], []
    for u in us:
        for i in range(7):
            rgb, _ = sim.simulate_image(u, RADAR_CFG, 5, i)
            x.append(physics.gait_features(rgb, RADAR))
            y.append(u.user_id - 1)
            idx.append(i)
    x, y, idx = np.array(x), np.array(y), np.array(idx)
    train = idx < 4
    acc = physics.user_probe_accuracy(x[train], y[train], x[~train], y[~train])
    assert acc > 3 * (1 / 8), acc  # well above chance (12.5%)
    # and the users are not trivially separable by mean speed alone (nuisances matter)
    speed_only = physics.user_probe_accuracy(x[train][:, 64:66], y[train], x[~train][:, 64:66], y[~train])
    assert speed_only < acc


# ----------------------------------------------------------------------------------------------
# Styles: the same people, rendered by another radar
# ----------------------------------------------------------------------------------------------


def test_a_style_changes_the_pixels_but_not_the_users(tmp_path):
    a = sim.simulate_dataset(tmp_path / "a", 3, 2, seed=4, workers=1, progress=False)
    b = sim.simulate_dataset(tmp_path / "b", 3, 2, seed=4, workers=1, progress=False, style="mmwave")
    ma, mb = (json.loads((d / "users.json").read_text()) for d in (a, b))
    assert ma["users"] == mb["users"] and (ma["style"], mb["style"]) == ("default", "mmwave")
    ra, rb = ma["radar"], mb["radar"]
    assert (ra["carrier_hz"], ra["db_range"], ra["color_gamma"], ra["window"]) == (24e9, 50.0, 1.0, "hamming")
    assert (rb["carrier_hz"], rb["db_range"], rb["color_gamma"], rb["window"]) == (77e9, 40.0, 0.7, "hann")
    assert rb["prf_hz"] == pytest.approx(ra["prf_hz"] * 77 / 24)
    assert (ra["v_max"], ra["v_min"], ra["velocity_per_row"]) == pytest.approx((rb["v_max"], rb["v_min"], rb["velocity_per_row"]))
    assert ma["nuisances"]["noise_below_torso_db"] != mb["nuisances"]["noise_below_torso_db"]
    for f in sorted(p.relative_to(a) for p in a.rglob("*.jpg")):
        pa = np.asarray(Image.open(a / f), dtype=float)
        pb = np.asarray(Image.open(b / f), dtype=float)
        assert np.abs(pa - pb).mean() > 10, f  # clearly another rendering (measured ~18 of 255)
    # users are checked against each style's own axis: every style must keep the default one
    for look in sim.SIM_STYLES.values():
        assert sim.draw_users(8, 4, 0.93 * look.radar.v_span_mps) == sim.draw_users(8, 4)
    # a data set is one style: writing the other style into it is refused
    with pytest.raises(MdgenError, match="not empty"):
        sim.simulate_dataset(a, 3, 2, seed=4, workers=1, progress=False, style="mmwave")


@pytest.mark.parametrize("style", sorted(sim.SIM_STYLES))
def test_physics_readout_recovers_the_truth_in_every_style(users, style):
    look = sim.get_style(style)
    r = look.radar.to_json()  # what users.json holds, and all the readout gets
    for u in users[:4]:
        rgb, truth = sim.simulate_image(u, look.radar, 0, 2, look.nuisances)
        v = truth["speed_mps"] * np.cos(np.deg2rad(truth["aspect_deg"]))
        assert physics.torso_velocity(rgb, r) == pytest.approx(v, abs=2 * r["velocity_per_row"]), u.user_id
        assert physics.step_rate(rgb, r) == pytest.approx(truth["step_rate_hz"], rel=0.06), u.user_id


def test_the_evaluation_physics_check_follows_the_data_sets_style(tmp_path):
    from mdgen_helpers import data, metrics

    d = sim.simulate_dataset(tmp_path / "sim", num_users=2, per_user=3, seed=0, workers=1, progress=False,
                             style="mmwave")
    split = data.make_split(data.validate_dataset(d), seed=0)
    files = [d / f for p in ("train", "val", "test") for f in split.files(p)]
    labels = [l for p in ("train", "val", "test") for l in split.labels(p)]
    r = metrics.physics_check(d / "users.json", split.user_map, (files, labels), (files, labels), max_per_user=3)
    assert r["torso_velocity_mae_generated"] < 0.1 and r["step_rate_mae_generated"] < 0.15, r


def test_an_unknown_style_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from mdgen_helpers import pipeline
    from mdgen_helpers.cli import main
    from mdgen_helpers.profiles import get_profile

    assert main(["simulate", "--out", str(tmp_path / "x"), "--style", "x-band", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown simulator style 'x-band'" in err and "mmwave" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    # from the profile (MDGEN_SIM_STYLE, demo --set, pipeline --sim_style): where the data is simulated
    monkeypatch.setenv("MDGEN_SIM_STYLE", "x-band")
    paths = pipeline.RunPaths(tmp_path / "w")
    with pytest.raises(MdgenError, match="unknown simulator style 'x-band'"):
        pipeline.ensure_data(paths, get_profile("cpu-smoke"), simulate=True, progress=False)
    assert not paths.data.exists()
    monkeypatch.delenv("MDGEN_SIM_STYLE")
    assert main(["pipeline", "--profile", "cpu-smoke", "--simulate", "--output_dir", str(tmp_path / "p"),
                 "--sim_style", "x-band"]) == 2
    assert "unknown simulator style 'x-band'" in capsys.readouterr().err


def test_the_cli_style_flag_and_carrier_override(tmp_path):
    from mdgen_helpers.cli import main

    assert main(["simulate", "--out", str(tmp_path / "m"), "--users", "1", "--per-user", "1", "--style", "mmwave",
                 "--workers", "1", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "m" / "users.json").read_text())
    assert meta["style"] == "mmwave" and meta["radar"]["carrier_hz"] == 77e9 and meta["radar"]["color_gamma"] == 0.7
    assert main(["simulate", "--out", str(tmp_path / "c"), "--users", "1", "--per-user", "1", "--carrier-ghz", "5.8",
                 "--workers", "1", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "c" / "users.json").read_text())
    assert meta["style"] == "default" and meta["radar"]["carrier_hz"] == 5.8e9 and meta["radar"]["db_range"] == 50.0
