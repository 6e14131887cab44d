"""Kernel runs end to end: real sandboxed kernels from a warm pool, driven through KernelRuns."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import Iterator

import pytest
from conftest import wait_until

from runflare_server.engine.interface import Limits, RunRequest, RunResult
from runflare_server.engine.jupyter.adapters import PythonKernel
from runflare_server.engine.jupyter.kernel_pool import installed_kernelspecs
from runflare_server.engine.runs.kernel_runs import KernelRuns, install_kernelspecs

pytestmark = pytest.mark.timeout(120)


class Engine:
    """A started KernelRuns on its own event loop (kernels are spawned from this thread)."""

    def __init__(self, **kw) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = KernelRuns(**kw)
        self.loop.run_until_complete(self.engine.start())

    def run(self, code: str, *, language_id: int | None = 1071, **kw) -> tuple[RunResult, list[dict]]:
        events: list[dict] = []
        request = RunRequest(token="t", source_code=code, language_id=language_id, **kw)
        result = self.loop.run_until_complete(self.engine.run(request, events.append))
        return result, events

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with pytest.MonkeyPatch.context() as mp:  # undone however the module ends
        if "bash" not in installed_kernelspecs():  # into a temp prefix, never this interpreter's
            prefix = tmp_path_factory.mktemp("kernelspecs")
            install_kernelspecs(prefix=str(prefix))
            mp.setenv("JUPYTER_PATH", os.pathsep.join(
                filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])))
        e = Engine(pool_sizes={"python3": 2}, runtime_dir=tmp_path_factory.mktemp("rt"))
        try:
            e.loop.run_until_complete(e.engine.wait_ready(60))
            yield e
        finally:
            e.close()


def test_languages_and_kernelspecs(engine: Engine) -> None:
    langs = {lang.id: lang for lang in engine.engine.languages()}
    assert re.fullmatch(r"Python 3 \(IPython kernel \d+\.\d+\.\d+, Python 3\.\d+\.\d+\)", langs[1071].name)
    assert langs[1071].kernel == "python3"
    assert "python3" in engine.engine.kernelspecs()
    health = engine.engine.health()
    assert health["sandbox"] == "bwrap"
    assert health["pools"]["python3"]["size"] == 2


def test_hello_and_events(engine: Engine) -> None:
    result, events = engine.run("print('hello')\nimport sys; print('oops', file=sys.stderr)")
    assert result.outcome == "exited" and result.exit_code == 0
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert result.time is not None and result.wall_time is not None and result.memory is not None
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert stages == ["starting", "running"]
    streams = [(e["stream"], e["text"]) for e in events if e["kind"] == "stream"]
    assert ("stdout", "hello\n") in streams and ("stderr", "oops\n") in streams


def test_stdin_whole_and_by_line(engine: Engine) -> None:
    code = "name = input('name? ')\nrest = __import__('sys').stdin.read()\nprint(f'[{name}]', rest.split())"
    result, _ = engine.run(code, stdin="ada\n1 2\n3\n")
    assert result.stdout == "name? [ada] ['1', '2', '3']\n"
    result, _ = engine.run("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="abc\ndef")
    assert result.stdout == "ABC\nDEF"


def test_getpass_reads_stdin_too(engine: Engine) -> None:
    result, _ = engine.run("import getpass; print(getpass.getpass('pw: ')[::-1])", stdin="terces\n")
    assert result.stdout == "pw: secret\n"


def test_stdin_eof_is_eoferror(engine: Engine) -> None:
    result, _ = engine.run("print(input())\nprint(input())", stdin="only\n")
    assert result.stdout == "only\n"
    assert result.exit_code == 1 and "EOFError" in result.stderr


def test_argv_and_file(engine: Engine) -> None:
    result, _ = engine.run("import sys; print(sys.argv, __file__, __name__)",
                           command_line_arguments="-n 3 'two words'")
    assert result.stdout == "['script.py', '-n', '3', 'two words'] script.py __main__\n"


def test_a_failed_set_up_runs_nothing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel's set-up hook gets arguments it cannot take: the run is an internal error, its code never runs
    real = PythonKernel.setup
    monkeypatch.setattr(PythonKernel, "setup", lambda self, *a: {**real(self, *a), "unexpected": 1})
    result, _ = engine.run("print('the code ran')")
    assert result.outcome == "internal" and "the code ran" not in result.stdout + result.stderr
    assert result.stderr == "" and result.message and "incident" in result.message


def test_a_kernel_gets_the_settings_of_its_command_line(engine: Engine) -> None:
    assert engine.engine.health()["pools"]["python3"]["fork_server"]  # configured by the fork server
    code = ("from ipykernel.kernelapp import IPKernelApp\napp = IPKernelApp.instance()\n"
            "print(app.quiet, app.connection_file.startswith('/run/kernel/'), get_ipython().history_manager.enabled,"
            " get_ipython().colors, 'parse_command_line' in vars(app))")
    result, _ = engine.run(code)
    assert result.stdout == "True True False nocolor True\n", result  # set without traitlets' parser


def test_nothing_of_a_run_stays_on_the_host(engine: Engine) -> None:
    # what a run writes to its own fd 1 lands in its kernel's log, on the host: gone with the kernel
    marker = "left-behind-" + os.urandom(4).hex()
    result, _ = engine.run(f"import os; os.write(1, b'{marker}')")
    assert result.outcome == "exited" and result.exit_code == 0
    runtime = engine.engine.runtime_dir

    def leftovers() -> list[str]:
        found = []
        for path in runtime.rglob("*"):
            try:
                if path.is_file() and marker.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a refill's files come and go
                continue
        return found

    def gone() -> bool:
        engine.loop.run_until_complete(asyncio.sleep(0.05))  # the kernel is shut down after the result
        return not leftovers()

    wait_until(gone, timeout=30, message="the run's kernel log is still on the host")


def test_exception_is_exit_1_with_plain_traceback(engine: Engine) -> None:
    result, events = engine.run("def f():\n    raise ValueError('bad value')\nf()")
    assert result.outcome == "exited" and result.exit_code == 1
    assert "ValueError" in result.stderr and "bad value" in result.stderr
    assert "\x1b[" not in result.stderr and result.stdout == ""
    assert any(e["kind"] == "stream" and "ValueError" in e["text"] for e in events)


@pytest.mark.parametrize(("code", "exit_code", "stderr"), [
    ("import sys; sys.exit(3)", 3, ""),
    ("raise SystemExit(0)", 0, ""),
    ("import sys; sys.exit()", 0, ""),
    ("import sys; sys.exit('fatal: no input')", 1, "fatal: no input\n"),
])
def test_sys_exit_codes(engine: Engine, code: str, exit_code: int, stderr: str) -> None:
    result, _ = engine.run("print('before')\n" + code + "\nprint('after')")
    assert result.exit_code == exit_code
    assert result.stdout == "before\n" and result.stderr == stderr


def test_rich_outputs_not_in_stdout(engine: Engine) -> None:
    png = base64.b64encode(
        bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                      "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5d4b3b30000000049454e44ae426082")).decode()
    code = (
        "from IPython.display import HTML, Image, display\nimport base64\n"
        "print('text')\n"
        "display(HTML('<table><tr><td>1</td></tr></table>'))\n"
        f"display(Image(data=base64.b64decode('{png}')))\n"
        "6 * 7\n"
    )
    result, events = engine.run(code)
    assert result.stdout == "text\n"
    mimes = [set(o["data"]) for o in result.outputs]
    assert {"text/html", "text/plain"} in mimes and {"image/png", "text/plain"} in mimes
    assert {"text/plain"} in mimes and result.outputs[-1]["data"]["text/plain"] == "42"
    png_out = next(o for o in result.outputs if "image/png" in o["data"])
    assert png_out["data"]["image/png"].strip() == png
    displays = [e for e in events if e["kind"] == "display"]
    assert len(displays) == 3 and displays[0]["data"]["text/html"].startswith("<table>")


def test_redirect_stderr_to_stdout(engine: Engine) -> None:
    result, _ = engine.run("import sys\nprint('a')\nprint('b', file=sys.stderr)", redirect_stderr_to_stdout=True)
    assert result.stdout.split() == ["a", "b"] and result.stderr == ""


def test_each_run_gets_a_fresh_kernel(engine: Engine) -> None:
    first, _ = engine.run("import os\nsecret = 41\nopen('mark', 'w').write('x')\nprint(os.getpid())")
    second, _ = engine.run("import os\nprint('secret' in globals(), os.path.exists('mark'), os.listdir('.'))")
    assert first.exit_code == 0
    assert second.stdout.startswith("False False ")


def test_kernel_field_selects_kernelspec(engine: Engine) -> None:
    result, _ = engine.run("import sys; print(sys.version_info[0])", language_id=None, kernel="python3")
    assert result.stdout == "3\n"
    result, _ = engine.run("print(1)", language_id=None, kernel="no-such-kernel")
    assert result.outcome == "internal" and "no-such-kernel" in (result.message or "")


def test_interactive_stdin_queue(engine: Engine) -> None:
    async def go() -> RunResult:
        q: asyncio.Queue[str | None] = asyncio.Queue()
        request = RunRequest(token="i", source_code="a = input('a? ')\nb = input()\nprint(a + b)\nprint(input())",
                             language_id=1071, stdin_queue=q)
        for chunk in ("fir", "st\nsec", "ond\n", None):
            q.put_nowait(chunk)
        return await engine.engine.run(request, lambda e: None)

    result = engine.loop.run_until_complete(go())
    assert result.stdout.startswith("a? firstsecond\n")
    assert result.exit_code == 1 and "EOFError" in result.stderr


def test_limits_reported_in_result(engine: Engine) -> None:
    result, _ = engine.run("x = bytearray(30 * 1024 * 1024)\nfor i in range(0, len(x), 4096): x[i] = 1\n"
                           "s = sum(range(3_000_000))",
                           limits=Limits(memory_limit=256_000))
    assert result.exit_code == 0
    assert result.memory is not None and result.memory > 25_000
    assert result.time is not None and result.time > 0


def test_bash_kernel(engine: Engine) -> None:
    if "bash" not in engine.engine.kernelspecs():
        pytest.skip("bash_kernel is not installed (pip install bash_kernel)")
    result, _ = engine.run('read x; echo "got $x $1"; exit 4', language_id=1046, stdin="line\n",
                           command_line_arguments="arg1")
    assert result.stdout.strip() == "got line arg1"
    assert result.exit_code == 4
    result, _ = engine.run("echo fine", language_id=1046)
    assert result.stdout.strip() == "fine" and result.exit_code == 0


def test_deno_kernel_javascript_and_typescript(engine: Engine) -> None:
    if "deno" not in engine.engine.kernelspecs():
        pytest.skip("Deno kernelspec is not installed (pip install deno; deno jupyter --install)")
    langs = {lang.id: lang.name for lang in engine.engine.languages()}
    assert re.fullmatch(r"JavaScript \(Deno kernel \d+\.\d+\.\d+\)", langs[1063])
    result, events = engine.run("console.log('hi ' + prompt('who?'))\nDeno.jupyter.html`<i>x</i>`",
                                language_id=1063, stdin="deno\n")
    assert result.stdout == "who? hi deno\n" and result.exit_code == 0
    assert result.outputs == [{"data": {"text/html": "<i>x</i>"}, "metadata": {}}]
    assert any(e["kind"] == "display" for e in events)
    result, _ = engine.run("const n: number = 2;\nconsole.log(n * 21);\nthrow new Error('boom');", language_id=1074)
    assert result.stdout == "42\n" and result.exit_code == 1 and "Error: boom" in result.stderr
    result, _ = engine.run("console.log(prompt(), Deno.args);\n"
                           "console.log(JSON.stringify(await new Response(Deno.stdin.readable).text()));",
                           language_id=1074, stdin="first\nsecond\nthird", command_line_arguments="-n 'a b'")
    assert result.stdout == 'first [ "-n", "a b" ]\n"second\\nthird"\n'
    result, _ = engine.run("Deno.exit(5)", language_id=1063)
    assert result.exit_code == 5


def test_enable_network_does_not_reach_the_host_loopback(engine: Engine) -> None:
    import socket

    from runflare_server.engine.sandbox import network

    network.prepare_tun()  # what a server allowing enable_network does at start
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = ("import errno, socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n    print('connected')\n"
                "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
        result, _ = engine.run(code, limits=Limits(enable_network=True))
        # pasta's namespace has its own loopback, where nothing listens (test_network_sandbox.py shows the rest)
        assert result.stdout == "ECONNREFUSED\n", result
        listener.settimeout(1)
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()


def test_unshare_fallback_sandbox(tmp_path_factory: pytest.TempPathFactory) -> None:
    e = Engine(pool_sizes={}, sandbox="unshare", runtime_dir=tmp_path_factory.mktemp("rt-unshare"))
    try:
        assert e.engine.health()["sandbox"] == "unshare"
        runtime = e.engine.runtime_dir
        code = (f"import os, socket\nr = {str(runtime)!r}\n"
                "print(os.getcwd(), os.getpid(), not os.path.exists(r) or os.listdir(r) == [])\n"
                "print(sorted(name for _, name in socket.if_nameindex()))\n"
                "try:\n    open('/usr/rf-x', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n")
        result, _ = e.run(code)
        assert result.stdout == "/sandbox 1 True\n['lo']\nro 30\n", result  # only a loopback: no route out
    finally:
        e.close()
