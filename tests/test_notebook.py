"""docs/quickstart.ipynb runs top to bottom in a fresh kernel (nbclient): it trains a small twin, reconstructs
through the Python API, plots, and scores (slow: about two minutes on two cores)."""

from __future__ import annotations

import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
    t = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - t
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert "| EEG (4, 8, 440) | images (4, 2, 3, 32, 32)" in text, text
    for stage in ("encoder", "saliency", "semantic"):
        assert f"{stage} " in text and "guards fired" in text
    assert "PixCorr L+I (seed 0):" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure was not drawn"
    assert seconds < 180, f"the notebook took {seconds:.0f} s (budget: 3 minutes)"
