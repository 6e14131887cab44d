"""%runflare / %%runflare in a real IPython shell against a real server."""

from __future__ import annotations

import pytest
from conftest import free_port
from IPython.core.error import UsageError
from IPython.testing.globalipapp import get_ipython

from runflare_nb import Client, SubmissionWidget, wait_all


@pytest.fixture(scope="module")
def ip():
    shell = get_ipython()
    shell.run_line_magic("load_ext", "runflare_nb")
    yield shell
    shell.run_line_magic("unload_ext", "runflare_nb")


@pytest.fixture(scope="module")
def py(live_server) -> int:
    """Python 3 as a program run (71) when the server has it, else as a kernel run (1071)."""
    ids = {lang["id"] for lang in Client(live_server.url).languages()}
    return 71 if 71 in ids else 1071


@pytest.fixture(autouse=True)
def server_env(live_server, monkeypatch):
    monkeypatch.setenv("RUNFLARE_URL", live_server.url)


def console_text(view: SubmissionWidget, name: str = "stdout") -> str:
    return "".join(o["text"] for o in view.console.outputs if o.get("name") == name)


def test_load_twice_unload_and_reload(ip) -> None:
    ip.run_line_magic("load_ext", "runflare_nb")
    ip.run_line_magic("reload_ext", "runflare_nb")
    assert ip.find_line_magic("runflare") and ip.find_cell_magic("runflare")
    ip.run_line_magic("unload_ext", "runflare_nb")
    assert ip.find_line_magic("runflare") is None
    ip.run_line_magic("load_ext", "runflare_nb")
    assert ip.find_line_magic("runflare")


def test_help_lists_the_options(ip, capsys) -> None:
    ip.run_cell("%runflare?")
    out = capsys.readouterr().out
    for option in ("--language", "--stdin", "--expected", "--time-limit", "--no-widget", "--wait", "--var"):
        assert option in out


def test_no_widget_streams_text_and_stores_the_result(ip, py, capsys) -> None:
    result = ip.run_line_magic("runflare", f"--no-widget -l {py} --var plain print('six', 6 * 7)")
    assert result is None
    out = capsys.readouterr().out
    assert "six 42\n" in out and "Accepted" in out
    assert ip.user_ns["plain"]["stdout"] == "six 42\n"
    assert ip.user_ns["plain"]["status"]["id"] == 3


def test_cell_magic_with_stdin_and_expected_output(ip, py, capsys) -> None:
    source = "a, b = map(int, input().split())\nprint(a + b)\n"
    ip.run_cell_magic("runflare", f'--no-widget -l {py} --stdin "2 40" --expected 42 --var right', source)
    ip.run_cell_magic("runflare", f'--no-widget -l {py} --stdin "2 40" --expected 41 --var wrong', source)
    assert ip.user_ns["right"]["status"]["description"] == "Accepted"
    assert ip.user_ns["wrong"]["status"]["description"] == "Wrong Answer"
    assert ip.user_ns["wrong"]["stdout"] == "42\n"


def test_line_magic_runs_a_file_and_reads_stdin_from_a_file(ip, py, tmp_path) -> None:
    program = tmp_path / "greet.py"
    program.write_text("print('hi', input())\n")
    given = tmp_path / "input.txt"
    given.write_text("from a file\n")
    ip.run_line_magic("runflare", f"--no-widget -l {py} --stdin @{given} --var from_file {program}")
    assert ip.user_ns["from_file"]["stdout"] == "hi from a file\n"
    assert ip.user_ns["from_file"]["source_code"] == program.read_text()


def test_widget_wait_shows_the_final_state(ip, py) -> None:
    view = ip.run_cell_magic("runflare", f"-l {py} --wait --var waited",
                             "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nsys.exit(4)\n")
    assert isinstance(view, SubmissionWidget) and view.finished
    assert view.status_id == 11 and "Runtime Error" in view.header.value
    assert console_text(view) == "to out\n" and "to err" in console_text(view, "stderr")
    assert "exit code <b>4</b>" in view.footer.value and "memory" in view.footer.value
    assert ip.user_ns["waited"]["exit_code"] == 4


def test_time_limit_is_passed_through(ip, py) -> None:
    view = ip.run_line_magic("runflare", f"-l {py} --time-limit 1 --wait while True: pass")
    assert view.submission["status"]["id"] == 5, view.submission
    assert "Time Limit Exceeded" in view.header.value


