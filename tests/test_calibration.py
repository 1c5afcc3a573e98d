"""The calibration check and reproducibility, on a small simulated set.

Held-out real images in place of generated ones must look like real data to every metric
(C2ST ~0.5, fd_ratio ~1, recognisability ratio ~1); noise images must not (C2ST ~1, fd_ratio > 1,
recognisability at chance). The tolerances are the metrics' own 95% intervals
(`evaluate.calibration_checks`), not numbers tuned to pass.
"""

import json

import pytest

from mdgen_helpers import evaluate as ev
from mdgen_helpers.report import format_calibration


@pytest.fixture(scope="module")
def sim(tmp_path_factory, write_simulated_split):
    root = tmp_path_factory.mktemp("calib")
    d, _ = write_simulated_split(root, num_users=3, per_user=40, seed=0)
    return root, d


def _cfg(root, d, out, **kw):
    base = dict(data_dir=str(d), split=str(root / "split.json"), output_dir=str(out), epochs=1, steps=40,
                batch_size=16, min_steps=0, seeds=(0,), synthetic_per_user=(0, 2), device="cpu", image_size=32,
                kid_subsets=10, recognisability_sizes=(), c2st_seeds=(0, 1), c2st_steps=20, bootstrap=200,
                physics_per_user=2, figures=False, progress=False)
    base.update(kw)
    return ev.EvalConfig(**base)


def test_calibration_check_passes_on_real_and_noise(sim, capsys):
    """`evaluate --calibrate` on the command line: exit code 0 and every check passed."""
    from mdgen_helpers.cli import main

    root, d = sim
    out = root / "calib"
    rc = main(["evaluate", "--data_dir", str(d), "--split", str(root / "split.json"), "--output_dir", str(out),
               "--calibrate", "--image_size", "32", "--epochs", "1", "--steps", "40", "--batch_size", "16",
               "--min_steps", "0", "--seeds", "0", "--recognisability_sizes", "--c2st_seeds", "0", "1",
               "--c2st_steps", "20", "--kid_subsets", "10", "--physics_per_user", "2", "--device", "cpu",
               "--no_figures", "--no_progress"])
    result = json.loads((out / "calibration.json").read_text())
    assert rc == 0 and result["passed"], format_calibration(result)
    assert "calibration passed" in capsys.readouterr().out
    got = {(c["run"], c["metric"]) for c in result["checks"]}
    assert got == {("real", "c2st_accuracy"), ("real", "fd_ratio"), ("real", "recognisability_ratio"),
                   ("noise", "c2st_accuracy"), ("noise", "fd_ratio"), ("noise", "recognisability_accuracy")}
    real = json.loads((out / "calibration_real" / "metrics.json").read_text())
    assert real["skipped"]["augmentation"].startswith("calibration")
    assert real["physics"]["step_rate_error_ratio"] > 0  # physics runs on the stand-in set too
    noise = json.loads((out / "calibration_noise" / "metrics.json").read_text())
    assert noise["classifier"]["trained_here"] is False  # one classifier serves both runs


def test_calibration_checks_fail_when_the_metrics_are_wrong():
    """A generated set that a C2ST separates, with fd_ratio above 1, must fail the real-data checks."""
    def fake(c2, fd, ratio, acc):
        return {"c2st": {"accuracy": c2[0], "interval": c2[1]},
                "realism": {"classifier_features": {"fd_ratio": {"ratio": fd[0], "interval": fd[1]}}},
                "recognisability": {"user_ids": [1, 2, 3], "ratio_to_real_test": ratio[0],
                                    "ratio_interval": ratio[1], "accuracy": acc[0], "accuracy_interval": acc[1]}}

    noise = fake((1.0, [0.98, 1.0]), (9.0, [7.0, 11.0]), (0.3, [0.2, 0.4]), (0.33, [0.2, 0.5]))
    good = fake((0.52, [0.45, 0.6]), (1.1, [0.8, 1.5]), (0.97, [0.9, 1.05]), (0.9, [0.8, 1.0]))
    assert all(c["passed"] for c in ev.calibration_checks(good, noise))
    bad = fake((0.8, [0.7, 0.9]), (2.0, [1.5, 2.6]), (0.97, [0.9, 1.05]), (0.9, [0.8, 1.0]))
    failed = {c["metric"] for c in ev.calibration_checks(bad, noise) if not c["passed"]}
    assert failed == {"c2st_accuracy", "fd_ratio"}
    assert not any(c["passed"] for c in ev.calibration_checks(good, good) if c["run"] == "noise")


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_same_command_same_metrics(sim):
    """Two runs of one evaluation write the same metrics.json, up to wall-clock timings."""
    root, d = sim
    out = root / "repro"
    runs = []
    for _ in range(2):
        ev.evaluate(_cfg(root, d, out, calibrate="real", c2st_seeds=(0,)))
        runs.append(_without_timings(json.loads((out / "metrics.json").read_text())))
    assert runs[0] == runs[1]
    assert (out / "per_image.csv").read_text().count("\n") == runs[0]["generator"]["num_images"] + 1
