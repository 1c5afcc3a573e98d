"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import torch

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
