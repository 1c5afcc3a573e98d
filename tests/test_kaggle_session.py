"""The Kaggle session emulator: what a kernel sees, and the notebook series chained as on Kaggle.

Each session runs in a private mount + network namespace (root and `unshare` needed; skipped with
the reason elsewhere): read-only `/kaggle/input` from the kernel metadata, an empty
`/kaggle/working` published afterwards, no checkout, no installed mdgen_helpers, no network.
"""

import json
import time
from pathlib import Path

import nbformat
import pytest

from mdgen_helpers import kaggle, kaggle_session

OK, WHY = kaggle_session.available()
needs_namespaces = pytest.mark.skipif(not OK, reason=WHY)

OWNER = "your-username"
PARAMS = {"MDGEN_PROFILE": "cpu-smoke"}

PROBE = """
import importlib.util, json, os, socket
from pathlib import Path
data = next(Path("/kaggle/input").rglob("ID_1"))
probe = {"importable": importlib.util.find_spec("mdgen_helpers") is not None, "cwd": os.getcwd(),
         "run_type": os.environ.get("KAGGLE_KERNEL_RUN_TYPE"), "working": sorted(os.listdir("/kaggle/working")),
         "data": str(data.relative_to("/kaggle/input")),
         "repo": sorted(os.listdir(os.environ["PROBE_REPO"])) if os.path.isdir(os.environ["PROBE_REPO"]) else None}
for key, folder in (("input_writable", Path("/kaggle/input")), ("data_writable", data)):
    try:
        (folder / "x").write_text("x")
        probe[key] = True
    except OSError:
        probe[key] = False
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3).close()
    probe["network"] = True
except OSError:
    probe["network"] = False
Path("/kaggle/working/probe.json").write_text(json.dumps(probe))
"""


def _probe_notebook(path: Path, with_bootstrap: bool) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    if with_bootstrap:  # the notebooks' own first cell: the attached bundle is how the helpers arrive
        first = nbformat.read(kaggle.NOTEBOOKS_DIR / "01_extract_latents.ipynb", as_version=4).cells[1].source
        nb.cells.append(nbformat.v4.new_code_cell(first))
        nb.cells.append(nbformat.v4.new_code_cell(
            "import mdgen_helpers\nPath('/kaggle/working/helpers_from.txt').write_text(mdgen_helpers.__file__)"))
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def bundle_and_data(tmp_path_factory):
    """The helper bundle (as `kaggle bundle` builds it) and a small simulated data set: a user's uploads."""
    from mdgen_helpers import simulate
    from mdgen_helpers.profiles import get_profile

    root = tmp_path_factory.mktemp("uploads")
    bundle = kaggle.build_bundle(root / "mdgen-helpers", owner=OWNER)
    p = get_profile("cpu-smoke")
    data = root / "micro-doppler-data"
    simulate.simulate_dataset(data, p.sim_users, p.sim_per_user, seed=p.sim_seed, progress=False, workers=1)
    return bundle, data


def test_without_root_the_emulator_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(kaggle_session.os, "geteuid", lambda: 1000)
    ok, why = kaggle_session.available()
    assert not ok and "needs root" in why
    with pytest.raises(kaggle_session.EmulatorUnavailable, match="needs root"):
        kaggle_session.emulate("01", tmp_path)


@needs_namespaces
@pytest.mark.parametrize("layout", kaggle_session.LAYOUTS)
def test_session_sees_only_what_kaggle_gives(tmp_path, bundle_and_data, layout):
    bundle, data = bundle_and_data
    meta = {"id": f"{OWNER}/probe", "dataset_sources": [f"{OWNER}/mdgen-helpers", f"{OWNER}/micro-doppler-data"],
            "kernel_sources": []}
    params = {"PROBE_REPO": str(kaggle.REPO_ROOT)}
    # 1. without the bundle: nothing of the project is importable or visible
    res = kaggle_session.emulate(_probe_notebook(tmp_path / "probe.ipynb", False), tmp_path / "out",
                                 {"micro-doppler-data": data}, params, layout=layout, metadata=meta, echo=False)
    assert res.ok, res.log
    assert res.not_attached == [f"{OWNER}/mdgen-helpers"]
    probe = json.loads((res.published / "probe.json").read_text())
    assert probe["importable"] is False          # the editable install does not leak in
    assert probe["repo"] == []                    # the checkout is hidden
    assert probe["cwd"] == "/kaggle/working" and probe["working"] == []
    assert probe["run_type"] == "Batch"
    assert probe["input_writable"] is False and probe["data_writable"] is False
    assert probe["network"] is False
    want = "micro-doppler-data" if layout == "flat" else f"datasets/{OWNER}/micro-doppler-data"
    assert probe["data"] == f"{want}/ID_1"
    assert not (data / "ID_1" / "x").exists()
    # 2. with the bundle attached, the notebooks' first cell imports the helpers from it
    res = kaggle_session.emulate(_probe_notebook(tmp_path / "probe2.ipynb", True), tmp_path / "out",
                                 {"mdgen-helpers": bundle, "micro-doppler-data": data}, params, layout=layout,
                                 metadata=meta, echo=False)
    assert res.ok, res.log
    assert (res.published / "helpers_from.txt").read_text().startswith("/kaggle/input/")


