"""The notebooks in colabs/ execute headless from top to bottom."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"


def _execute(name: str, timeout: int = 180):
  notebook = nbformat.read(COLABS / name, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=timeout, kernel_name="python3",
      resources={"metadata": {"path": str(COLABS)}})
  client.execute()
  return notebook


def test_quickstart_runs_and_shows_the_figure_3_story():
  notebook = _execute("quickstart.ipynb")
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), "the plots were not drawn"
  assert any("final lambda" in o.get("text", "") for o in outputs)


def test_theory_notebook_runs_and_draws_the_figures():
  notebook = _execute("theory.ipynb")
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data"
            and "image/png" in o.get("data", {})]
  assert len(images) >= 3, "figures 2 (two plots) and 7 were not all drawn"
  text = "".join(o.get("text", "") for o in outputs)
  assert "critical temperatures" in text
  assert "equiprobable" in text


def test_information_plane_notebook_draws_the_stored_results():
  notebook = _execute("information_plane.ipynb")
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data"
            and "image/png" in o.get("data", {})]
  assert len(images) == 2, "the information plane and Figure 3 were not both drawn"
  assert "geco_re_" in "".join(o.get("text", "") for o in outputs)
