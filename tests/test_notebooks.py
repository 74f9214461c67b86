"""The notebooks under ``notebooks/`` run top to bottom on the ``quickstart --fast`` tour and show what they promise;
the committed copies carry no outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_catalog.ipynb", "02_pretrain_and_finetune.ipynb", "03_registry.ipynb")


def _texts(nb) -> str:
    """Every printed line and every plain-text result of an executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def kernel_env(tour, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    """The environment a notebook kernel inherits: the tour, headless matplotlib, and a
    ``python3`` kernelspec (installed into a private Jupyter path when this environment has none)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    monkeypatch_module.setenv("BRAINIAC_TOUR", str(tour.workdir))
    monkeypatch_module.setenv("MPLBACKEND", "Agg")
    assert os.environ.get("BRAINIAC_PSEUDONYM_KEY")  # the tour's key, for any job that pseudonymizes
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        prefix = tmp_path_factory.mktemp("jupyter")
        install(prefix=str(prefix))
        monkeypatch_module.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return tour


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run one notebook in a fresh kernel (working directory and outputs under ``tmp_path``); return it executed."""
    import nbclient
    import nbformat

    monkeypatch.setenv("BRAINIAC_NOTEBOOK_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # 600 s per cell: the pretraining cell starts a local Ray and its workers, slow on a loaded 2-core machine.
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell raised
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    return nb


@pytest.mark.timeout(1500)
def test_catalog_notebook_queries_and_plots_the_tour_catalog(kernel_env, tmp_path, monkeypatch):
    nb = _execute("01_catalog.ipynb", tmp_path, monkeypatch)
    text = _texts(nb)
    ingest = kernel_env.result.stages["ingest"]
    assert f"{ingest['inserted']} scans of " in text, text[:2000]
    for dataset, by_sequence in ingest["counts"].items():  # the counts table names every dataset and sequence
        assert dataset in text and all(sequence in text for sequence in by_sequence)
    assert "adult T1w scans" in text and "scans at version 0: 0" in text
    assert "quarantined inputs: 0" in text
    assert _images(nb) >= 3  # overview, age histogram, preprocessed slices
    assert (tmp_path / "out" / "catalog_overview.png").is_file()


@pytest.mark.timeout(1200)
def test_pretrain_and_finetune_notebook_logs_to_its_own_mlflow(kernel_env, tmp_path, monkeypatch):
    tour_db = kernel_env.workdir / "mlflow.db"
    before = tour_db.read_bytes()
    nb = _execute("02_pretrain_and_finetune.ipynb", tmp_path, monkeypatch)
    text = _texts(nb)
    assert "pretrained 5 steps" in text and "registered encoder: models:/brainiac-encoder" in text
    assert "registered model: models:/brainiac-brain_age@notebook" in text and "test mae:" in text
    assert "pretraining loss points: 5" in text
    assert _images(nb) >= 1  # the loss curves
    assert (tmp_path / "out" / "mlflow.db").is_file()
    assert tour_db.read_bytes() == before  # the tour's registry is untouched


@pytest.mark.timeout(900)
def test_registry_notebook_compares_promotes_and_predicts(kernel_env, tmp_path, monkeypatch):
    import mlflow

    tour_db = kernel_env.workdir / "mlflow.db"
    before = tour_db.read_bytes()
    uri = f"sqlite:///{tour_db}"
    aliases = mlflow.MlflowClient(uri, registry_uri=uri).get_registered_model("brainiac-brain_age").aliases
    nb = _execute("03_registry.ipynb", tmp_path, monkeypatch)
    text = _texts(nb)
    assert "brainiac-brain_age: 2 versions" in text and f"champion: version {aliases['champion']}" in text
    assert "(dry run)" in text
    headline = [line for line in text.splitlines() if ": brain age " in line and line.endswith(" years")]
    assert headline, text[-3000:]
    assert list((tmp_path / "out").glob("*.json"))  # the prediction's JSON
    assert tour_db.read_bytes() == before  # the dry run recorded nothing and moved no alias


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_stripped(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert (
        code
        and nb["cells"][0]["cell_type"] == "markdown"
        and "brainiac quickstart" in "".join(nb["cells"][0]["source"])
    )
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:80]
