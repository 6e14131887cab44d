"""/embed.js in headless Chromium: the lesson page examples/embed-demo.html served from another origin (a
second HTTP server on 127.0.0.1), its three cells run at once against a server whose CORS allows that origin;
a cell refused by a server that does not; a dropped socket resumed; interactive input from the keyboard only."""

from __future__ import annotations

import functools
import html
import json
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import LiveServer, start_server

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "embed-demo.html"
STATIC = ROOT / "server" / "runflare_server" / "static"
IMG = ROOT / "docs" / "img"
CHROMIUM = os.environ.get("RUNFLARE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 90_000  # a bound for a broken run, never a measurement

# The demo's second test case, made to fail on purpose: 10 + 20 + 30 is 60, not 61.
GOOD_CASE = '{"name": "one per line", "input": "10\\n20\\n30\\n", "expected": "60\\n"}'
FAILING_CASE = '{"name": "one per line", "input": "10\\n20\\n30\\n", "expected": "61\\n"}'

LINES = "import time\nfor i in range(1, 6):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)\n"

# Records, per cell, (output text, status final?) at every change of either: what the reader saw, in order.
RECORDER = """() => {
  window.__timeline = {};
  for (const root of document.querySelectorAll('.rf-cell')) {
    const log = window.__timeline[root.id] = [];
    const out = root.querySelector('.rf-output'), status = root.querySelector('.rf-status');
    const snap = () => log.push({output: out.textContent, final: status.dataset.final, status: status.textContent});
    const obs = new MutationObserver(snap);
    for (const node of [out, status]) obs.observe(node, {childList: true, subtree: true, characterData: true, attributes: true});
  }
}"""


class PageServer:
    """A plain static HTTP server on 127.0.0.1 (another port: another origin than the Run-Flare server)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.root = root
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def cell_page(server: str, attrs: str, code: str) -> str:
    """A page with one cell on it."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cell</title>'
            f'<script src="{html.escape(server)}/embed.js" defer></script></head><body>'
            f'<h1>One cell</h1><pre id="cell" {attrs}>{html.escape(code)}</pre></body></html>')


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
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageServer]:
    root = tmp_path_factory.mktemp("pages")
    demo = DEMO.read_text()
    assert demo.count(GOOD_CASE) == 1
    (root / "embed-demo.html").write_text(demo)
    (root / "embed-demo-one-failing.html").write_text(demo.replace(GOOD_CASE, FAILING_CASE))
    server = PageServer(root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory, pages: PageServer) -> Iterator[LiveServer]:
    """A Run-Flare server whose CORS allows the page server's origin (and only it)."""
    server = start_server(tmp_path_factory.mktemp("embed-cors"), env={"RUNFLARE_CORS_ORIGINS": json.dumps([pages.url])})
    yield server
    server.stop()


def cell(page, cell_id: str):
    return page.locator(f"#{cell_id}.rf-cell")


def wait_final(page, cell_id: str) -> None:
    page.wait_for_selector(f"#{cell_id}.rf-cell .rf-status[data-final='true']", timeout=WAIT_MS)


def stdout_of(page, cell_id: str) -> str:
    return "".join(page.eval_on_selector_all(f"#{cell_id} .rf-output [data-stream='stdout']",
                                             "es => es.map(e => e.textContent)"))


def save_screenshot(page, name: str, tmp_path: Path, **kwargs: object) -> None:
    page.screenshot(path=str(tmp_path / name), **kwargs)
    target = IMG / name
    if not target.exists() or os.environ.get("RUNFLARE_UPDATE_SCREENSHOTS"):
        IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), **kwargs)


@pytest.mark.parametrize("name", ["embed.js", "runflare-editor.js"])
def test_scripts_are_served_as_built(live_server: LiveServer, name: str) -> None:
    with urllib.request.urlopen(f"{live_server.url}/{name}") as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
        assert r.read() == (STATIC / name).read_bytes()


