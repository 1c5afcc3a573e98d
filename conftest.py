"""Root pytest configuration.

The notebooks run under nbval (`--nbval-lax`: every cell must execute without error; outputs are
not compared) in the order 01 -> 04, sharing one work folder, with the `cpu-smoke` profile so all
four take a few minutes on a 2-core CPU. Kernels inherit this process's environment, which is how
the parameters reach them. Set MDGEN_PROFILE / MDGEN_WORK_DIR yourself to run them differently.
"""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("MDGEN_PROFILE", "cpu-smoke")
    os.environ.setdefault("MDGEN_WORK_DIR", tempfile.mkdtemp(prefix="mdgen-nbval-"))
    if not os.environ.get("MDGEN_DATA_DIR"):
        os.environ.setdefault("MDGEN_SIMULATE", "1")  # simulated users only when asked for


def pytest_collection_modifyitems(config, items):
    """nbval waits a hard-coded 5 s for a finished cell's output messages; on a busy 2-core
    machine a cell that printed figures can take longer to flush them, which failed a CI-like run
    once ("Timeout of 5 seconds exceeded waiting for output"). The cell's own time limit is
    --nbval-cell-timeout; this only widens the wait for messages already produced."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