def test_args_reach_the_program(ip, py) -> None:
    if py != 71:
        pytest.skip("command line arguments need a program run (language 71) on this server")
    ip.run_line_magic("runflare", '--no-widget -l python --args "one two" --var argv '
                                  "import sys; print(sys.argv[1:])")
    assert ip.user_ns["argv"]["stdout"] == "['one', 'two']\n"


def test_widgets_follow_their_own_submissions_while_other_cells_run(ip, py) -> None:
    # each program waits for a line of stdin, sent only after the checks below: none can have finished
    views = [
        ip.run_line_magic("runflare", f"-l {py} --interactive --var case{i} input(); print('case', {i})")
        for i in range(3)
    ]
    assert not any(view.finished for view in views), "returned at once"
    assert ip.run_cell("busy = sum(range(10**6))").success  # the shell stays usable meanwhile
    for view in reversed(views):
        view.send_stdin("go\n", eof=True)
    assert wait_all(views, timeout=120)
    for i, view in enumerate(views):
        assert console_text(view) == f"case {i}\n"
        assert view.status_id == 3 and "Accepted" in view.header.value
        assert ip.user_ns[f"case{i}"]["stdout"] == f"case {i}\n"
        assert any(e["type"] == "status_update" for e in view.events)


def test_interactive_input_typed_in_the_widget(ip, py) -> None:
    source = "import sys\na = input()\nprint('a =', a, flush=True)\nb = input()\nprint('b =', b)\nprint(repr(sys.stdin.read()))\n"
    view = ip.run_cell_magic("runflare", f"-l {py} --interactive --stdin first --var typed", source)
    assert view.stdin_box is not None and not view.finished
    view.stdin_box.value = "second"  # what pressing Enter in the box does
    assert view.stdin_box.value == "", "the box is cleared once the line is sent"
    view.send_stdin("the end", eof=True)
    assert view.wait(60)
    assert view.status_id == 3, (view.events, view.submission)
    assert console_text(view).startswith("a = first\nb = second\n'the end")
    assert view.input_row.layout.display == "none", "no input box once the program is over"
    assert ip.user_ns["typed"]["stdout"] == console_text(view)


def test_chatty_output_is_merged_and_trimmed_on_screen(ip, py) -> None:
    from runflare_nb.widget import MAX_CONSOLE

    lines = MAX_CONSOLE // 500 + 100
    view = ip.run_line_magic("runflare", f"-l {py} --wait for i in range({lines}): print(i, 'x' * 500)")
    assert view.status_id == 3
    full = view.submission["stdout"]
    assert full.count("\n") == lines, "the submission keeps everything"
    marker, *shown = view.console.outputs
    assert marker["text"] == "[earlier output trimmed]\n"
    assert len(shown) == 1, "consecutive stdout chunks are merged into one output"
    assert len(shown[0]["text"]) <= MAX_CONSOLE and full.endswith(shown[0]["text"])
    assert shown[0]["text"].startswith(str(lines - len(shown[0]["text"].splitlines())))


def test_unreachable_server(ip, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    view = ip.run_line_magic("runflare", f"--server {url} print(1)")
    assert view.finished and view.error and "cannot reach" in view.error
    assert "cannot reach" in view.header.value
    ip.run_line_magic("runflare", f"--server {url} --no-widget print(1)")
    assert "cannot reach Run-Flare server" in capsys.readouterr().err


def test_rejected_submission_is_shown_not_raised(ip) -> None:
    view = ip.run_line_magic("runflare", "-l 999999 --wait print(1)")
    assert view.error and "language_id" in view.error


@pytest.mark.parametrize("line", [
    "--bogus print(1)",
    "--time-limit abc print(1)",
    "--memory-limit",
    "--var 'not a name' print(1)",
    "--no-widget",
    "--stdin @/no/such/file print(1)",
    "no_such_program.py",
    "--interactive --wait print(input())",
    "-l klingon print(1)",
])
def test_bad_options_are_usage_errors(ip, line, capsys) -> None:
    if line.startswith("-l klingon"):
        view = ip.run_line_magic("runflare", line)  # an unknown language is the server's call: shown
        assert view.error and "klingon" in view.error
        return
    with pytest.raises(UsageError):
        ip.run_line_magic("runflare", line)
    result = ip.run_cell(f"%runflare {line}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "Traceback" not in capsys.readouterr().out
