"""The main job on a fresh machine: execute notebooks 01-04 headless, then one HTML report.

    python -m mdgen_helpers demo                      # cpu-demo profile, simulated users, ~10 min on 2 cores
    python -m mdgen_helpers demo --profile cpu-smoke  # every code path in a few minutes

The notebooks are the product, so the demo runs *them* (with nbclient, in a fresh kernel each,
in order), not a parallel script that could drift from them. Parameters reach the notebooks
through environment variables (`MDGEN_PROFILE`, `MDGEN_WORK_DIR`, `MDGEN_DATA_DIR`,
`MDGEN_VAVAE_PATH`, and `MDGEN_<FIELD>` / `MDGEN_<SECTION>__<FIELD>` overrides, see `profiles.get_profile`).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from mdgen_helpers.env import cpu_thread_policy, load_average, usable_cores
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.settings import ENV_PREFIX, ENV_SEP
from mdgen_helpers.files import atomic_write_text, read_json

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
NOTEBOOKS = ("01_extract_latents.ipynb", "02_train_dit.ipynb", "03_generate.ipynb", "04_evaluate.ipynb")


def notebook_env(profile: str, work_dir: str | Path, data_dir: str | None = None,
                 vavae_path: str | None = None, overrides: dict | None = None) -> dict[str, str]:
    """Environment variables that parameterise a headless notebook run (and the OpenMP thread
    policy its kernels start with: `env.cpu_thread_policy`)."""
    env = {**cpu_thread_policy(), "MDGEN_PROFILE": profile, "MDGEN_WORK_DIR": str(Path(work_dir).resolve())}
    if data_dir:
        env["MDGEN_DATA_DIR"] = str(Path(data_dir).resolve())
    else:
        env["MDGEN_SIMULATE"] = "1"  # the demo's data set is simulated, and says so
    if vavae_path:
        env["MDGEN_VAVAE_PATH"] = str(Path(vavae_path).resolve())
    for key, value in (overrides or {}).items():
        env[ENV_PREFIX + key.upper().replace(".", ENV_SEP)] = str(value)
    return env


def check_settings(env: dict[str, str]) -> None:
    """Build the profile the notebooks will build from `env`, here and first: a misspelt field or
    value, or an unknown simulator style, stops the demo in one line instead of in notebook 01."""
    from mdgen_helpers.profiles import get_profile
    from mdgen_helpers.simulate import get_style

    profile = get_profile(environ={**os.environ, **env})
    if env.get("MDGEN_SIMULATE"):
        get_style(profile.sim_style)


def execute_notebook(src: Path, dst: Path, env: dict[str, str], timeout: int = 3600) -> float:
    """Execute `src` in a fresh kernel with `env` (cwd = notebooks/), save it to `dst`; seconds taken.

    Cell-by-cell progress goes to the terminal; a failing cell stops the run with the cell's
    error, and the partly executed notebook is still saved next to `dst` for inspection.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from tqdm.auto import tqdm

    nb = nbformat.read(src, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    bar = tqdm(total=len(code_cells), desc=src.stem, unit="cell")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent)}},
                            on_cell_executed=lambda **kw: bar.update(1))
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        failed = dst.with_name(dst.stem + ".failed.ipynb")
        atomic_write_text(failed, nbformat.writes(nb))
        raise MdgenError(f"notebook {src.name} failed (partly executed copy: {failed}):\n{str(e)[-3000:]}") from None
    finally:
        bar.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    atomic_write_text(dst, nbformat.writes(nb))
    return time.perf_counter() - start


def export_report(executed: list[Path], out_html: Path, title: str = "mdgen report") -> Path:
    """One self-contained HTML page (figures embedded) from the executed notebooks, in order."""
    import nbformat
    from nbconvert import HTMLExporter

    merged = nbformat.v4.new_notebook()
    merged.metadata = copy.deepcopy(nbformat.read(executed[0], as_version=4).metadata)
    widget_state: dict = {}
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        merged.cells.append(nbformat.v4.new_markdown_cell(f"---\n*Notebook `{path.name}`*"))
        merged.cells.extend(nb.cells)
        # every notebook's widget models (ids are unique UUIDs): the first notebook's alone left the
        # widgets of 02-04 blank in the report
        widget_state.update(nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {}))
    if widget_state:
        merged.metadata["widgets"] = {WIDGET_STATE: {"state": widget_state, "version_major": 2, "version_minor": 0}}
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(merged, resources={"metadata": {"name": title}})
    return atomic_write_text(out_html, body)


def run_demo(profile: str = "cpu-demo", work_dir: str | Path = "mdgen_runs/demo", data_dir: str | None = None,
             vavae_path: str | None = None, overrides: dict | None = None, notebooks=NOTEBOOKS,
             timeout: int = 3600) -> dict:
    work_dir = Path(work_dir).resolve()
    out = work_dir / "executed"
    out.mkdir(parents=True, exist_ok=True)
    env = notebook_env(profile, work_dir, data_dir, vavae_path, overrides)
    check_settings(env)
    why = ("set by you" if "OMP_NUM_THREADS" in os.environ else
           f"usable cores {usable_cores()}, load average {load_average():.1f}: one per core no other process is busy on")
    print(f"[demo] threads: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} ({why})", flush=True)
    timings, executed = {}, []
    total_start = time.perf_counter()
    for name in notebooks:
        src = NOTEBOOKS_DIR / name
        if not src.is_file():
            raise MdgenError(f"notebook {src} is missing: run the demo from a full checkout of the repository")
        print(f"[demo] {name} ...", flush=True)
        timings[name] = execute_notebook(src, out / name, env, timeout=timeout)
        executed.append(out / name)
        print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)
    report = export_report(executed, work_dir / "report.html", title=f"mdgen report ({profile})")
    total = time.perf_counter() - total_start
    return {"report": str(report), "timings_s": timings, "total_s": total, "work_dir": str(work_dir),
            "threads": env["OMP_NUM_THREADS"]}


def headline(work_dir: str | Path) -> str:
    """The evaluation's headline table (markdown), or a note when the evaluation did not run."""
    path = Path(work_dir) / "evaluation" / "metrics.json"
    if not path.is_file():
        return f"(no {path}: the evaluation notebook did not write metrics)"
    from mdgen_helpers import report  # matplotlib and torch: only when there is a table to show

    return report.format_table(report.headline_table(read_json(path)))


def add_cli_arguments(parser) -> None:
    parser.add_argument("--profile", default="cpu-demo", help="cpu-demo (default), cpu-smoke or kaggle-t4x2")
    parser.add_argument("--work_dir", default="mdgen_runs/demo", help="where data, latents, runs and the report go")
    parser.add_argument("--data_dir", help="your ID_1..ID_N folders (default: simulate users)")
    parser.add_argument("--vavae_path", help="VA-VAE checkpoint (default: the profile's tokenizer)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="profile overrides, e.g. --set train.max_steps=200 sim_users=6")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")


def cli_main(args) -> int:
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise MdgenError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = value
    result = run_demo(args.profile, args.work_dir, args.data_dir, args.vavae_path, overrides, timeout=args.timeout)
    print(f"\n[demo] finished in {result['total_s'] / 60:.1f} min "
          f"({', '.join(f'{k[:2]}: {v:.0f} s' for k, v in result['timings_s'].items())})")
    print(f"[demo] report: {result['report']}")
    print(headline(args.work_dir))
    return 0
