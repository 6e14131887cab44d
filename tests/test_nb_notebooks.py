"""The demo notebooks, executed headless with nbclient against a real server; assertions on the
saved outputs and on the saved widget state (what a reader of the executed notebook sees)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from runflare_nb import Client

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def execute(name: str, url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> nbformat.NotebookNode:
    monkeypatch.setenv("RUNFLARE_URL", url)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / name)  # kept for a look when a test fails
    return nb


def widget_states(nb: nbformat.NotebookNode) -> list[dict]:
    return [model["state"] for model in nb.metadata.widgets[WIDGET_STATE]["state"].values()]


def badges(nb: nbformat.NotebookNode) -> list[str]:
    """The header HTML of every Run-Flare widget in the saved state."""
    return [s["value"] for s in widget_states(nb) if "runflare-badge" in str(s.get("value", ""))]


def saved_outputs(nb: nbformat.NotebookNode) -> list[dict]:
    """Outputs held by Output widgets in the saved state."""
    return [o for s in widget_states(nb) if s.get("_model_name") == "OutputModel" for o in s.get("outputs", [])]


def cell_text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def languages(live_server) -> set[int]:
    return {lang["id"] for lang in Client(live_server.url).languages()}


@pytest.mark.slow
def test_getting_started(live_server, monkeypatch, tmp_path) -> None:
    nb = execute("getting-started.ipynb", live_server.url, monkeypatch, tmp_path)
    headers = badges(nb)
    assert headers and all("Accepted" in h for h in headers), headers
    texts = [o.get("text", "") for o in saved_outputs(nb) if o.get("output_type") == "stream"]
    assert "".join(texts) == "".join(f"Hello, Run-Flare! ({i})\n" for i in range(3))
    widget_cell = nb.cells[3]
    views = [o for o in widget_cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views, "the %%runflare cell displays a widget"
    assert "Accepted" in cell_text(nb.cells[4]) and "Hello, Run-Flare! (2)" in cell_text(nb.cells[4])
    assert "5050" in cell_text(nb.cells[6]) and "Accepted" in cell_text(nb.cells[6])
    client_out = cell_text(nb.cells[8])
    assert "Accepted 0 'out\\n' 'err\\n'" in client_out, client_out
    assert " status_update " in client_out and " progress_update " in client_out


@pytest.mark.slow
def test_teaching(live_server, languages, monkeypatch, tmp_path) -> None:
    missing = {50, 63, 71} - languages
    if missing:
        pytest.skip(f"the server lacks program-run languages {sorted(missing)} (C, JavaScript, Python)")
    nb = execute("teaching.ipynb", live_server.url, monkeypatch, tmp_path)
    summary = cell_text(nb.cells[6])
    assert "9/9 accepted" in summary, summary
    for language in ("python", "c", "javascript"):
        assert summary.count(f"{language} #") == 3
    headers = badges(nb)
    assert sum("Accepted" in h for h in headers) == 9
    assert sum("Wrong Answer" in h for h in headers) == 1
    assert "Wrong Answer" in cell_text(nb.cells[9])


@pytest.mark.slow
def test_plot(live_server, languages, monkeypatch, tmp_path) -> None:
    if 1071 not in languages:
        pytest.skip("the server has no IPython kernel runs (1071)")
    pytest.importorskip("matplotlib", reason="plot.ipynb draws with matplotlib (a test dependency)")
    nb = execute("plot.ipynb", live_server.url, monkeypatch, tmp_path)
    assert "Accepted" in cell_text(nb.cells[3]), cell_text(nb.cells[3])
    assert "'image/png'" in cell_text(nb.cells[3])
    images = [o for o in saved_outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0]["data"]["image/png"]) > 1000
    streamed = "".join(o.get("text", "") for o in saved_outputs(nb) if o.get("output_type") == "stream")
    assert streamed == "plotted 200 points\n"
    assert any("Accepted" in h for h in badges(nb))
    json.dumps(nb.metadata.widgets)  # the saved state is plain JSON
