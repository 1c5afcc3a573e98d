"""The demo's report: one HTML page from the executed notebooks, every notebook's widgets kept."""

import os

import nbformat

from mdgen_helpers import demo


def _executed(path, model_id: str):
    nb = nbformat.v4.new_notebook()
    view = {"application/vnd.jupyter.widget-view+json": {"model_id": model_id, "version_major": 2, "version_minor": 0}}
    nb.cells.append(nbformat.v4.new_code_cell("w", outputs=[nbformat.v4.new_output("display_data", data=view)]))
    nb.metadata["widgets"] = {demo.WIDGET_STATE: {"state": {model_id: {"model_name": "HTMLModel", "model_module": "@jupyter-widgets/controls",
                                                                        "model_module_version": "2.0.0", "state": {"value": model_id}}},
                                                  "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, path)
    return path


def test_report_keeps_every_notebooks_widget_state(tmp_path):
    paths = [_executed(tmp_path / f"0{i}.ipynb", f"model-of-notebook-0{i}") for i in (1, 3)]
    html = demo.export_report(paths, tmp_path / "report.html").read_text()
    assert html.count("model-of-notebook-01") >= 2 and html.count("model-of-notebook-03") >= 2  # view + state


def test_notebook_kernels_get_one_thread_per_core_and_passive_waits(monkeypatch):
    """The demo's kernels start with the shared-machine thread policy; a user's own choice wins."""
    from mdgen_helpers.demo import notebook_env
    from mdgen_helpers.env import cpu_thread_policy

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = notebook_env("cpu-demo", "w")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert int(env["OMP_NUM_THREADS"]) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert notebook_env("cpu-demo", "w")["OMP_NUM_THREADS"] == "1"
    assert cpu_thread_policy()["OMP_WAIT_POLICY"] == "ACTIVE"
