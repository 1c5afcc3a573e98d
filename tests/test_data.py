"""Data layer: discovery, validation of a bad-input corpus, the persisted split, image loading."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdgen_helpers import data
from mdgen_helpers.cli import main as cli_main
from mdgen_helpers.errors import DataError, MdgenError, SplitMismatchError
from mdgen_helpers.users import UserMap


def _rgb(seed: int, w: int = 256, h: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _jpeg(seed: int, w: int = 256, h: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(seed, w, h)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """ID_1, ID_2, ID_10 usable (with one bad case each), ID_3 empty, ID_4 nothing usable."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(6):
        _write(root / "ID_1" / f"ID_1_{k:04d}.jpg", _jpeg(100 + k))
        _write(root / "ID_10" / f"ID_10_{k:04d}.jpg", _jpeg(1000 + k))
    for k in range(4):
        _write(root / "ID_2" / f"ID_2_{k:04d}.jpg", _jpeg(200 + k))
    good = _jpeg(100)
    _write(root / "ID_1" / "truncated.jpg", good[: len(good) // 2])
    _write(root / "ID_1" / "zero.jpg", b"")
    _write(root / "ID_1" / "notes.txt", b"recorded on a sunny day\n")
    _write(root / "ID_2" / "gray.png", _png(Image.fromarray(_rgb(7)[..., 0])))
    _write(root / "ID_2" / "rgba.png", _png(Image.fromarray(np.dstack([_rgb(8), np.full((256, 256), 255, np.uint8)]))))
    _write(root / "ID_2" / "deep16.png", _png(Image.fromarray((np.arange(256 * 256).reshape(256, 256) % 65536).astype(np.uint16))))
    _write(root / "ID_2" / "wide.jpg", _jpeg(9, w=300, h=200))
    _write(root / "ID_2" / "copy_of_1.jpg", good)  # same bytes as ID_1/ID_1_0000.jpg
    (root / "ID_3").mkdir()
    _write(root / "ID_4" / "bad.jpg", b"")
    _write(root / "ID_4" / "readme.txt", b"nothing here")
    _write(root / "users.json", b"{}")
    _write(root / ".ipynb_checkpoints" / "x.jpg", b"")
    return root


@pytest.fixture(scope="module")
def report(corpus):
    return data.validate_dataset(corpus, workers=4)


def _fake_report(per_user: dict[str, int]) -> data.ValidationReport:
    """A report without image files, for split properties on many files."""
    um = UserMap.from_folders(per_user)
    recs = [data.FileRecord(f"{f}/{f}_{i:05d}.jpg", um.folders.index(f), f"{f}{i}")
            for f, n in per_user.items() for i in range(n)]
    return data.ValidationReport("fake", um, recs, [])


# ---------------------------------------------------------------- discovery

def test_numeric_sorting(tmp_path):
    for name in ["ID_10", "ID_2", "ID_1", "ID_11", "ID_3"]:
        (tmp_path / name).mkdir()
    (tmp_path / "split.json").write_text("{}")
    um = data.discover_users(tmp_path)
    assert um.folders == ("ID_1", "ID_2", "ID_3", "ID_10", "ID_11")
    assert um.user_ids == (1, 2, 3, 10, 11)
    assert um.label_of_user(2) == 1 and um.num_users == 5


def test_foreign_folder_names_get_saved_mapping(tmp_path):
    for i, name in enumerate(["walker", "alice", "ID_1"]):
        _write(tmp_path / name / "a.jpg", _jpeg(i))
    rep = data.validate_dataset(tmp_path, workers=2)
    assert rep.user_map.folders == ("ID_1", "alice", "walker")
    assert rep.user_map.user_ids == (1, 2, 3)
    assert "alice -> user 2 (label 1)" in rep.summary()
    split = data.make_split(rep)
    data.save_split(split, tmp_path / "split.json")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["user_map"] == {"folders": ["ID_1", "alice", "walker"], "user_ids": [1, 2, 3]}
    assert [saved["parts"][p].get("walker/a.jpg") for p in data.PARTS].count(2) == 1


def test_missing_and_wrapped_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.discover_users(tmp_path / "nope")
    _write(tmp_path / "loose.jpg", _jpeg(0))
    with pytest.raises(DataError, match="one folder per user"):
        data.discover_users(tmp_path)
    _write(tmp_path / "dataset" / "ID_1" / "a.jpg", _jpeg(0))
    with pytest.raises(DataError, match="--data_dir .*dataset"):
        data.discover_users(tmp_path)


# ---------------------------------------------------------------- validation

def test_bad_inputs_are_reported(report):
    skipped = {s.relpath: s for s in report.skipped}
    assert skipped["ID_1/truncated.jpg"].kind == "truncated"
    assert "truncated" in skipped["ID_1/truncated.jpg"].reason
    assert skipped["ID_1/zero.jpg"].reason == "empty file (0 bytes)"
    assert skipped["ID_1/notes.txt"].kind == "not_image"
    assert skipped["ID_2/copy_of_1.jpg"].kind == "label_conflict"  # the same image under two users
    assert "ID_1/ID_1_0000.jpg" in skipped["ID_2/copy_of_1.jpg"].reason
    notes = {r.relpath: r.notes for r in report.records}
    assert notes["ID_2/gray.png"] == ("grayscale (mode L) converted to RGB",)
    assert notes["ID_2/rgba.png"] == ("RGBA converted to RGB (alpha dropped)",)
    assert notes["ID_2/deep16.png"] == ("16-bit grayscale (mode I;16) scaled to 8-bit RGB",)
    assert notes["ID_2/wide.jpg"] == ("resized from 300x200 to 256x256",)
    assert notes["ID_1/ID_1_0000.jpg"] == ()
    # only files inside user folders are looked at
    assert not any("users.json" in p or "ipynb" in p for p in list(skipped) + list(notes))


def test_empty_and_unusable_folders_are_dropped(report):
    assert report.user_map.folders == ("ID_1", "ID_2", "ID_10")  # user count from the data
    assert report.user_map.user_ids == (1, 2, 10)
    dropped = dict(report.skipped_users)
    assert dropped["ID_3"] == "empty folder"
    assert dropped["ID_4"] == "no usable image among 2 files"
    rows = {r["folder"]: r for r in report.per_user()}
    assert rows["ID_1"]["ok"] == 6 and rows["ID_1"]["skipped"] == 3 and rows["ID_1"]["status"] == "ok"
    assert rows["ID_2"]["ok"] == 8 and rows["ID_2"]["converted"] == 4
    assert rows["ID_4"]["status"].startswith("skipped: no usable image") and rows["ID_4"]["label"] is None
    summary = report.summary()
    assert "user folder ID_3 skipped: empty folder" in summary and "1 x truncated" in summary
    js = json.loads(json.dumps(report.to_json()))
    assert len(js["records"]) == 20 and len(js["skipped"]) == 6


def test_nothing_usable_is_a_clear_error(tmp_path):
    _write(tmp_path / "ID_1" / "a.txt", b"text")
    _write(tmp_path / "ID_2" / "b.jpg", b"")
    with pytest.raises(DataError, match="no usable images .*empty_file, not_image"):
        data.validate_dataset(tmp_path)


def test_validation_with_saved_user_map(corpus):
    um = UserMap(("ID_1", "ID_2"), (1, 2))
    rep = data.validate_dataset(corpus, user_map=um, workers=2)
    assert rep.user_map == um
    assert {r.label for r in rep.records} == {0, 1}
    assert "not in the given user map" in dict(rep.skipped_users)["ID_10"]


# ---------------------------------------------------------------- split

def test_split_proportions_and_no_overlap():
    rep = _fake_report({"ID_1": 600, "ID_2": 600, "ID_3": 40})
    split = data.make_split(rep, (0.7, 0.15, 0.15), seed=0)
    sets = [set(split.files(p)) for p in data.PARTS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 1240
    for label, c in split.counts().items():
        n = sum(c.values())
        if n == 600:  # binomial sd of the train share is ~1.9 points here; 6 sd margin
            assert abs(c["train"] / n - 0.7) < 0.11 and abs(c["val"] / n - 0.15) < 0.09
        assert c["train"] and c["val"] and c["test"]
    assert all(l == rep.user_map.folders.index(f.split("/")[0]) for p in data.PARTS
               for f, l in split.parts[p])


def test_split_deterministic_and_seeded():
    rep = _fake_report({"ID_1": 50, "ID_2": 50})
    a, b = data.make_split(rep, seed=3), data.make_split(rep, seed=3)
    assert a.parts == b.parts and a.hash == b.hash
    assert data.make_split(rep, seed=4).hash != a.hash


def test_split_stable_when_files_are_added():
    old = data.make_split(_fake_report({"ID_1": 200, "ID_2": 200}), seed=0)
    new = data.make_split(_fake_report({"ID_1": 300, "ID_2": 260, "ID_3": 50}), seed=0)
    part_new = {f: p for p in data.PARTS for f in new.files(p)}
    assert all(part_new[f] == p for p in data.PARTS for f in old.files(p))
    assert len(part_new) == 610


def test_small_users_get_val_and_test():
    split = data.make_split(_fake_report({f"ID_{k}": 3 for k in range(1, 21)} | {"ID_99": 1}), seed=0)
    counts = split.counts()
    for label, c in counts.items():
        if label < 20:
            assert c == {"train": 1, "val": 1, "test": 1}
    assert counts[20] == {"train": 1, "val": 0, "test": 0}  # a single file always goes to train
    assert split.forced  # with 3 files per user, some parts had to be filled
    with pytest.raises(MdgenError, match="summing to 1"):
        data.make_split(_fake_report({"ID_1": 5}), (0.5, 0.2, 0.2))


def test_split_json_round_trip_and_tamper(tmp_path):
    split = data.make_split(_fake_report({"ID_1": 30, "ID_2": 30}), (0.6, 0.2, 0.2), seed=7)
    path = data.save_split(split, tmp_path / "work" / "split.json")
    back = data.load_split(path)
    assert back.parts == split.parts and back.hash == split.hash
    assert back.seed == 7 and back.fractions == (0.6, 0.2, 0.2) and back.user_map == split.user_map
    obj = json.loads(path.read_text())
    moved = next(iter(obj["parts"]["test"]))
    obj["parts"]["train"][moved] = obj["parts"]["test"].pop(moved)
    path.write_text(json.dumps(obj))
    with pytest.raises(SplitMismatchError, match="recorded hash"):
        data.load_split(path)
    del obj["hash"]
    path.write_text(json.dumps(obj))
    assert moved in data.load_split(path).files("train")  # an intended hand edit, hash removed
    obj["parts"]["val"][moved] = obj["parts"]["train"][moved]
    path.write_text(json.dumps(obj))
    with pytest.raises(SplitMismatchError, match="appears twice"):
        data.load_split(path)
    path.write_text("{not json")
    with pytest.raises(SplitMismatchError, match="not valid JSON"):
        data.load_split(path)
    with pytest.raises(SplitMismatchError, match="no split file"):
        data.load_split(tmp_path / "missing.json")


def test_subsample_split(tmp_path):
    split = data.make_split(_fake_report({"ID_1": 100, "ID_2": 4}), seed=0)
    five, ten = data.subsample_split(split, 5, seed=1), data.subsample_split(split, 10, seed=1)
    c = five.counts()
    assert c[0]["train"] == 5 and c[1]["train"] == split.counts()[1]["train"]
    assert set(five.files("train")) <= set(ten.files("train"))
    assert five.parts["val"] == split.parts["val"] and five.parts["test"] == split.parts["test"]
    back = data.load_split(data.save_split(five, tmp_path / "s.json"))
    assert back.subsample == {"per_user": 5, "seed": 1, "source_hash": split.hash,
                              "source_train_files": len(split.files("train"))}
    assert back.hash == five.hash != split.hash


def test_check_split_and_ensure_split(corpus, tmp_path):
    data_dir = tmp_path / "d"
    shutil.copytree(corpus, data_dir)
    split_path = tmp_path / "work" / "split.json"
    split = data.ensure_split(data_dir, split_path)
    assert (tmp_path / "work" / "validation.json").is_file()
    assert data.ensure_split(data_dir, split_path).hash == split.hash
    with pytest.raises(SplitMismatchError, match="seed 0, not 5"):
        data.ensure_split(data_dir, split_path, seed=5)
    gone = split.files("train")[0]
    (data_dir / gone).unlink()
    with pytest.raises(SplitMismatchError, match=rf"1 of 20 files .*{gone}.*re-run"):
        data.ensure_split(data_dir, split_path)


# ---------------------------------------------------------------- images

def test_load_image_range_and_shape(corpus):
    for rel in ["ID_1/ID_1_0001.jpg", "ID_2/gray.png", "ID_2/rgba.png", "ID_2/deep16.png", "ID_2/wide.jpg"]:
        x = data.load_image(corpus / rel)
        assert x.shape == (3, 256, 256) and x.dtype.is_floating_point
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    x = data.load_image(corpus / "ID_2/deep16.png")
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # full 16-bit range -> full 8-bit range
    exact = data.load_image(corpus / "ID_2" / "gray.png")
    assert np.allclose((exact[0].numpy() + 1) * 127.5, _rgb(7)[..., 0], atol=1e-3)
    with pytest.raises(DataError, match="truncated"):
        data.load_image(corpus / "ID_1" / "truncated.jpg")


def test_image_dataset_and_opt_in_flips(corpus, report):
    split = data.make_split(report, seed=0)
    ds = data.ImageDataset(corpus, split, "train")
    x, label, idx = ds[0]
    assert len(ds) == len(split.files("train")) and idx == 0 and label == split.labels("train")[0]
    flipped = data.ImageDataset(corpus, split, "train", flip_time=True, flip_doppler=True)
    n = len(ds)
    assert len(flipped) == 4 * n
    assert flipped.variant(n) == (split.files("train")[0], True, False)
    assert flipped.variant(3 * n) == (split.files("train")[0], True, True)
    assert np.array_equal(flipped[n][0].numpy(), x.flip(-1).numpy())
    assert np.array_equal(flipped[2 * n][0].numpy(), x.flip(-2).numpy())


# ---------------------------------------------------------------- CLI

def test_cli_split(corpus, tmp_path, capsys):
    out = tmp_path / "work" / "split.json"
    args = ["split", "--data_dir", str(corpus), "--out", str(out), "--seed", "1", "--fractions", "0.6", "0.2", "0.2"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "20 usable" in text and "ID_10" in text and "split hash" in text
    assert data.load_split(out).seed == 1
    assert json.loads((tmp_path / "work" / "validation.json").read_text())["user_map"]["user_ids"] == [1, 2, 10]
    assert cli_main(args) == 0 and "0 existing files changed part" in capsys.readouterr().out
    assert cli_main(["split", "--data_dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["split", "--help"])
    assert e.value.code == 0


def test_user_map_knows_folders_and_generated_file_names():
    from mdgen_helpers import users

    um = UserMap.from_folders(["ID_10", "walker", "ID_2"])
    assert um.folders == ("ID_2", "ID_10", "walker") and um.user_ids == (2, 10, 11)
    assert um.label_of_folder("ID_10") == 1 and um.folder_of_user(11) == "walker"
    with pytest.raises(ValueError, match="ID_3"):
        um.label_of_folder("ID_3")
    name = users.image_name(10, 3)
    assert name == "micro_doppler_user10_003.png" and users.parse_image_name(name) == (10, 3)
    assert users.parse_image_name("gen_0001.jpg") is None and um.label_of_image_name("notes.txt") is None
    assert um.label_of_image_name(name) == 1
    with pytest.raises(ValueError, match="user id 7"):
        um.label_of_image_name(users.image_name(7, 1))
