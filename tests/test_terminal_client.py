"""`runflare run FILE` (python -m runflare_nb.terminal) as a subprocess against a real server."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from runflare_nb import Client

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RUNFLARE_URL", None)
    return subprocess.run([sys.executable, "-m", "runflare_nb.terminal", *args], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def languages(live_server) -> set[int]:
    return {lang["id"] for lang in Client(live_server.url).languages()}


@pytest.fixture(scope="module")
def need_program_runs(languages) -> None:
    if 71 not in languages:
        pytest.skip("the server has no program runs for Python (71)")


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_output_streams_while_the_program_runs(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "slow.py", "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runflare_nb.terminal", program, "--server", live_server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "first\n"
        assert proc.poll() is None, "the first line arrived before the program finished"
        assert proc.stdout.read() == "second\n"
        assert proc.wait(60) == 0
        assert "\033[" not in proc.stderr.read(), "no spinner when stderr is not a terminal"
    finally:
        proc.kill()
        proc.wait()


def test_exit_code_stdin_and_stderr(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "prog.py", "import sys\nprint(input()[::-1])\nprint('warn', file=sys.stderr)\n"
                                         "sys.exit(int(sys.argv[1]))\n")
    given = write(tmp_path, "in.txt", "stressed\n")
    done = run_cli(program, "--server", live_server.url, "--stdin", f"@{given}", "--args", "7")
    assert done.returncode == 7
    assert done.stdout == "desserts\n"
    assert "warn\n" in done.stderr
    assert run_cli(program, "--server", live_server.url, "--stdin", "ok", "--args", "0").returncode == 0


def test_time_limit_exits_124(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "spin.py", "while True:\n    pass\n")
    done = run_cli(program, "--server", live_server.url, "--time-limit", "1")
    assert done.returncode == 124
    assert "Time Limit Exceeded" in done.stderr


def test_compile_error_exits_1_and_shows_the_compiler(live_server, languages, tmp_path) -> None:
    if 50 not in languages:
        pytest.skip("the server has no C (50)")
    program = write(tmp_path, "broken.c", "int main(void) { return 0 }\n")
    done = run_cli(program, "--server", live_server.url)
    assert done.returncode == 1
    assert "error" in done.stderr and "Compilation Error" in done.stderr
    ok = run_cli(write(tmp_path, "fine.c", '#include <stdio.h>\nint main(void){puts("c ok");return 5;}\n'),
                 "--server", live_server.url)
    assert (ok.returncode, ok.stdout) == (5, "c ok\n")


def test_json_prints_the_final_submission(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "hello.py", "print('hello json')\n")
    done = run_cli(program, "--server", live_server.url, "--json")
    assert done.returncode == 0
    submission = json.loads(done.stdout)
    assert submission["stdout"] == "hello json\n"
    assert submission["status"] == {"id": 3, "description": "Accepted"}
    assert submission["language_id"] == 71


def test_language_option_and_run_prefix(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "script.txt", "print('as python')\n")
    assert run_cli(program, "--server", live_server.url).returncode == 2  # no guess for .txt
    done = run_cli("run", program, "--server", live_server.url, "--language", "python")
    assert (done.returncode, done.stdout) == (0, "as python\n")


def test_spinner_only_on_a_terminal(live_server, need_program_runs, tmp_path) -> None:
    program = write(tmp_path, "tty.py", "print('with a tty')\n")
    leader, follower = pty.openpty()
    try:
        done = run_cli(program, "--server", live_server.url, stderr=follower)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert done.returncode == 0 and done.stdout == "with a tty\n"
    text = seen.decode(errors="replace")
    assert "\r\033[K" in text and "Accepted" in text


def test_unreachable_server(tmp_path) -> None:
    program = write(tmp_path, "x.py", "print(1)\n")
    done = run_cli(program, "--server", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "cannot reach Run-Flare server" in done.stderr and "Traceback" not in done.stderr
