"""Every notebook in notebooks/ runs top to bottom.

Each runs in a process of its own (nbclient starts the kernel, as it did in the pytest process), in the
background while the in-process tests run (tests/background.py)."""

from __future__ import annotations

import os
import pathlib
import sys
import textwrap

import pytest

import background

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

RUN = textwrap.dedent("""
    import sys
    import nbclient, nbformat
    path = sys.argv[1]
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(__import__("pathlib").Path(path).parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
""")


def _register(path: pathlib.Path) -> None:
    @background.job(__file__, path.name, wants=lambda item: item.callspec.params.get("path") == path)
    def _job():
        return [sys.executable, "-c", RUN, str(path)], dict(os.environ), None


for _path in NOTEBOOKS:
    _register(_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, gemma3_path, smollm2_path):
    pytest.importorskip("nbclient", reason="the notebooks extra is not installed")
    proc = background.result(__file__, path.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
