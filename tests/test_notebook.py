"""play.ipynb: stored without outputs, and runs top to bottom on CPU without internet.

The notebook runs in a copy of the repository's files in tmp_path, so the demo training run it makes (under
log/notebook-demo/) never lands in the repository. Needs nbclient and ipykernel (the "python3" kernel).
"""
import os
import shutil

import pytest
import torch

import nbformat
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "play.ipynb"
NEEDED = ["play.ipynb", "train_gpt2.py", "gpt2_tokenizer.py", "input.txt"]
OPTIONAL = ["hellaswag.py"]
CELL_TIMEOUT_S = 300  # a hang guard per cell, not a speed test (speed belongs in benchmarks)


def offline(monkeypatch, tmp_path):
    """The kernel inherits this environment: no Hugging Face downloads, an empty HF cache (so a GPT-2 cached on
    this machine cannot change which path runs), and matplotlib's inline backend (ipykernel's default)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_CACHE", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # (the results cell alone, in tmp_path, imports gpt2_tokenizer)


def execute(nb, cwd, timeout=CELL_TIMEOUT_S):
    """Run every cell in a fresh python3 kernel started in cwd; a cell that raises fails the test with its traceback."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb):
    """(all stream text, stderr text, number of PNG images) of an executed notebook."""
    text, err, images = [], [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
                if out.name == "stderr":
                    err.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                images += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    return "\n".join(text), "\n".join(err), images


def results_cell(nb):
    cells = [c for c in nb.cells if "results" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell is tagged 'results'"
    return cells[0]


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    for c in code:
        assert c.outputs == [], f"stored outputs in cell: {c.source[:60]!r}"
        assert c.execution_count is None, f"stored execution count in cell: {c.source[:60]!r}"
        assert "execution" not in c.metadata
    # each code cell has a markdown lead
    for prev, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code":
            assert prev.cell_type == "markdown", f"no markdown before: {cell.source[:60]!r}"
    assert nb.metadata.kernelspec.name == "python3"
    results_cell(nb)


def test_notebook_runs_offline_top_to_bottom(tmp_path, monkeypatch):
    for name in NEEDED + OPTIONAL:
        if (REPO / name).exists() or name in NEEDED:
            shutil.copy(REPO / name, tmp_path / name)
    offline(monkeypatch, tmp_path)
    nb = nbformat.read(tmp_path / "play.ipynb", as_version=4)
    execute(nb, tmp_path)
    text, err, images = outputs(nb)

    # offline: one line about the stand-in, and the cells go on with it
    assert text.count("GPT-2 weights unavailable") == 1
    assert "using a small randomly initialised GPT-2-shaped stand-in" in text
    assert "[15496, 11, 314, 1101, 257, 3303, 2746, 11]" in text
    assert text.count("> Hello, I'm a language model,") == 15  # the pipeline's, by hand, and our GPT's
    assert "the tokenizer encodes the prompt as tiktoken does: True" in text
    assert "the same samples as by hand: True" in text  # what the notebook states: our GPT samples as by hand
    assert "DataLoaderLite's first batch is the same: True" in text
    assert "same values: True | same data pointer: True" in text
    assert "accumulated with loss / 4 == big batch: True" in text
    assert "max |ours - transformers|" in text
    assert "Traceback" not in err
    # no log/log.txt: the results cell says how to make one, makes a demo run beside it and plots that
    assert "python train_gpt2.py" in text
    assert not (tmp_path / "log" / "log.txt").exists()
    demo = tmp_path / "log" / "notebook-demo"
    assert (demo / "log.txt").read_text().splitlines()[0].startswith("0 ")
    assert (demo / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best val loss:" in text
    assert images >= 4  # position embeddings, attention weights, residual stream, results


@pytest.mark.parametrize("run", ["fineweb", "shakespeare"])
def test_results_cell_plots_an_existing_log(tmp_path, monkeypatch, run):
    """A resumed run: the last value of a repeated step wins, the baselines follow the model's size (from the newest
    checkpoint), the text says whether the GPT-2 val loss compares, the figure lands beside the log, and the log
    itself is left alone. The results cell runs on its own."""
    log = tmp_path / "log"
    log.mkdir()
    lines = ["0 val 10.9500", "0 train 10.990000", "1 train 9.000000", "2 train 8.000000", "2 val 5.0000",
             # resumed from step 2: the same evaluations again, with other values
             "2 val 4.5000", "2 train 7.500000", "3 train 3.000000", "4 val 3.1000", "4 val 3.2000",
             "garbage line", "5 train"]  # a line cut short by a crash
    if run == "fineweb":
        lines += ["0 hella 0.2500", "2 hella 0.2800", "2 hella 0.2700", "4 hella 0.3100"]
    (log / "log.txt").write_text("\n".join(lines) + "\n")
    before = (log / "log.txt").read_bytes()
    shape = {"fineweb": dict(n_layer=24, n_head=16, n_embd=1024), "shakespeare": dict(n_layer=4, n_head=4, n_embd=128)}
    data = {"fineweb": "/data/edu_fineweb10B", "shakespeare": "/repo/input.txt"}[run]
    torch.save({"config": {**shape[run], "block_size": 64, "vocab_size": 50304}, "args": {"data": data}},
               log / "model_00004.pt")
    offline(monkeypatch, tmp_path)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [results_cell(nb)]
    execute(nb, tmp_path, timeout=120)
    text, err, images = outputs(nb)

    assert "best val loss:   3.2000 at step 4" in text  # 4 val 3.1000 was overwritten by 3.2000
    assert "last train loss: 3.0000 at step 3" in text
    assert "no training log yet" not in text and images == 1
    if run == "fineweb":
        assert "best HellaSwag:  0.3100 at step 4" in text
        assert "GPT-2 350M: 0.375224" in text and "GPT-3 350M: 0.436" in text
        assert "not comparable" not in text  # FineWeb-Edu data: the 3.2924 line is the real baseline
    else:
        assert "not comparable with this run's data" in text and "HellaSwag" not in text.split("best val")[1]
        assert "is no GPT-2 size" in text
    assert (log / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (log / "log.txt").read_bytes() == before
    assert sorted(os.listdir(log)) == ["log.txt", "model_00004.pt", "results.png"]  # no temporary file left