def _errors(executed: Path) -> str:
    nb = nbformat.read(executed, as_version=4)
    return "\n".join(o.get("evalue", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error")


@needs_namespaces
@pytest.mark.slow
def test_notebook_chain_as_on_kaggle(tmp_path, bundle_and_data):
    """01 -> 02 (stopped by its time budget) -> 02 resumed from its own output -> 03 -> 04, each in a
    fresh session chained through kernel_sources; and 01 with no data set attached stops, naming
    what it searched (never simulated users)."""
    bundle, data = bundle_and_data
    out = tmp_path / "outputs"
    helpers = {"mdgen-helpers": bundle}
    timings = {}

    def run(nb, attach, params=PARAMS, layout="flat", name=None):
        start = time.perf_counter()
        res = kaggle_session.emulate(nb, out, attach, params, layout=layout, echo=False)
        timings[name or nb] = round(time.perf_counter() - start, 1)
        return res

    # the command line, as a user runs it: exit code 1, the notebook's error in the output
    from mdgen_helpers.cli import main

    start = time.perf_counter()
    rc = main(["kaggle", "emulate", "--notebook", "01", "--outputs", str(out), "--attach", f"mdgen-helpers={bundle}",
               "--set", "MDGEN_PROFILE=cpu-smoke"])
    timings["01 no data"] = round(time.perf_counter() - start, 1)
    assert rc == 1 and not (out / "mdgen-01-extract-latents").exists()
    err = _errors(out / "mdgen-01-extract-latents.ipynb")
    assert "no data set" in err and "/kaggle/input holding mdgen-helpers" in err and "SIMULATE" in err

    res = run("01", {**helpers, "micro-doppler-data": data}, layout="nested")
    assert res.ok, res.log
    assert (res.published / "mdgen" / "split.json").is_file() and not (res.published / "mdgen" / "data").exists()

    res = run("02", helpers, {**PARAMS, "MDGEN_TRAIN__TIME_BUDGET": "0.004"}, name="02 budget")
    assert res.ok, res.log
    first = json.loads((res.published / "mdgen" / "run" / "result.json").read_text())
    assert first["stopped"] == "time_budget" and 0 < first["step"] < 30

    # resuming from an attached run is an explicit choice (RESUME_FROM), never automatic
    res = run("02", {**helpers, "mdgen-02-train-dit": out / "mdgen-02-train-dit"},
              {**PARAMS, "MDGEN_RESUME_FROM": "/kaggle/input/mdgen-02-train-dit/mdgen/run"}, name="02 resume")
    assert res.ok, res.log
    second = json.loads((res.published / "mdgen" / "run" / "result.json").read_text())
    assert second["stopped"] == "max_steps" and second["step"] == 30
    assert second["resumed_from"].endswith(f"step_{first['step']:07d}")

    res = run("03", {**helpers, "micro-doppler-data": data}, {**PARAMS, "MDGEN_SAMPLING__GUIDANCE_SCALE": "2.5"})
    assert res.ok, res.log
    manifest = json.loads((res.published / "mdgen" / "generated" / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 * 2 and manifest["settings"]["guidance_scale"] == 2.5
    # the explorer, headless: a few users, the run's own settings, and no error in its status line
    state = nbformat.read(res.executed, as_version=4).metadata["widgets"][
        "application/vnd.jupyter.widget-state+json"]["state"].values()
    by_kind = {}
    for model in state:
        by_kind.setdefault(model["model_name"], []).append(model["state"])
    assert [len(m["index"]) for m in by_kind["SelectMultipleModel"]] == [4]  # users[:4] (cpu-smoke has 4)
    assert [m["value"] for m in by_kind["FloatSliderModel"]] == [manifest["settings"]["guidance_scale"]]
    solver = [m for m in by_kind["DropdownModel"] if m.get("description") == "solver"][0]
    assert solver["_options_labels"][solver["index"]] == manifest["settings"]["solver"]
    assert not any(str(m.get("value", "")).startswith("error") for m in by_kind["HTMLModel"])

    res = run("04", {**helpers, "micro-doppler-data": data}, layout="nested")
    assert res.ok, res.log
    metrics = json.loads((res.published / "mdgen" / "evaluation" / "metrics.json").read_text())
    assert metrics
    print(f"\nemulated Kaggle chain, seconds per session: {timings}")
