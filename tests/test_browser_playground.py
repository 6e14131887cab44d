"""The playground page in headless Chromium: served at `/` by the live server, and opened from disk
(file://) against a server that allows Origin null. Output must stream in before the final status."""

from __future__ import annotations

import base64
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LiveServer, start_server

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "server" / "runflare_server" / "static" / "index.html"
DOC_SCREENSHOT = ROOT / "docs" / "img" / "playground.png"
CHROMIUM = os.environ.get("RUNFLARE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PROGRAM = "import time\nfor i in range(1, 6):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)\n"
LINES = [f"line {i}" for i in range(1, 6)]

# Records (output text, status badge) at every change of either, so the order is observed in the page.
RECORDER = """() => {
  window.__timeline = [];
  const snap = () => window.__timeline.push({
    output: document.getElementById('output').textContent,
    final: document.getElementById('status').dataset.final,
    status: document.getElementById('status').textContent,
  });
  const obs = new MutationObserver(snap);
  for (const id of ['output', 'status']) {
    obs.observe(document.getElementById(id), {childList: true, subtree: true, characterData: true, attributes: true});
  }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def null_origin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose CORS allows pages opened from disk (Origin: null)."""
    server = start_server(tmp_path_factory.mktemp("cors-server"), env={"RUNFLARE_CORS_ORIGINS": '["null"]'})
    yield server
    server.stop()


def wait_for_languages(page) -> None:
    page.wait_for_function("document.querySelectorAll('#language option[value]:not([value=\"\"])').length > 0",
                           timeout=30_000)


def set_code(page, code: str) -> None:
    """Puts code in the editor: CodeMirror 6 once it has loaded from the server, else the plain textarea."""
    page.wait_for_function("window.playgroundEditor && window.playgroundEditor.settled", timeout=30_000)
    page.evaluate("code => window.playgroundEditor.setValue(code)", code)


def run_program(page, code: str, language_label: str | None = None, language_value: str | None = None) -> None:
    wait_for_languages(page)
    if language_value:
        page.select_option("#language", value=language_value)
    elif language_label:
        page.select_option("#language", label=language_label)
    set_code(page, code)
    page.evaluate(RECORDER)
    page.click("#run")
    page.wait_for_selector("#status[data-final='true']", timeout=60_000)


def python_label(page) -> str:
    labels = page.eval_on_selector_all("#language option", "os => os.map(o => o.textContent)")
    python = sorted((label for label in labels if label.startswith("Python")), key=lambda label: "IPython" in label)
    assert python, labels
    return python[0]  # the program run when there is one, else the IPython kernel run


def assert_streamed_then_accepted(page) -> None:
    timeline = page.evaluate("window.__timeline")
    early = [t for t in timeline if "line 1" in t["output"] and t["final"] == "false"]
    assert early, f"no output was shown before the final status: {timeline[-3:]}"
    # Some output was on screen while later lines were still to come.
    assert any("line 5" not in t["output"] for t in early)
    assert page.text_content("#status") == "Accepted"
    assert page.text_content("#output").splitlines() == LINES
    assert page.text_content("#stat-time").endswith(" s")
    assert page.text_content("#stat-memory").endswith(" KB")
    stages = page.eval_on_selector_all("#stages li", "ls => ls.map(l => l.dataset.stage)")
    assert "running" in stages


def test_playground_served_by_the_server_streams_output(browser, live_server, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(live_server.url + "/")
        assert page.input_value("#server-url") == live_server.url  # its own origin
        wait_for_languages(page)
        run_program(page, PROGRAM, language_label=python_label(page))
        assert_streamed_then_accepted(page)
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        if not DOC_SCREENSHOT.exists() or os.environ.get("RUNFLARE_UPDATE_SCREENSHOTS"):
            DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(DOC_SCREENSHOT))
    finally:
        page.close()


def test_playground_edits_in_codemirror(browser, live_server) -> None:
    """The playground's editor is CodeMirror 6 from /runflare-editor.js: highlighted, typed into from the
    keyboard, Tab indents, Ctrl+Enter runs."""
    page = browser.new_page()
    try:
        page.goto(live_server.url + "/")
        wait_for_languages(page)
        page.select_option("#language", label=python_label(page))
        page.wait_for_selector("#code-editor .cm-content", timeout=30_000)
        assert not page.is_visible("#code")  # the fallback textarea is hidden
        assert page.locator("#code-editor .cm-content span").count() > 0  # the sample is highlighted
        page.focus("#code-editor .cm-content")
        page.keyboard.press("Control+a")
        page.keyboard.press("Delete")
        page.keyboard.type("for w in ['typed', 'here']:\n")
        page.keyboard.type("print(w)")  # indented by the editor after the colon
        assert page.evaluate("window.playgroundEditor.getValue()") == "for w in ['typed', 'here']:\n    print(w)"
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#status[data-final='true']", timeout=60_000)
        assert page.text_content("#status") == "Accepted"
        assert page.text_content("#output").splitlines() == ["typed", "here"]
    finally:
        page.close()


def test_playground_shows_failures(browser, live_server, tmp_path) -> None:
    page = browser.new_page()
    try:
        page.goto(live_server.url + "/")
        wait_for_languages(page)
        run_program(page, "import sys\nprint('oops', file=sys.stderr)\nsys.exit(2)\n",
                    language_label=python_label(page))
        assert page.text_content("#status") == "Runtime Error (NZEC)"
        assert page.get_attribute("#status", "data-kind") == "error"
        assert page.text_content("#output .stderr") == "oops\n"
        assert page.text_content("#stat-exit") == "2"
        page.screenshot(path=str(tmp_path / "failure.png"))
    finally:
        page.close()


