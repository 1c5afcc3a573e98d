"""The sampling sweep (benchmarks/sweep_quality.py) reads its settings with the settings module's
own parser, so a sweep row means what the same value means to `generate`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mdgen_helpers.errors import MdgenError
from mdgen_helpers.settings import SamplingSettings, apply

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_quality.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_settings_are_typed_like_the_generate_command(sweep):
    got = sweep.parse_setting("solver=heun,num_steps=12,guidance_scale=4,guidance_interval=0.3:1,timestep_shift=0.5")
    assert got == {"solver": "heun", "num_steps": 12, "guidance_scale": 4.0, "guidance_interval": (0.3, 1.0),
                   "timestep_shift": 0.5}
    s = apply(SamplingSettings(), got)
    assert s.to_json()["guidance_interval"] == [0.3, 1.0] and s.num_steps == 12


@pytest.mark.parametrize("bad", ["guidance=4", "num_steps=twelve"])
def test_a_wrong_setting_stops_before_any_work(sweep, bad):
    with pytest.raises((SystemExit, MdgenError), match="unknown sampling setting|cannot read"):
        sweep.parse_setting(bad)
