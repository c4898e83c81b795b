"""examples/quickstart.ipynb runs top to bottom offline (nbclient) against a tiny saved MedBLIP folder."""

from pathlib import Path

import nbformat
from conftest import REPO_ROOT
from nbclient import NotebookClient
from test_pipeline import build_tiny_folder


NOTEBOOK = REPO_ROOT / "examples" / "quickstart.ipynb"


def test_notebook_is_stored_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    source = "\n".join(cell.source for cell in code)
    for needle in ("MEDBLIP_MODEL_DIR", "MEDBLIP_VOLUME", "zero-shot-volume-classification",
                   "volume-question-answering", "plot_attention"):
        assert needle in source


def test_notebook_executes_offline(tmp_path, monkeypatch, minilm_path, anatomical_nii):
    folder = build_tiny_folder(tmp_path / "model", minilm_path)
    monkeypatch.setenv("MEDBLIP_MODEL_DIR", str(folder))
    monkeypatch.setenv("MEDBLIP_VOLUME", anatomical_nii)
    monkeypatch.setenv("MEDBLIP_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    results = [output["data"].get("text/plain", "") for output in outputs if "data" in output]
    assert any("'label': 'MCI'" in text and "'score'" in text for text in results)
    assert any("'answer'" in text for text in results)
    assert any("image/png" in output["data"] for output in outputs if "data" in output)
    assert (tmp_path / "out" / "slice_view.png").stat().st_size > 10_000
    assert not any(Path(NOTEBOOK.parent).glob("*.png"))  # nothing written beside the notebook
