"""The Jupyter Server extension and the kernelspecs in a real JupyterLab, driven by headless Chromium.

One JupyterLab server (base_url /lab-base/) with the extension enabled, no RUNFLARE_URL anywhere, and
Run-Flare's program kernels plus a sandboxed copy of python3 installed by `runflare kernels install` into a
temp prefix on JUPYTER_PATH (never into sys.prefix):

- the launcher shows "C (Run-Flare)" ... and "Python 3 (sandboxed)" as notebook cards (a screenshot of it goes to
  docs/img/jupyterlab-launcher.png when missing, or always with RUNFLARE_UPDATE_SCREENSHOTS=1);
- a notebook's `%%runflare -l c` cell, given no URL and no token, runs through {base_url}/runflare of that very
  server: the widget shows the C program's output and Accepted, and the extension's store holds the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import die_with_parent, free_port, wait_until
from http_client import get, post
from test_jupyter_extension import jupyter_env
from test_nb_lab_browser import CHROMIUM, CHROMIUM_ARGS, open_and_run_all

ROOT = Path(__file__).resolve().parent.parent
DOC_SCREENSHOT = ROOT / "docs" / "img" / "jupyterlab-launcher.png"
BASE_URL = "/lab-base/"  # a non-root base_url: the kernels' RUNFLARE_URL must carry it
TEACHER = "teacher"  # the X-Auth-User allowed to list the extension's submissions
WAIT_MS = 60_000  # a bound for a broken run, never a measurement
C_SOURCE = '#include <stdio.h>\nint main(void) {\n    printf("hello from C, %d\\n", 6 * 7);\n    return 0;\n}\n'

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT/lab-base
    token: str
    notebooks: Path  # the server's root_dir
    prefix: Path  # where the kernelspecs were installed
    env: dict[str, str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def run_ok(*argv: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def installed_specs(prefix: Path) -> dict[str, str]:
    """name -> display_name of the kernelspecs under PREFIX/share/jupyter/kernels."""
    kernels = prefix / "share" / "jupyter" / "kernels"
    return {d.name: json.loads((d / "kernel.json").read_text())["display_name"] for d in sorted(kernels.iterdir())}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("jupyterlab")
    root = tmp_path_factory.mktemp("lab-ext")
    env = jupyter_env(root)  # the extension importable, private config dir, no RUNFLARE_URL/token, no pool
    prefix = root / "prefix"
    env["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p)
    env["JUPYTERLAB_SETTINGS_DIR"] = str(root / "lab-settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(root / "lab-workspaces")
    notification = root / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)  # never fetch news (nor ask to, over the launcher)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env_kernels = Path(sys.prefix) / "share" / "jupyter" / "kernels"
    before = sorted(env_kernels.iterdir()) if env_kernels.is_dir() else []
    # what docs/jupyter.md tells a user to run
    run_ok("-m", "runflare_cli", "kernels", "install", "--prefix", str(prefix), env=env)
    run_ok("-m", "runflare_cli", "kernels", "install", "--sandboxed", "python3", "--prefix", str(prefix), env=env)
    assert (sorted(env_kernels.iterdir()) if env_kernels.is_dir() else []) == before, "sys.prefix was written"

    notebooks = root / "notebooks"  # a clean root_dir: the file browser shows no config or log files
    notebooks.mkdir()
    port, token = free_port(), uuid.uuid4().hex
    log = open(root / "lab.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--ServerApp.base_url={BASE_URL}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={notebooks}", '--ServerApp.jpserver_extensions={"runflare_jupyter": True}',
         f"--RunflareExtension.settings_overrides={{'authz_users': ['{TEACHER}']}}",  # may list submissions
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
    server = Lab(f"http://127.0.0.1:{port}{BASE_URL.rstrip('/')}", token, notebooks, prefix, env)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("JupyterLab exited: " + (root / "lab.log").read_text()[-3000:])
        try:
            return get(f"{server.url}/runflare/api/v1/health", headers=server.auth, timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, timeout=90, interval=0.2, message="the extension's /health in JupyterLab")
        yield server
    finally:
        try:  # shuts every kernel down, then the server
            post(f"{server.url}/api/shutdown", headers=server.auth, timeout=10)
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        log.close()


def test_launcher_shows_runflare_and_sandboxed_kernels(lab: Lab, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    installed = installed_specs(lab.prefix)
    assert installed.get("runflare-c") == "C (Run-Flare)", installed
    assert installed.get("python3-sandboxed") == "Python 3 (sandboxed)", installed
    # the server resolves each of those names to the temp prefix (JUPYTER_PATH comes first), not to sys.prefix
    listing = json.loads(run_ok("-m", "jupyter", "kernelspec", "list", "--json", env=lab.env))["kernelspecs"]
    for name in installed:
        assert Path(listing[name]["resource_dir"]).is_relative_to(lab.prefix), (name, listing[name])
    specs = get(f"{lab.url}/api/kernelspecs", headers=lab.auth).json["kernelspecs"]
    assert {name: specs[name]["spec"]["display_name"] for name in installed} == installed
    sandboxed = specs["python3-sandboxed"]["spec"]["metadata"]["kernel_provisioner"]
    assert sandboxed["provisioner_name"] == "runflare-sandbox"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{lab.url}/lab?reset&token={lab.token}")  # reset: a fresh workspace, the launcher open
            notebook_cards = page.locator('.jp-Launcher .jp-LauncherCard[data-category="Notebook"]')
            for display in installed.values():
                card = notebook_cards.filter(has=page.get_by_text(display, exact=True))
                card.wait_for(timeout=WAIT_MS)  # exactly one card per spec: one name, one resolved spec
            labels = notebook_cards.locator(".jp-LauncherCard-label").all_inner_texts()
            assert set(installed.values()) <= set(labels), labels
            assert labels.count("C (Run-Flare)") == 1 and labels.count("Python 3 (sandboxed)") == 1, labels
            # the sandboxed copy brought python3's logo along; the screenshot waits for every card image
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-Launcher img')].every(i => i.complete && i.naturalWidth)",
                timeout=WAIT_MS)
            page.screenshot(path=str(tmp_path / "jupyterlab-launcher.png"))
            if not DOC_SCREENSHOT.exists() or os.environ.get("RUNFLARE_UPDATE_SCREENSHOTS"):
                DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(DOC_SCREENSHOT))
        finally:
            browser.close()
    assert (tmp_path / "jupyterlab-launcher.png").stat().st_size > 1000


def test_runflare_c_cell_runs_through_the_extension(lab: Lab) -> None:
    import nbformat
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext runflare_nb"),
        nbformat.v4.new_code_cell("%%runflare -l c\n" + C_SOURCE),  # no --server, no --token
        nbformat.v4.new_code_cell("import os\nprint('kernel sees', os.environ['RUNFLARE_URL'])"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, lab.notebooks / "c-cell.ipynb")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            open_and_run_all(page, lab.url, lab.token, "c-cell.ipynb")
            widget = page.locator(".runflare-widget")
            widget.locator(".runflare-badge", has_text="Accepted").wait_for(timeout=WAIT_MS)
            widget.get_by_text("hello from C, 42").wait_for(timeout=WAIT_MS)
            widget.locator(".runflare-footer", has_text="exit code 0").wait_for(timeout=WAIT_MS)
            assert widget.locator(".runflare-error").count() == 0
            page.get_by_text(f"kernel sees {lab.url}/runflare").wait_for(timeout=WAIT_MS)
        finally:
            browser.close()
    # the run is in the store of this server's extension: the cell went through {base_url}/runflare/api/v1
    subs = get(f"{lab.url}/runflare/api/v1/submissions?fields=language_id,source_code,stdout,status",
               headers={**lab.auth, "X-Auth-User": TEACHER}).json["submissions"]
    c_runs = [s for s in subs if s["language_id"] == 50]
    assert len(c_runs) == 1, subs
    assert c_runs[0]["source_code"].strip() == C_SOURCE.strip()
    assert c_runs[0]["stdout"] == "hello from C, 42\n"
    assert c_runs[0]["status"]["description"] == "Accepted"
