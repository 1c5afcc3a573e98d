"""Evaluation: leakage guard, classifier on an easy set, metrics.json layout, tables, CLI errors.

The fixture is a small easy data set in the real layout (ID_k/*.jpg): each user's images carry a
bright band at a user-specific Doppler row on noise, so a classifier must learn it (chance is 1/3).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdgen_helpers import classifier, data, metrics, report
from mdgen_helpers import evaluate as ev
from mdgen_helpers.files import atomic_write_json, sha256_file

USERS = 3
PER_USER = 24
SIZE = 32  # classifier input size in the tests


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.integers(0, 90, size=(256, 256, 3), dtype=np.uint8)
    row = 30 + 80 * label + int(rng.integers(-6, 7))
    img[row:row + 28, :, 0] = 230
    img[row:row + 28, :, 1] = rng.integers(150, 255)
    return img


def _write_generated(gen_dir: Path, split_hash: str, per_user: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    records = []
    gen_dir.mkdir(parents=True)
    for label in range(USERS):
        for k in range(1, per_user + 1):
            name = f"micro_doppler_user{label + 1:02d}_{k:03d}.png"
            Image.fromarray(_image(label, rng)).save(gen_dir / name)
            records.append({"file": name, "user_id": label + 1, "sample_index": k})
    atomic_write_json(gen_dir / "manifest.json", {"split_hash": split_hash, "checkpoint_sha256": "0" * 64,
                                                   "images": records, "settings": {"guidance_scale": 4.0}})


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    data_dir = root / "data"
    rng = np.random.default_rng(0)
    for label in range(USERS):
        folder = data_dir / f"ID_{label + 1}"
        folder.mkdir(parents=True)
        for i in range(PER_USER):
            Image.fromarray(_image(label, rng)).save(folder / f"ID_{label + 1}_{i:04d}.jpg", quality=95)
    split = data.make_split(data.validate_dataset(data_dir), seed=0)
    split_path = root / "split.json"
    data.save_split(split, split_path)
    gen_dir = root / "gen"
    _write_generated(gen_dir, split.hash, per_user=6, seed=1)
    fs_dir = root / "gen_fs4"
    _write_generated(fs_dir, ev.few_shot_split(split, 4, 0).hash, per_user=4, seed=2)
    return {"root": root, "data_dir": data_dir, "split": split, "split_path": split_path, "gen_dir": gen_dir,
            "fs_dir": fs_dir}


def _cfg(easy, out, **kw):
    base = dict(data_dir=str(easy["data_dir"]), split=str(easy["split_path"]), output_dir=str(out),
                generated_dir=str(easy["gen_dir"]), epochs=2, batch_size=16, min_steps=0, seeds=(0,),
                synthetic_per_user=(0, 3), device="cpu", image_size=SIZE, kid_subsets=5, progress=False,
                recognisability_sizes=(), c2st_seeds=(0,), c2st_steps=4, bootstrap=20)
    base.update(kw)
    return ev.EvalConfig(**base)


def test_leakage_guard_rejects_val_test_by_path_and_by_content(easy, tmp_path):
    split, data_dir = easy["split"], easy["data_dir"]
    train_files = [data_dir / f for f in split.files("train")]
    assert ev.check_no_leakage(train_files, split, data_dir) == len(train_files)
    test_file = data_dir / split.files("test")[0]
    with pytest.raises(ev.LeakageError, match="test image"):
        ev.check_no_leakage(train_files + [test_file], split, data_dir)
    # The same val image reached through a different path spelling is still the same file.
    val_rel = split.files("val")[0]
    with pytest.raises(ev.LeakageError, match="val image"):
        ev.check_no_leakage([data_dir / "ID_1" / ".." / val_rel], split, data_dir)
    renamed = tmp_path / "elsewhere" / "innocent_name.jpg"
    renamed.parent.mkdir()
    shutil.copyfile(test_file, renamed)
    with pytest.raises(ev.LeakageError, match="same content"):
        ev.check_no_leakage(train_files + [renamed], split, data_dir, "augmented set")


def test_generator_trained_on_another_split_is_refused(easy):
    info = {"split_hash": "f" * 64}
    with pytest.raises(ev.LeakageError, match="trained on split"):
        ev.check_generator_split(info, easy["split"].hash, "generated set")
    assert ev.check_generator_split({"split_hash": easy["split"].hash}, easy["split"].hash, "x").startswith("verified")
    assert ev.check_generator_split({}, easy["split"].hash, "x").startswith("unverified")


def test_classifier_learns_easy_set_and_roundtrips(easy, tmp_path):
    split, data_dir = easy["split"], easy["data_dir"]
    parts = {p: classifier.load_split_part(data_dir, split, p, SIZE) for p in ("train", "val", "test")}
    clf = ev.fit_user_classifier(data_dir, split, parts["train"], parts["val"], image_size=SIZE, epochs=6, seed=0,
                                 device=torch.device("cpu"), batch_size=16, min_steps=0)
    rep = classifier.classification_report(clf.model, parts["test"], split.user_map)
    assert rep["accuracy"] >= 0.9, rep
    assert np.asarray(rep["confusion_matrix"]).sum() == len(parts["test"])
    path = classifier.save_classifier(clf, tmp_path / "clf.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["split_hash"] == split.hash
    again = classifier.load_classifier(path)
    f1, p1 = classifier.embed(clf.model, parts["test"].images)
    f2, p2 = classifier.embed(again.model, parts["test"].images)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    assert f1.shape == (len(parts["test"]), 512)
    # Same seed, same model: training is reproducible (one step on a small subset is enough to see it).
    small = parts["train"].subset(range(16))
    clf2 = ev.fit_user_classifier(data_dir, split, small, parts["val"], image_size=SIZE, epochs=1, seed=3,
                                  device=torch.device("cpu"), batch_size=16, min_steps=0)
    clf3 = ev.fit_user_classifier(data_dir, split, small, parts["val"], image_size=SIZE, epochs=1, seed=3,
                                  device=torch.device("cpu"), batch_size=16, min_steps=0)
    for a, b in zip(clf2.model.state_dict().values(), clf3.model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def full_run(easy, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = _cfg(easy, out, few_shot=(4,), few_shot_generated={4: str(easy["fs_dir"])}, filter_confidence=0.34,
               recognisability_sizes=(48,))
    return out, ev.evaluate(cfg)


def test_metrics_json_has_documented_keys(full_run, easy):
    out, m = full_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["complete"] is True
    for key in ("settings", "split_hash", "generator_manifest_sha256", "classifier", "recognisability", "realism",
                "memorisation", "augmentation", "filtering", "headline", "figures", "skipped"):
        assert key in on_disk, key
    assert on_disk["split_hash"] == easy["split"].hash
    assert on_disk["generator_manifest_sha256"] == sha256_file(easy["gen_dir"] / "manifest.json")
    assert on_disk["generator"]["split_check"].startswith("verified")
    rec = on_disk["recognisability"]
    assert set(rec["per_user"]) == {"1", "2", "3"} and 0 <= rec["ratio_to_real_test"] < 10
    fm = on_disk["realism"]["classifier_features"]
    for side in ("generated_vs_test", "baseline_val_vs_test"):
        assert {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage"} <= set(fm[side])
    # matched sample size: the generated set (18) is subsampled to real-val's size
    n_val = len(easy["split"].files("val"))
    assert fm["baseline_val_vs_test"]["num_fake"] == fm["generated_vs_test"]["num_fake"] == min(18, n_val)
    assert fm["generated_vs_test"]["kid_subset_size"] <= min(18, n_val) // 2  # subsets differ: kid_std is real
    r = fm["fd_ratio"]
    assert r["interval"][0] <= r["ratio"] <= r["interval"][1]
    assert r["ratio"] == pytest.approx(r["fd_generated"] / r["fd_baseline"])
    assert set(rec["by_size"]) == {str(SIZE), "48"}
    assert all(0 <= v["real_train_accuracy"] <= 1 for v in rec["by_size"].values())
    c2 = on_disk["c2st"]
    assert 0 <= c2["interval"][0] <= c2["accuracy"] <= c2["interval"][1] <= 1 and c2["image_size"] == 256
    assert "skipped" in on_disk["realism"]["inception"]
    mem = on_disk["memorisation"]
    assert {"feature", "pixel", "near_copies", "rule", "fraction_flagged"} <= set(mem)
    aug = on_disk["augmentation"]
    assert {"full", "filtered", "few_shot_4"} <= set(aug)
    assert {"real_only", "real_plus_synthetic", "synthetic_only", "gain_real_plus_synthetic",
            "synthetic_only_ratio"} <= set(aug["full"])
    # matched compute: every arm of a regime trains for the same number of steps
    assert aug["full"]["steps"] == on_disk["settings"]["steps"]
    assert aug["full"]["real_plus_synthetic"]["3"]["num_synthetic"] == 9
    assert aug["few_shot_4"]["num_real_train"] == 12
    assert aug["few_shot_4"]["split_hash"] == ev.few_shot_split(easy["split"], 4, 0).hash
    assert aug["filtered"]["real_only"] == aug["full"]["real_only"]
    assert "physics" in on_disk["skipped"]  # the easy set has no users.json
    for name in on_disk["figures"]:
        assert (out / name).is_file()
    assert {"confusion_real_test.png", "embedding_pca.png", "augmentation_gain.png",
            "c2st_most_sure.png"} <= set(on_disk["figures"])
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0] == "file,user,seed,classifier_confidence,predicted_user,nearest_train_distance,c2st_score"
    assert len(rows) == 1 + 18
    assert (out / "classifier.safetensors").is_file() and (out / "headline.md").is_file()


def test_headline_table_pairs_every_metric_with_a_baseline(full_run):
    _, m = full_run
    rows = report.headline_table(m)
    names = [r[0] for r in rows]
    assert any("recognisability ratio at 32 px" in n for n in names)
    assert any("recognisability ratio at 48 px" in n for n in names)
    assert any("Fréchet" in n for n in names) and any("FD ratio" in n for n in names)
    assert any(n.startswith("C2ST accuracy") for n in names)
    assert any(n.startswith("gain_real_plus_synthetic") for n in names)
    assert any(n.startswith("synthetic_only_ratio") for n in names)
    assert any("real + 3 synthetic/user" in n for n in names)
    assert any("few_shot_4" in n for n in names)
    assert all(len(r) == 3 and r[2] not in ("", None) for r in rows)
    text = report.format_table(rows)
    assert text.splitlines()[0] == "| metric | generated | real baseline |"
    assert len(text.splitlines()) == len(rows) + 2


def test_saved_classifier_is_reused_and_split_checked(full_run, easy, tmp_path):
    out, _ = full_run
    clf_path = out / "classifier.safetensors"
    m = ev.evaluate(_cfg(easy, tmp_path / "again", classifier=str(clf_path), image_size=None, seeds=(),
                         figures=False))
    assert m["classifier"]["trained_here"] is False and m["settings"]["image_size"] == SIZE
    assert "augmentation" in m["skipped"]
    # A split with other assignments must not be evaluated with this classifier.
    other = data.make_split(data.validate_dataset(easy["data_dir"]), seed=5)
    other_path = tmp_path / "other_split.json"
    data.save_split(other, other_path)
    with pytest.raises(ev.ArtifactMismatchError):
        ev.evaluate(_cfg(easy, tmp_path / "x", split=str(other_path), classifier=str(clf_path), image_size=None))


def test_cli_reports_bad_input_without_traceback(easy, tmp_path, capsys):
    from mdgen_helpers.cli import main

    rc = main(["evaluate", "--data_dir", str(easy["data_dir"]), "--split", str(tmp_path / "missing.json"),
               "--output_dir", str(tmp_path / "o")])
    assert rc == 2
    assert "no split file" in capsys.readouterr().err


def test_physics_check_reads_simulated_truth(tmp_path):
    """The read-off of simulated images lands near users.json truth; same files, same error."""
    from mdgen_helpers.simulate import simulate_dataset

    d = simulate_dataset(tmp_path / "sim", num_users=2, per_user=3, seed=0, workers=1, progress=False)
    split = data.make_split(data.validate_dataset(d), seed=0)
    files = [d / f for p in ("train", "val", "test") for f in split.files(p)]
    labels = [l for p in ("train", "val", "test") for l in split.labels(p)]
    r = metrics.physics_check(d / "users.json", split.user_map, (files, labels), (files[:2], labels[:2]), max_per_user=2)
    assert set(r["per_user"]) == {"1", "2"}
    assert r["torso_velocity_mae_generated"] < 0.25 and r["step_rate_mae_generated"] < 0.4, r
    assert r["step_rate_error_ratio"] == pytest.approx(r["step_rate_mae_generated"] / r["step_rate_mae_real_test"])
    row = r["per_user"]["1"]
    assert {"torso_velocity_truth", "torso_velocity_generated", "step_rate_real_test"} <= set(row)