def tiny_png() -> str:
    """A valid 2x2 red PNG, base64."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def test_playground_renders_rich_outputs_safely(browser, live_server, tmp_path) -> None:
    page = browser.new_page()
    try:
        page.goto(live_server.url + "/")
        wait_for_languages(page)
        values = page.eval_on_selector_all("#language option", "os => os.map(o => o.value)")
        if "1071" not in values:
            pytest.skip("this server has no IPython kernel runs (language 1071)")
        code = (
            "import base64\nfrom IPython.display import HTML, Image, display\n"
            f"display(Image(data=base64.b64decode('{tiny_png()}')))\n"
            "display(HTML('<b id=\"x\">bold</b><script>parent.document.title = \"pwned\"</script>'))\n"
            "print('done')\n"
        )
        run_program(page, code, language_value="1071")
        assert page.text_content("#status") == "Accepted"
        img = page.wait_for_selector("#displays img")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("document.querySelector('#displays img').naturalWidth") == 2
        frame = page.wait_for_selector("#displays iframe")
        assert frame.get_attribute("sandbox") == ""
        assert "<b id=\"x\">bold</b>" in frame.get_attribute("srcdoc")
        assert page.title() == "Run-Flare playground"  # the HTML's script never ran
        assert page.locator("#x").count() == 0  # not injected into the page itself
        page.screenshot(path=str(tmp_path / "rich.png"), full_page=True)
    finally:
        page.close()


def test_playground_opened_from_disk(browser, null_origin_server, tmp_path) -> None:
    page = browser.new_page()
    try:
        page.goto(PAGE.as_uri())
        assert page.input_value("#server-url") == "http://localhost:8787"
        page.fill("#server-url", null_origin_server.url)
        page.click("#connect")
        page.wait_for_function(f"document.getElementById('conn').textContent.endsWith('at {null_origin_server.url}')",
                               timeout=30_000)
        run_program(page, PROGRAM, language_label=python_label(page))
        assert_streamed_then_accepted(page)
        page.screenshot(path=str(tmp_path / "from-disk.png"), full_page=True)
    finally:
        page.close()


def test_playground_resumes_after_a_dropped_connection(browser, live_server, tmp_path) -> None:
    from test_examples import Proxy  # the same cuttable TCP proxy the client tests use

    proxy = Proxy(live_server.port)
    page = browser.new_page()
    try:
        page.goto(proxy.url + "/")
        wait_for_languages(page)
        page.select_option("#language", label=python_label(page))
        set_code(page, PROGRAM)
        page.click("#run")
        page.wait_for_function("document.getElementById('output').textContent.includes('line 1')", timeout=60_000)
        assert page.get_attribute("#status", "data-final") == "false"
        proxy.cut()  # the socket dies mid-run, without a close frame
        page.wait_for_selector("#status[data-final='true']", timeout=60_000)
        assert page.text_content("#status") == "Accepted"
        stdout = "".join(page.eval_on_selector_all("#output [data-stream='stdout']", "es => es.map(e => e.textContent)"))
        assert stdout.splitlines() == LINES  # nothing lost, nothing shown twice
        notes = page.text_content("#output .note")
        assert "reconnecting" in notes, notes
        assert proxy.ws_requests >= 2
        page.screenshot(path=str(tmp_path / "resumed.png"), full_page=True)
    finally:
        page.close()
        proxy.close()


def test_playground_polls_when_the_socket_cannot_open(browser, live_server) -> None:
    from test_examples import Proxy

    proxy = Proxy(live_server.port, refuse_ws=True)
    page = browser.new_page()
    try:
        page.goto(proxy.url + "/")
        run_program(page, PROGRAM, language_label=python_label(page))
        assert page.text_content("#status") == "Accepted"
        stdout = "".join(page.eval_on_selector_all("#output [data-stream='stdout']", "es => es.map(e => e.textContent)"))
        assert stdout.splitlines() == LINES
        assert "polling" in page.text_content("#output")
        assert proxy.ws_requests == 3
        assert page.text_content("#stat-memory").endswith(" KB")
    finally:
        page.close()
        proxy.close()


def test_playground_interactive_input(browser, live_server, tmp_path) -> None:
    page = browser.new_page()
    try:
        page.goto(live_server.url + "/")
        wait_for_languages(page)
        page.select_option("#language", label=python_label(page))
        set_code(page, "name = input()\nprint('hi', name, flush=True)\nprint(input().upper())\n")
        page.check("#interactive")
        page.click("#run")
        page.wait_for_selector("#stdin-line", state="visible")
        page.fill("#stdin-line", "bob")
        page.press("#stdin-line", "Enter")
        page.wait_for_function("document.getElementById('output').textContent.includes('hi bob')", timeout=60_000)
        assert page.get_attribute("#status", "data-final") == "false"  # still waiting for the second line
        page.fill("#stdin-line", "second")
        page.press("#stdin-line", "Enter")
        page.wait_for_selector("#status[data-final='true']", timeout=60_000)
        assert page.text_content("#status") == "Accepted"
        stdout = "".join(page.eval_on_selector_all("#output [data-stream='stdout']", "es => es.map(e => e.textContent)"))
        assert stdout == "hi bob\nSECOND\n"
        echoed = page.eval_on_selector_all("#output [data-stream='stdin']", "es => es.map(e => e.textContent)")
        assert echoed == ["bob\n", "second\n"]
        assert not page.is_visible("#stdin-line")
        page.screenshot(path=str(tmp_path / "interactive.png"), full_page=True)
    finally:
        page.close()
