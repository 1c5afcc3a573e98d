"""Stale inputs through the one-command pipeline (issue 13): a re-run never reuses results made
from other data or records settings it did not use. One cpu-smoke pipeline run (its own work
folder, the `smoke` fixture of test_pipeline), then tampered step by step.
"""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from test_pipeline import smoke  # noqa: F401 - the fixture

from mdgen_helpers import data, files, pipeline
from mdgen_helpers.errors import MdgenError, SplitMismatchError


def test_rerun_with_a_new_lr_refuses_instead_of_skipping(smoke):  # noqa: F811
    profile, root, first = smoke
    paths = pipeline.RunPaths(root)
    before = (paths.run / "config.json").read_bytes()
    with pytest.raises(MdgenError, match=rf"changed settings \(lr {profile.train.lr!r} -> 0.05\)"):
        pipeline.run_pipeline(profile, root, train_overrides={"lr": 0.05}, simulate=True)
    assert (paths.run / "config.json").read_bytes() == before
    assert files.read_json(paths.run / "config.json")["train_config"]["lr"] == profile.train.lr


def test_images_replaced_in_place_and_new_folders_stop_the_rerun(smoke):  # noqa: F811
    profile, root, _ = smoke
    paths = pipeline.RunPaths(root)
    split = data.load_split(paths.split)
    victim = split.files("train")[0]
    Image.new("RGB", (256, 256), (9, 9, 9)).save(paths.data / victim, "JPEG")
    with pytest.raises(SplitMismatchError, match=rf"1 files changed since the split was made \({victim}\)"):
        pipeline.run_pipeline(profile, root, simulate=True)
    # a new user folder (after restoring nothing): named, with how to re-split
    shutil.copytree(paths.data / split.user_map.folders[0], paths.data / "ID_99")
    with pytest.raises(SplitMismatchError, match=r"new user folders \(ID_99\).*python -m mdgen_helpers split"):
        pipeline.run_pipeline(profile, root, simulate=True)
    # after re-splitting, nothing made from the old content is reused: latents are recomputed and
    # the run trained on the old split refuses to resume
    shutil.rmtree(paths.data / "ID_99")
    report = data.validate_dataset(paths.data, workers=1)
    data.save_split(data.make_split(report, profile.split_fractions, profile.split_seed), paths.split)
    with pytest.raises(MdgenError, match="split_hash differs"):
        pipeline.run_pipeline(profile, root, simulate=True)
    from mdgen_helpers import latents

    assert latents.load_latents(paths.latents, "train").split_hash == data.load_split(paths.split).hash
