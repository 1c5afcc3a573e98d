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


def test_notebook_kernels_get_one_thread_per_free_core(monkeypatch):
    """The demo's kernels get one OpenMP thread per core no other process is busy on (at least
    one); a user's own OMP_NUM_THREADS wins."""
    from mdgen_helpers.demo import notebook_env
    from mdgen_helpers.env import cpu_thread_policy

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_thread_policy(load=0.0) == {"OMP_NUM_THREADS": str(cores)}
    assert cpu_thread_policy(load=1.2)["OMP_NUM_THREADS"] == str(max(1, cores - 1))
    assert cpu_thread_policy(load=50.0)["OMP_NUM_THREADS"] == "1"
    assert 1 <= int(notebook_env("cpu-demo", "w")["OMP_NUM_THREADS"]) <= cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert notebook_env("cpu-demo", "w")["OMP_NUM_THREADS"] == "3"


def test_run_demo_says_which_thread_count_it_chose(tmp_path, monkeypatch, capsys):
    """The demo prints its thread choice and why, and returns it (no notebooks run here)."""
    monkeypatch.setattr(demo, "export_report", lambda executed, out, title: out)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    res = demo.run_demo(work_dir=tmp_path, notebooks=())
    out = capsys.readouterr().out
    assert f"OMP_NUM_THREADS={res['threads']} (usable cores" in out
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert demo.run_demo(work_dir=tmp_path, notebooks=())["threads"] == "1"
    assert "(set by you)" in capsys.readouterr().out


def test_a_misspelt_setting_stops_the_demo_before_any_notebook(tmp_path, monkeypatch, capsys):
    """`demo --set sim_style=mmwav` (or an unknown field) is a one-line error, exit code 2, before
    notebook 01 starts: the notebooks would only find out minutes in."""
    from mdgen_helpers import cli

    ran = []
    monkeypatch.setattr(demo, "execute_notebook", lambda *a, **k: ran.append(a) or 0.0)
    for bad, says in (("sim_style=mmwav", "unknown simulator style 'mmwav'"),
                      ("train.max_stepz=3", "max_stepz"), ("train.max_steps=many", "many")):
        assert cli.main(["demo", "--work_dir", str(tmp_path), "--set", bad]) == 2
        err = capsys.readouterr().err
        assert says.lower() in err.lower() and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ran == []
    # spelt right, the same setting passes the check and the notebooks start
    monkeypatch.setattr(demo, "export_report", lambda executed, out, title: out)
    assert cli.main(["demo", "--work_dir", str(tmp_path), "--set", "sim_style=mmwave"]) == 0
    assert len(ran) == len(demo.NOTEBOOKS) and ran[0][2]["MDGEN_SIM_STYLE"] == "mmwave"