def test_demo_page_three_cells_at_once(browser, pages: PageServer, cors_server: LiveServer, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{pages.url}/embed-demo-one-failing.html?server={cors_server.url}")
        page.wait_for_function("document.querySelectorAll('.rf-cell[data-editor=codemirror]').length === 3",
                               timeout=WAIT_MS)  # CodeMirror 6 (runflare-editor.js) in every cell
        assert page.evaluate("location.origin") != cors_server.url  # another origin: CORS is what lets it in
        page.evaluate(RECORDER)
        # Three runs at once: two by mouse, the plot by keyboard (Ctrl+Enter in its editor).
        page.click("#loop-example .rf-run")
        page.click("#sum-exercise .rf-run")
        page.focus("#plot-example .cm-content")
        page.keyboard.press("Control+Enter")
        for cell_id in ("loop-example", "sum-exercise", "plot-example"):
            wait_final(page, cell_id)

        # 1. The loop: its own output, streamed in before the final status, then time, memory and exit code.
        timeline = page.evaluate("window.__timeline['loop-example']")
        early = [t for t in timeline if "step 1" in t["output"] and t["final"] == "false"]
        assert early, timeline[-3:]
        assert any("done" not in t["output"] for t in early)  # shown while later lines were still to come
        assert page.text_content("#loop-example .rf-status") == "Accepted"
        assert stdout_of(page, "loop-example").splitlines() == [f"step {i}: {i} squared is {i * i}" for i in range(1, 6)] + ["done"]
        assert page.text_content("#loop-example .rf-stat-time").endswith(" s")
        assert page.text_content("#loop-example .rf-stat-memory").endswith(" KB")
        assert page.text_content("#loop-example .rf-stat-exit") == "0"
        stages = page.eval_on_selector_all("#loop-example .rf-stages li", "ls => ls.map(l => l.dataset.stage)")
        assert "running" in stages

        # 2. The exercise: one row per case, the altered case a Wrong Answer with a diff, "2/3 passed".
        rows = page.locator("#sum-exercise tr.rf-case")
        assert rows.count() == 3
        verdicts = page.eval_on_selector_all("#sum-exercise td.rf-verdict", "ts => ts.map(t => t.textContent)")
        assert verdicts == ["Accepted", "Wrong Answer", "Accepted"]
        diff = page.text_content("#sum-exercise tr[data-case='1'] .rf-diff")
        assert "- 61" in diff and "+ 60" in diff, diff
        assert page.text_content("#sum-exercise .rf-summary") == "2/3 passed"
        assert page.text_content("#sum-exercise .rf-status") == "2/3 passed"
        hidden = page.text_content("#sum-exercise tr[data-case='2']")
        assert "hidden test" in hidden and "-5 5 -7" not in hidden  # a hidden case shows neither input nor output
        for i in range(3):
            assert page.text_content(f"#sum-exercise tr[data-case='{i}'] .rf-time").endswith(" s")
            assert page.text_content(f"#sum-exercise tr[data-case='{i}'] .rf-memory").endswith(" KB")
        tokens = page.eval_on_selector_all("#sum-exercise tr.rf-case", "rs => rs.map(r => r.dataset.token)")
        assert len(set(tokens)) == 3  # one submission per case, each followed on its own

        # 3. The plot: a kernel run whose image/png renders in the cell, its text output beside it.
        assert page.text_content("#plot-example .rf-status") == "Accepted"
        img = page.wait_for_selector("#plot-example .rf-displays img", timeout=WAIT_MS)
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("document.querySelector('#plot-example .rf-displays img').naturalWidth") > 100
        assert stdout_of(page, "plot-example") == "plotted 200 points\n"

        # Each cell followed its own submission: nobody else's output in it.
        assert "plotted" not in stdout_of(page, "loop-example")
        assert "step" not in stdout_of(page, "plot-example")
        own = {page.get_attribute(f"#{c}", "data-token") for c in ("loop-example", "plot-example")}
        assert len(own) == 2 and not own & set(tokens)
        assert page.get_attribute("#loop-example .rf-output", "aria-live") == "polite"
        assert not errors, errors
        save_screenshot(page, "embed-demo.png", tmp_path, full_page=True)
        page.locator("#sum-exercise").screenshot(path=str(tmp_path / "exercise.png"))
        if not (IMG / "embed-exercise.png").exists() or os.environ.get("RUNFLARE_UPDATE_SCREENSHOTS"):
            page.locator("#sum-exercise").screenshot(path=str(IMG / "embed-exercise.png"))
    finally:
        page.close()


def test_demo_page_as_shipped_passes_its_exercise(browser, pages: PageServer, cors_server: LiveServer) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{pages.url}/embed-demo.html?server={cors_server.url}")
        page.wait_for_selector("#sum-exercise.rf-cell", timeout=WAIT_MS)
        page.click("#sum-exercise .rf-run")
        wait_final(page, "sum-exercise")
        assert page.text_content("#sum-exercise .rf-summary") == "3/3 passed"
        assert page.get_attribute("#sum-exercise .rf-summary", "data-all") == "true"
    finally:
        page.close()


def test_cell_refused_when_cors_does_not_allow_the_origin(browser, pages: PageServer, live_server: LiveServer,
                                                         tmp_path: Path) -> None:
    # The session's server allows no origin: the preflight answers without Access-Control-Allow-Origin.
    request = urllib.request.Request(live_server.api + "/submissions", method="OPTIONS",
                                     headers={"Origin": pages.url, "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(request) as r:
        assert r.headers.get("Access-Control-Allow-Origin") is None
    (pages.root / "refused.html").write_text(cell_page(live_server.url, 'data-runflare="python"', "print('never')\n"))
    page = browser.new_page()
    try:
        page.goto(pages.url + "/refused.html")
        page.wait_for_selector("#cell.rf-cell", timeout=WAIT_MS)  # embed.js itself loads: a plain <script>
        page.click("#cell .rf-run")
        wait_final(page, "cell")
        assert page.text_content("#cell .rf-status") == "Refused"
        assert page.get_attribute("#cell .rf-status", "data-kind") == "error"
        assert page.get_attribute("#cell", "data-error") == "network"
        note = page.text_content("#cell .rf-output")
        assert "CORS" in note and pages.url in note, note
        assert page.get_attribute("#cell", "data-token") is None  # nothing was submitted
        assert page.is_enabled("#cell .rf-run")  # the reader may try again
        save_screenshot(page, "embed-refused.png", tmp_path)
    finally:
        page.close()


def test_cell_resumes_after_a_dropped_socket(browser, pages: PageServer, cors_server: LiveServer) -> None:
    from test_examples import Proxy  # the cuttable TCP proxy the client tests use

    proxy = Proxy(cors_server.port)
    (pages.root / "resume.html").write_text(cell_page(proxy.url, 'data-runflare="python"', LINES))
    page = browser.new_page()
    try:
        page.goto(pages.url + "/resume.html")
        page.wait_for_selector("#cell.rf-cell", timeout=WAIT_MS)
        page.click("#cell .rf-run")
        page.wait_for_function("document.querySelector('#cell .rf-output').textContent.includes('line 1')",
                               timeout=WAIT_MS)
        assert page.get_attribute("#cell .rf-status", "data-final") == "false"
        proxy.cut()  # the socket dies mid-run, without a close frame
        wait_final(page, "cell")
        assert page.text_content("#cell .rf-status") == "Accepted"
        assert stdout_of(page, "cell").splitlines() == [f"line {i}" for i in range(1, 6)]  # nothing lost or doubled
        assert "reconnecting" in page.text_content("#cell .rf-output .rf-note")
        assert proxy.ws_requests >= 2
    finally:
        page.close()
        proxy.close()


IN_EDITOR = "!!document.activeElement.closest('.rf-code, .rf-editor')"


@pytest.mark.parametrize("editor", ["codemirror", "textarea"])
def test_interactive_cell_from_the_keyboard_only(browser, pages: PageServer, cors_server: LiveServer,
                                                 editor: str) -> None:
    code = "name = input()\nprint('hi', name, flush=True)\nprint(input().upper())\n"
    attrs = f'data-runflare="python" data-interactive data-cpu-time-limit="2" data-editor="{editor}"'
    (pages.root / f"interactive-{editor}.html").write_text(cell_page(cors_server.url, attrs, code))
    page = browser.new_page()
    try:
        page.goto(f"{pages.url}/interactive-{editor}.html")
        page.wait_for_selector(f"#cell.rf-cell[data-editor='{editor}']", timeout=WAIT_MS)
        # Tab from the top of the page: the Run button, then the editor; Tab in the editor indents.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "rf-run"
        page.keyboard.press("Tab")
        assert page.evaluate(IN_EDITOR)
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Python code"
        page.keyboard.press("Control+End")
        page.keyboard.press("Tab")
        page.keyboard.type("# indented")
        assert page.evaluate("RunFlare.get('#cell').getCode()").endswith("\n    # indented")
        page.keyboard.press("Escape")  # Escape, then Tab: leave the editor
        page.keyboard.press("Tab")
        assert not page.evaluate(IN_EDITOR)
        page.keyboard.press("Shift+Tab")  # back into the editor
        assert page.evaluate(IN_EDITOR)
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.activeElement.getAttribute('aria-label') === 'Program input'", timeout=WAIT_MS)
        page.keyboard.type("bob")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#cell .rf-output').textContent.includes('hi bob')",
                               timeout=WAIT_MS)
        assert page.get_attribute("#cell .rf-status", "data-final") == "false"  # waiting for the second line
        page.keyboard.type("second")
        page.keyboard.press("Enter")
        wait_final(page, "cell")
        assert page.text_content("#cell .rf-status") == "Accepted"
        assert stdout_of(page, "cell") == "hi bob\nSECOND\n"
        echoed = page.eval_on_selector_all("#cell .rf-output [data-stream='stdin']", "es => es.map(e => e.textContent)")
        assert echoed == ["bob\n", "second\n"]
        assert not page.is_visible("#cell .rf-input input")
    finally:
        page.close()


OPTIONS_PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>options</title>
<script src="{server}/embed.js" defer></script></head><body>
<pre id="opts" data-runflare="python" data-stdin="3&#10;4&#10;" data-args="alpha beta" data-readonly
     data-expected="7 alpha beta">
    import sys
    a, b = int(input()), int(input())
    print(a + b, *sys.argv[1:])
</pre>
<pre id="tle" data-runflare="71" data-cpu-time-limit="1" data-wall-time-limit="3">while True: pass</pre>
<pre id="rich" data-runflare="python" data-kernel>
from IPython.display import HTML, display
display(HTML('&lt;b id="x"&gt;bold&lt;/b&gt;&lt;script&gt;parent.document.title = "pwned"&lt;/script&gt;'))
print('ok')
</pre>
<div id="api-slot"></div>
</body></html>"""


def test_cell_options_kernel_html_and_js_api(browser, pages: PageServer, cors_server: LiveServer) -> None:
    (pages.root / "options.html").write_text(OPTIONS_PAGE.replace("{server}", cors_server.url))
    page = browser.new_page()
    try:
        page.goto(pages.url + "/options.html")
        page.wait_for_function("document.querySelectorAll('.rf-cell[data-editor=codemirror]').length === 3",
                               timeout=WAIT_MS)
        # Read-only: typing changes nothing. Common indentation of the <pre> was removed.
        code = page.evaluate("RunFlare.get('#opts').getCode()")
        assert code.startswith("import sys\na, b")
        page.focus("#opts .cm-content")
        page.keyboard.type("zzz")
        assert page.evaluate("RunFlare.get('#opts').getCode()") == code
        # A cell made from script, with a test case, followed through its events.
        page.evaluate("""() => {
          const cell = RunFlare.cell(document.createElement('pre'), {language: 'python', code: 'print(input()[::-1])',
            tests: [{input: 'abc\\n', expected: 'cba\\n'}], label: 'Reverse'});
          cell.root.id = 'api';
          document.getElementById('api-slot').append(cell.root);
          cell.root.addEventListener('runflare:done', (e) => { window.__apiDone = [e.detail.passed, e.detail.total]; });
        }""")
        page.evaluate("RunFlare.runAll()")
        for cell_id in ("opts", "tle", "rich", "api"):
            wait_final(page, cell_id)
        # stdin, arguments and an expected output
        assert page.text_content("#opts .rf-status") == "Accepted"
        assert stdout_of(page, "opts") == "7 alpha beta\n"
        # limits
        assert page.text_content("#tle .rf-status") == "Time Limit Exceeded"
        assert page.get_attribute("#tle .rf-status", "data-kind") == "error"
        # a kernel run's HTML renders in a sandboxed frame, never in the page
        frame = page.wait_for_selector("#rich .rf-displays iframe")
        assert frame.get_attribute("sandbox") == ""
        assert '<b id="x">bold</b>' in frame.get_attribute("srcdoc")
        assert page.locator("#x").count() == 0 and page.title() == "options"
        assert stdout_of(page, "rich") == "ok\n"
        # the JS API's cell
        assert page.text_content("#api .rf-lang") == "Reverse"
        assert page.text_content("#api .rf-summary") == "1/1 passed"
        assert page.evaluate("window.__apiDone") == [1, 1]
    finally:
        page.close()


def test_cell_polls_when_the_socket_cannot_open(browser, pages: PageServer, cors_server: LiveServer) -> None:
    from test_examples import Proxy

    proxy = Proxy(cors_server.port, refuse_ws=True)
    (pages.root / "poll.html").write_text(cell_page(proxy.url, 'data-runflare="python"', LINES))
    page = browser.new_page()
    try:
        page.goto(pages.url + "/poll.html")
        page.wait_for_selector("#cell.rf-cell", timeout=WAIT_MS)
        page.click("#cell .rf-run")
        wait_final(page, "cell")
        assert page.text_content("#cell .rf-status") == "Accepted"
        assert stdout_of(page, "cell").splitlines() == [f"line {i}" for i in range(1, 6)]
        assert "polling" in page.text_content("#cell .rf-output")
        assert proxy.ws_requests == 3
        assert page.text_content("#cell .rf-stat-memory").endswith(" KB")
    finally:
        page.close()
        proxy.close()


def test_cell_with_a_token_on_a_server_with_auth(browser, pages: PageServer, tmp_path_factory) -> None:
    server = start_server(tmp_path_factory.mktemp("embed-auth"), "--auth-token", "s3cret",
                          env={"RUNFLARE_CORS_ORIGINS": json.dumps([pages.url])})
    try:
        body = (f'<script src="{server.url}/embed.js" defer></script>'
                '<pre id="with" data-runflare="python" data-token="s3cret">print("in", flush=True)</pre>'
                '<pre id="without" data-runflare="python">print("never")</pre>')
        (pages.root / "auth.html").write_text(f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                                              f'<title>auth</title></head><body>{body}</body></html>')
        page = browser.new_page()
        try:
            page.goto(pages.url + "/auth.html")
            page.wait_for_function("document.querySelectorAll('.rf-cell').length === 2", timeout=WAIT_MS)
            page.click("#with .rf-run")
            page.click("#without .rf-run")
            wait_final(page, "with")
            wait_final(page, "without")
            assert page.text_content("#with .rf-status") == "Accepted"  # header for REST, query for the socket
            assert stdout_of(page, "with") == "in\n"
            assert "polling" not in page.text_content("#with .rf-output")
            assert page.text_content("#without .rf-status") == "Not submitted"
            assert "HTTP 401" in page.text_content("#without .rf-output")
        finally:
            page.close()
    finally:
        server.stop()
