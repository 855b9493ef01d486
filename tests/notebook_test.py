"""The Colab notebook runs headless, top to bottom, on the tiny configuration."""

import os
import shutil

import nbformat
import pytest

from conftest import REPO

nbclient = pytest.importorskip("nbclient")


def test_colab_notebook_runs(tmp_path, data_dir, tiny_pipeline):
    # Started on a copy of a finished tiny run, the pipeline cell resumes every stage (the
    # resume path a Colab user takes after a disconnect) instead of training again.
    shutil.copytree(tiny_pipeline, tmp_path / "run")
    os.remove(tmp_path / "run" / "REPORT.md")
    notebook = nbformat.read(os.path.join(REPO, "colab", "dmd_jax_demo.ipynb"), as_version=4)
    parameters = notebook.cells[1]
    assert parameters.source.startswith("# Parameters")
    parameters.source = f'SIZE = "tiny"\nWORKDIR = "{tmp_path}/run"\nREPO_URL = ""'
    # The tiny dataset is already prepared there: the notebook's tfds reads it.
    env_before = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = data_dir
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": REPO}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("TFDS_DATA_DIR")
        else:
            os.environ["TFDS_DATA_DIR"] = env_before
    assert os.path.exists(tmp_path / "run" / "REPORT.md")
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "offloaded" in outputs
