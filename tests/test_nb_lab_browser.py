"""getting-started.ipynb in a real JupyterLab, driven by headless Chromium: run every cell and see
the Run-Flare widget reach its final status with the program's output."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "getting-started.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def jupyter_lab(live_server, tmp_path_factory):
    """A JupyterLab server in a temp dir whose kernels see RUNFLARE_URL=<live server>."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("jupyterlab")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "RUNFLARE_URL": live_server.url, "JUPYTER_CONFIG_DIR": str(root / ".config"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".ws")}
    log = open(root / "lab.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def answering() -> bool:
            if proc.poll() is not None:
                raise AssertionError("JupyterLab exited: " + (root / "lab.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).close()
                return True
            except OSError:
                return False

        wait_until(answering, timeout=90, interval=0.3, message="JupyterLab answers /api/status")
        yield url, token, root
    finally:
        try:  # shuts every kernel down, then the server
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST"),
                                   timeout=10)
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        log.close()


def open_and_run_all(page, url: str, token: str, name: str) -> None:
    """Open a notebook in JupyterLab, wait for its kernel, run every cell."""
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")  # reset: only this notebook open
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
    page.wait_for_function(
        "(name) => { const w = window.jupyterapp?.shell?.currentWidget; const s = w?.sessionContext;"
        " return w?.context?.path === name && s?.session?.kernel?.status === 'idle'; }",
        arg=name, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")


def test_widget_runs_live_in_jupyterlab(jupyter_lab, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    url, token, root = jupyter_lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            open_and_run_all(page, url, token, NOTEBOOK.name)
            badge = page.locator(".runflare-badge", has_text="Accepted").first
            badge.wait_for(timeout=120_000)
            page.get_by_text("Hello, Run-Flare! (2)").first.wait_for(timeout=30_000)
            page.get_by_text("Accepted 0").first.wait_for(timeout=60_000)  # the last cell (the client) ran
            widget = page.locator(".runflare-widget").first
            widget.scroll_into_view_if_needed()
            assert "exit code" in widget.inner_text()
            assert widget.locator(".runflare-badge").inner_text() == "Accepted"
            page.screenshot(path=str(tmp_path / "jupyterlab-runflare-widget.png"), full_page=True)
            widget.screenshot(path=str(tmp_path / "runflare-widget.png"))
        finally:
            browser.close()
    saved = json.loads((root / NOTEBOOK.name).read_text())
    assert saved["cells"], "the notebook is still there and well formed"
    assert (tmp_path / "runflare-widget.png").stat().st_size > 1000


def test_typing_into_an_interactive_widget(jupyter_lab, tmp_path) -> None:
    """The input box of ``%%runflare --interactive`` feeds the running program from the browser."""
    import nbformat
    from playwright.sync_api import sync_playwright

    url, token, root = jupyter_lab
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext runflare_nb"),
        nbformat.v4.new_code_cell("%%runflare --language python --interactive\n"
                                  "import sys\nprint('hello', input(), flush=True)\nprint('rest', repr(sys.stdin.read()))"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, root / "interactive.ipynb")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            open_and_run_all(page, url, token, "interactive.ipynb")
            box = page.locator(".runflare-stdin input")
            box.wait_for(timeout=60_000)
            page.locator(".runflare-badge", has_text="Processing").wait_for(timeout=60_000)
            box.fill("Ada")
            box.press("Enter")
            page.get_by_text("hello Ada").wait_for(timeout=60_000)
            page.get_by_role("button", name="Send EOF").click()
            page.locator(".runflare-badge", has_text="Accepted").wait_for(timeout=60_000)
            assert "rest ''" in page.locator(".runflare-widget").inner_text()
            page.locator(".runflare-widget").screenshot(path=str(tmp_path / "interactive-widget.png"))
        finally:
            browser.close()
