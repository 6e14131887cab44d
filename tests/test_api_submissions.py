"""Submissions over real HTTP against a real server and real kernels: create, wait, fields, base64, batch."""

from __future__ import annotations

import base64
import re

from conftest import wait_until
from http_client import get, post

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def wait_done(api: str, token: str) -> dict:
    def finished() -> dict | None:
        sub = get(f"{api}/submissions/{token}?fields=*").json
        return sub if sub["status"]["id"] > 2 else None

    return wait_until(finished, interval=0.1, message=f"{token} finished")


def test_hello_wait_true(live_server):
    r = post(f"{live_server.api}/submissions?wait=true", HELLO)
    assert r.status == 201
    sub = r.json
    assert sub["status"] == {"id": 3, "description": "Accepted"}
    assert sub["stdout"] == "Hello!\n"
    assert set(sub) == {"token", "time", "memory", "stdout", "stderr", "compile_output", "message", "status"}
    assert re.match(r"^\d+\.\d{3}$", sub["time"]) and float(sub["time"]) > 0
    assert isinstance(sub["memory"], int) and sub["memory"] > 0


def test_create_returns_token_then_get(live_server):
    r = post(f"{live_server.api}/submissions", HELLO)
    assert r.status == 201 and set(r.json) == {"token"}
    token = r.json["token"]
    assert re.match(r"^[0-9a-f-]{36}$", token)
    sub = wait_done(live_server.api, token)
    assert sub["stdout"] == "Hello!\n"
    assert ISO.match(sub["created_at"]) and ISO.match(sub["finished_at"])
    assert sub["language"]["id"] == 71 and sub["language"]["name"].startswith("Python (3.")
    assert float(sub["wall_time"]) > 0 and sub["exit_code"] == 0
    assert sub["cpu_time_limit"] == "5.0" and sub["memory_limit"] == 128000 and sub["number_of_runs"] == 1


def test_fields_star_has_every_judge0_key(live_server):
    token = post(f"{live_server.api}/submissions?wait=true&fields=token", HELLO).json["token"]
    sub = get(f"{live_server.api}/submissions/{token}?fields=*").json
    judge0 = ("source_code language_id stdin expected_output stdout status_id created_at finished_at time memory "
              "stderr token number_of_runs cpu_time_limit cpu_extra_time wall_time_limit memory_limit stack_limit "
              "max_processes_and_or_threads enable_per_process_and_thread_time_limit "
              "enable_per_process_and_thread_memory_limit max_file_size compile_output exit_code exit_signal message "
              "wall_time compiler_options command_line_arguments redirect_stderr_to_stdout callback_url "
              "additional_files enable_network status language").split()
    assert len(judge0) == 35
    assert set(sub) == set(judge0)  # exactly Judge0's: (RF) fields only when named (test_judge0_exactness.py)


def test_fields_selection_and_unknown_field(live_server):
    token = post(f"{live_server.api}/submissions?wait=true&fields=token", HELLO).json["token"]
    sub = get(f"{live_server.api}/submissions/{token}?fields=stdout,status_id,language").json
    assert set(sub) == {"stdout", "status_id", "language"}
    r = get(f"{live_server.api}/submissions/{token}?fields=stdout,nope,bogus")
    assert r.status == 400 and r.json == {"error": "invalid fields: [nope, bogus]"}


def test_base64_in_and_out(live_server):
    source = 'import sys\nprint(sys.stdin.read().upper(), end="")\n'
    body = {"source_code": base64.b64encode(source.encode()).decode(), "language_id": 71,
            "stdin": base64.b64encode("héllo".encode()).decode()}
    sub = post(f"{live_server.api}/submissions?base64_encoded=true&wait=true&fields=stdout,stdin,source_code",
               body).json
    assert base64.b64decode(sub["stdout"]).decode() == "HÉLLO"
    assert base64.b64decode(sub["source_code"]).decode() == source


def test_non_utf8_output_needs_base64(live_server):
    body = {"source_code": "import sys; sys.stdout.buffer.write(b'\\xff\\xfeok')", "language_id": 71}
    token = post(f"{live_server.api}/submissions?wait=true&fields=token", body).json["token"]
    r = get(f"{live_server.api}/submissions/{token}")
    assert r.status == 200
    assert r.json["token"] == token and "base64_encoded=true" in r.json["error"]
    sub = get(f"{live_server.api}/submissions/{token}?base64_encoded=true").json
    assert base64.b64decode(sub["stdout"]) == b"\xff\xfeok"


def test_expected_output_accepted_and_wrong_answer(live_server):
    ok = post(f"{live_server.api}/submissions?wait=true",
              {**HELLO, "expected_output": "Hello!  \n\n"}).json
    assert ok["status"]["id"] == 3
    wrong = post(f"{live_server.api}/submissions?wait=true", {**HELLO, "expected_output": "Bye"}).json
    assert wrong["status"] == {"id": 4, "description": "Wrong Answer"}


def test_stdin_argv_exit_code_and_redirect(live_server):
    src = "import sys\nprint(input()[::-1], sys.argv[1:])\nprint('err', file=sys.stderr)\nsys.exit(3)"
    sub = post(f"{live_server.api}/submissions?wait=true&fields=*",
               {"source_code": src, "language_id": 71, "stdin": "abc\n", "command_line_arguments": "x 'y z'"}).json
    assert sub["stdout"] == "cba ['x', 'y z']\n" and sub["stderr"] == "err\n"
    assert sub["status"]["id"] == 11 and sub["exit_code"] == 3
    merged = post(f"{live_server.api}/submissions?wait=true",
                  {"source_code": "import sys\nprint('a', file=sys.stderr, flush=True)\nprint('b')",
                   "language_id": 71, "redirect_stderr_to_stdout": True}).json
    assert merged["stdout"] == "a\nb\n" and not merged["stderr"]


def test_number_of_runs(live_server):
    sub = post(f"{live_server.api}/submissions?wait=true&fields=*", {**HELLO, "number_of_runs": 3}).json
    assert sub["status"]["id"] == 3 and sub["number_of_runs"] == 3 and float(sub["time"]) > 0


def test_batch_create_and_get(live_server):
    r = post(f"{live_server.api}/submissions/batch",
             {"submissions": [HELLO, {"language_id": 71}, {**HELLO, "language_id": 9999}]})
    assert r.status == 201
    first, blank, unknown = r.json
    assert "token" in first
    assert blank == {"source_code": ["can't be blank"]}
    assert unknown == {"language_id": ["language with id 9999 doesn't exist"]}
    wait_done(live_server.api, first["token"])
    got = get(f"{live_server.api}/submissions/batch?tokens={first['token']},missing&fields=stdout,status").json
    assert got["submissions"][0]["stdout"] == "Hello!\n" and got["submissions"][1] is None


def test_batch_limits(live_server):
    empty = post(f"{live_server.api}/submissions/batch", {"submissions": []})
    assert empty.status == 400 and "at least one" in empty.json["error"]
    r = post(f"{live_server.api}/submissions/batch", {"submissions": [HELLO] * 21})
    assert r.status == 400 and "less than or equal to 20" in r.json["error"]
    assert get(f"{live_server.api}/submissions/batch?tokens=").status == 400
