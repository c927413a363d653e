"""notebooks/walkthrough.ipynb runs top to bottom headless (nbconvert) at its small size, and its
outputs hold the numbers and figures each step promises.

It runs on a tiny random model saved as an HF checkpoint directory (G2IS_NOTEBOOK_MODEL): on 2
CPU cores SmolLM2 at the small size took 8.5 minutes, most of it compiling, which the suite
cannot afford; the mechanics, every public call and every plot, are the same."""

import json
from pathlib import Path

import pytest

from g2is_jax.testing import tiny_hf_model_dir

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"

pytestmark = pytest.mark.slow


def test_walkthrough_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbconvert = pytest.importorskip("nbconvert.preprocessors")
    model_dir = tiny_hf_model_dir(tmp_path / "model")
    monkeypatch.setenv("G2IS_NOTEBOOK_MODEL", str(model_dir))
    monkeypatch.setenv("G2IS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("G2IS_NOTEBOOK_DIR", str(tmp_path / "work"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ep = nbconvert.ExecutePreprocessor(timeout=900, kernel_name="python3")
    ep.preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert "T (48, 512) V (8, 512)" in text
    for name in ("g2is", "less", "random"):
        assert f"{name:6s} 4 rows:" in text
    assert text.count("exact match") == 4  # base + three fine-tunes
    assert len(images) == 3  # walk, budgets, loss
    for p in ("plots/walk.png", "plots/budgets.png", "plots/loss.png"):
        assert (tmp_path / "work" / p).is_file()
    assert json.loads((tmp_path / "work" / "features" / "pool" / "meta.json").read_text())[
        "gradient"] == "adam"
