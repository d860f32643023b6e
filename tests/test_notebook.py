"""The Colab quickstart executes top to bottom on CPU, headless, so it cannot rot."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "colab", "quickstart.ipynb")


@pytest.mark.drill  # over two minutes in a Jupyter kernel: `make test-drills` (CI runs it)
def test_quickstart_notebook_executes(tfds_dir, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)  # the kernel inherits this environment
  # One CPU device, as on a Colab CPU runtime: the suite's 8 simulated devices make the
  # notebook's un-blocked collective loops hang in XLA's CPU rendezvous while the other test
  # worker loads the cores (it aborted the kernel after 40 s).
  monkeypatch.setenv("XLA_FLAGS", "")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
  assert "def " not in code  # it calls the library; it defines no training code of its own
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "restored step 40 on mesh" in text
  assert "['embed']['embedding']" in text  # the sharding table lists every weight
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, "the loss plot was not drawn"
