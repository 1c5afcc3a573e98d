"""The one-command pipeline: stages in order, finished stages skipped, few-shot regimes isolated."""

import pytest

from mdgen_helpers import data, pipeline
from mdgen_helpers.files import read_json
from mdgen_helpers.profiles import get_profile


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A full cpu-smoke pipeline run (simulate, split, random VA-VAE, extract, train, generate)."""
    profile = get_profile("cpu-smoke")
    root = tmp_path_factory.mktemp("pipe")
    first = pipeline.run_pipeline(profile, root)
    return profile, root, first


def test_pipeline_writes_every_artifact(smoke):
    profile, root, first = smoke
    paths = pipeline.RunPaths(root)
    for f in (paths.split, paths.random_vavae, paths.latents / "stats.safetensors", paths.run / "ema.safetensors",
              paths.generated / "manifest.json", paths.generated / "micro_doppler_grid.png"):
        assert f.is_file(), f
    manifest = read_json(paths.generated / "manifest.json")
    assert len(manifest["images"]) == profile.sim_users * profile.num_samples_per_user
    assert manifest["split_hash"] == data.load_split(paths.split).hash
    assert first["train"]["step"] == profile.train.max_steps


def test_rerun_skips_finished_stages(smoke):
    profile, root, first = smoke
    paths = pipeline.RunPaths(root)
    ema_before = (paths.run / "ema.safetensors").stat().st_mtime_ns
    manifest_before = (paths.generated / "manifest.json").read_bytes()
    again = pipeline.run_pipeline(profile, root)
    assert set(again["latents"].values()) == {"skipped"}
    assert again["train"]["step"] == profile.train.max_steps
    assert (paths.run / "ema.safetensors").stat().st_mtime_ns == ema_before  # no training step was taken
    assert (paths.generated / "manifest.json").read_bytes() == manifest_before


def test_few_shot_regime_sees_only_its_subset(smoke):
    from mdgen_helpers import evaluate

    profile, root, _ = smoke
    k = 2
    out = pipeline.run_pipeline(profile, root, few_shot=k)
    base, regime = pipeline.RunPaths(root), pipeline.RunPaths(root).few_shot(k)
    assert out["work_dir"] == str(regime.root)
    full, sub = data.load_split(base.split), data.load_split(regime.split)
    assert sub.hash == evaluate.few_shot_split(full, k, profile.split_seed).hash
    assert all(n <= k for n in (sum(1 for l in sub.labels("train") if l == u) for u in range(full.user_map.num_users)))
    assert sub.files("test") == full.files("test") and sub.files("val") == full.files("val")
    from mdgen_helpers import latents

    assert len(latents.load_latents(regime.latents, "train").labels) == len(sub.files("train"))
    manifest = read_json(regime.generated / "manifest.json")
    assert manifest["split_hash"] == sub.hash  # what the evaluation's leakage guard checks
    assert not (base.root / "data").joinpath("split.json").exists()  # the data folder is never written to


def test_few_shot_evaluation_draws_the_subset_with_the_split_seed(smoke, tmp_path, monkeypatch):
    """MDGEN_SPLIT_SEED=1: the pipeline draws the few-shot subset with seed 1, and the evaluation
    must redraw the same subset (it used seed 0 and refused the generator with LeakageError)."""
    from mdgen_helpers import evaluate

    monkeypatch.setenv("MDGEN_SPLIT_SEED", "1")
    profile = get_profile("cpu-smoke")
    assert profile.split_seed == 1
    _, root, _ = smoke
    paths, k = pipeline.RunPaths(tmp_path), 2
    data_dir = pipeline.RunPaths(root).data
    full = pipeline.prepare_split(paths, profile, data_dir)
    sub = pipeline.prepare_split(paths.few_shot(k), profile, data_dir, few_shot=k, full_split_path=paths.split)
    assert sub.hash != evaluate.few_shot_split(full, k, 0).hash  # seed 0 would draw another subset
    cfg = pipeline.eval_config(paths, profile, data_dir)
    redrawn = evaluate.few_shot_split(full, k, cfg.few_shot_seed)  # what evaluate() does per regime
    assert redrawn.hash == sub.hash
    evaluate.check_generator_split({"split_hash": sub.hash}, redrawn.hash, f"few_shot_{k}")  # no LeakageError
