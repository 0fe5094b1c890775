"""The Colab notebook runs top to bottom on CPU at its smallest setting (executed with nbclient)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "colab_memory_tuning.ipynb"


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_one_tagged_parameters_cell_small_by_default():
  nb = _read()
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and "SMALL = True" in tagged[0].source
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


def _stream_text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_notebook_tunes_exports_and_recalls_in_transformers(tmp_path):
  nb = _read()
  # The kernel inherits this process's environment: CPU jax, Hugging Face offline.
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = _stream_text(nb)
  assert "lamini_jax from" in text and "accelerator: cpu" in text
  assert "4 facts" in text and "recall 100%" in text
  assert "Q: What is the code of the blue door?\nA: 7 KITES\n" in text
  assert "transformers recalled 4/4 trained answers" in text
  out = tmp_path / "exports" / "memory-tuned"
  assert (out / "model.safetensors").is_file() and (out / "lamini_export.json").is_file()
