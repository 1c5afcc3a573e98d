"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import torch

from mdgen_helpers import checkpoints
from mdgen_helpers.dit import LightningDiT, model_config
from mdgen_helpers.latents import LatentStats
from mdgen_helpers.settings import TrainConfig
from mdgen_helpers.tokenizers import fit_standin, load_tokenizer
from mdgen_helpers.train import TrainData
from mdgen_helpers.users import UserMap

# Reference vectors from the official LightningDiT code: the repo's sibling ../shared/reference
# (CI lays shared/ out beside the clone the same way).
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread per test module, restored afterwards: the tests' models are tiny, and on
    a 2-core machine extra OpenMP threads mostly spin (a 1 s test took 37 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference vectors folder {REFERENCE_DIR} is absent (the repo's sibling ../shared/reference)")
    return REFERENCE_DIR


# --------------------------------------------------------------------------------------------
# A tiny trained-looking run and a real stand-in tokenizer (generate, widgets)
# --------------------------------------------------------------------------------------------

TINY_DIT = dict(input_size=16, patch_size=2, in_channels=32, hidden_size=64, depth=2, num_heads=2)


def synthetic_images(n: int, seed: int) -> list[torch.Tensor]:
    """Smooth random images in [-1, 1] (upsampled low-resolution noise), enough to fit the PCA."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 16, 16, generator=g)
    fine = 0.3 * torch.randn(n, 3, 256, 256, generator=g)
    up = torch.nn.functional.interpolate(low, size=256, mode="bilinear", align_corners=False)
    return list(torch.tanh(up + fine))


def _make_tokenizer(path, seed: int):
    # rgb-pca: a linear decoder, so batched-kernel round-off (~1e-6 in latents) stays within one
    # grey level; the colormap decoder is a table lookup that can turn it into a colour step.
    fit_standin(synthetic_images(6, seed), num_images=6, progress=False, kind="rgb-pca").save(path)
    return load_tokenizer(path, "cpu")


def _write_tiny_run(run_dir, tokenizer_identity: str, seed: int = 0, num_users: int = 5) -> Path:
    """A RUN dir written by the code `train` saves with (`TrainData.identity`,
    `checkpoints.ema_metadata`, `checkpoints.write_ema`), so the train -> generate contract is
    tested, not a copy of it. Weights are perturbed from the zero-initialised adaLN/output layers,
    so labels and guidance change the velocity."""
    torch.manual_seed(seed)
    model = LightningDiT(num_classes=num_users, **TINY_DIT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    gs = torch.Generator().manual_seed(seed + 1)
    stats = LatentStats(0.1 * torch.randn(32, generator=gs), 1.0 + torch.rand(32, generator=gs))
    empty = torch.empty(0)
    data = TrainData(train_z=empty, train_std=empty, train_y=empty, val_z=None, val_y=None, stats=stats,
                     user_map=UserMap.from_folders([f"ID_{k}" for k in range(1, num_users + 1)]),
                     tokenizer=tokenizer_identity, split_hash="test-split")
    meta = checkpoints.ema_metadata(model_config(model), data.identity, 123, TrainConfig(preset="test").to_json(),
                                    "test fixture")
    checkpoints.write_ema(run_dir, model.state_dict(), meta)
    return Path(run_dir)


@pytest.fixture(scope="session")
def write_simulated_split():
    """`write(work, num_users, per_user, seed)`: a simulated data set in WORK/data and its persisted
    split WORK/split.json (split seed 0); returns (data_dir, split)."""

    def write(work: Path, num_users: int, per_user: int, seed: int = 0):
        from mdgen_helpers import data
        from mdgen_helpers.simulate import simulate_dataset

        root = simulate_dataset(work / "data", num_users=num_users, per_user=per_user, seed=seed, workers=1,
                                progress=False)
        split = data.make_split(data.validate_dataset(root), seed=0)
        data.save_split(split, work / "split.json")
        return root, split

    return write


@pytest.fixture(scope="session")
def make_tokenizer():
    """make_tokenizer(path, seed) -> a fitted rgb-pca stand-in, saved at `path` and reloaded."""
    return _make_tokenizer


@pytest.fixture(scope="session")
def write_tiny_run():
    """write_tiny_run(run_dir, tokenizer_identity, seed=0, num_users=5) -> run_dir."""
    return _write_tiny_run
